#!/usr/bin/env bash
# Make the isolated MONAI Label environment .venv-label (see docs/monailabel.md).
#
#   bash scripts/make_label_env.sh        # or: make label
#
# Idempotent: a stamp file (.venv-label/.installed) holds a hash of requirements-label.txt,
# pyproject.toml and this script; when it matches, the script returns at once.
# Steps: venv -> torch==2.13.0 (the CPU wheel, never an unpinned torch) -> the pinned closure
# in requirements-label.txt -> monailabel without its declared dependencies (the `#nodeps:`
# lines of requirements-label.txt; why: see that file) -> this bundle (editable, no deps) ->
# an import check. Environment: PYTHON (default python3), LABEL_VENV (default .venv-label).
set -euo pipefail

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$script")/.."

PYTHON="${PYTHON:-python3}"
VENV="${LABEL_VENV:-.venv-label}"
REQ=requirements-label.txt
STAMP="$VENV/.installed"

want="$(cat "$REQ" pyproject.toml "$script" | sha256sum | cut -d' ' -f1)"
is_current() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; }

if is_current; then
    echo "make_label_env: $VENV is up to date"
    exit 0
fi

# One builder at a time (parallel test sessions); the second one finds the stamp.
exec 9>"${TMPDIR:-/tmp}/make_label_env.$(pwd | sha256sum | cut -c1-12).lock"
flock 9
if is_current; then
    echo "make_label_env: $VENV is up to date"
    exit 0
fi

start=$SECONDS
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$REQ"
mapfile -t nodeps < <(sed -n 's/^#nodeps:[[:space:]]*//p' "$REQ")
"${pip[@]}" --no-deps "${nodeps[@]}"
"${pip[@]}" --no-deps -e .

"$VENV/bin/python" - <<'EOF'
import numpy
import monai
import monailabel
from monailabel.interfaces.app import MONAILabelApp  # noqa: F401  (the server's import chain)
from monailabel.tasks.infer.basic_infer import BasicInferTask  # noqa: F401
import bundle

assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
print(f"make_label_env: monailabel {monailabel.__version__}, monai {monai.__version__}, numpy {numpy.__version__}")
EOF

echo "$want" > "$STAMP"
echo "make_label_env: $VENV ready in $((SECONDS - start)) s"
