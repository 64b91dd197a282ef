#!/usr/bin/env bash
# The prepared GPU run of issue 17: runs scripts/gpu_check.py (its docstring says what it measures).
#
#   bash scripts/gpu_check.sh --prepare    # on the development machine, once: fills .whl/ for the device
#   bash scripts/gpu_check.sh [ARGS...]    # on the device: python scripts/gpu_check.py --out "$OUT" ARGS...
#
# From a session with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540).
#
# The device's python has PyTorch with CUDA but not the bundle's other packages. --prepare
# downloads them (the pins of requirements.txt) as wheels for that python (CPython 3.12,
# x86-64) into .whl/, which git ignores, and puts two libraries in .whl/lib/: libcudart.so.12
# from NVIDIA's CUDA 12 runtime wheel, and a stand-in libcufft.so.11. ASTRA's wheel links CUDA
# 12's cuFFT (290 MB, more than may travel to the device), but only its FBP/FDK filters call
# it, never the projectors (FP3D/BP3D) this run uses; the stand-in answers
# CUFFT_NOT_SUPPORTED. On the device this script uses the wheels only when its python cannot
# import the packages already (the development machine's .venv can).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHL="$ROOT/.whl"
PACKAGES=(astra-toolbox monai nibabel pytorch-ignite)

python_here() {
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "$ROOT/.venv/bin/python"
    else
        echo python3
    fi
}

prepare() {
    local py tmp pins=()
    py="$(python_here)"
    for name in "${PACKAGES[@]}"; do  # the pin of requirements.txt, without extras
        pins+=("$(grep -E "^${name}(\[|=)" requirements.txt | sed -E 's/\[[^]]*\]//')")
    done
    local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                     --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    local get=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
    mkdir -p "$WHL/lib"
    "${get[@]}" -d "$WHL" "${pins[@]}"
    tmp="$(mktemp -d)"
    "${get[@]}" -d "$tmp" "nvidia-cuda-runtime-cu12==12.*"
    "$py" - "$tmp" "$WHL/lib" <<'EOF'
import glob, sys, zipfile
wheel = zipfile.ZipFile(glob.glob(f"{sys.argv[1]}/nvidia_cuda_runtime_cu12-*.whl")[0])
name = next(n for n in wheel.namelist() if n.endswith("/libcudart.so.12"))
open(f"{sys.argv[2]}/libcudart.so.12", "wb").write(wheel.read(name))
EOF
    cat >"$tmp/cufft.c" <<'EOF'
/* Stand-in for CUDA 12's libcufft.so.11: ASTRA calls cuFFT only in its FBP/FDK filters. 16 = CUFFT_NOT_SUPPORTED. */
int cufftPlan1d(void *plan, int nx, int type, int batch) { return 16; }
int cufftSetStream(int plan, void *stream) { return 16; }
int cufftExecR2C(int plan, void *in, void *out) { return 16; }
int cufftExecC2R(int plan, void *in, void *out) { return 16; }
int cufftDestroy(int plan) { return 16; }
EOF
    echo 'libcufft.so.11 { global: cufft*; local: *; };' >"$tmp/cufft.map"
    cc -shared -fPIC -O2 -Wl,-soname,libcufft.so.11 -Wl,--version-script="$tmp/cufft.map" -o "$WHL/lib/libcufft.so.11" "$tmp/cufft.c"
    rm -rf "$tmp"
    ls -l "$WHL" "$WHL/lib"
    du -sh "$WHL"
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit 0
fi

PY="$(python_here)"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['astra', 'ignite', 'monai', 'nibabel'])))"; then
    if ! compgen -G "$WHL/*.whl" >/dev/null; then
        echo "gpu_check.sh: $PY lacks astra, ignite, monai or nibabel, and .whl/ holds no wheels:" \
             "run 'bash scripts/gpu_check.sh --prepare' on the development machine and carry .whl" >&2
        exit 2
    fi
    SITE=/tmp/gpu_check_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export LD_LIBRARY_PATH="$WHL/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --out "${OUT:?gpu_check.sh: set OUT to the output folder}" "$@"
