#!/usr/bin/env bash
# One prepared GPU leg of the slab prior (issue 13, item 6): continue the shipped prior for a fixed
# time with bf16 autocast and a larger batch, on the same 3 mm / 128 x 128 grid (the shipped
# network and the sampler's grid; a 256 x 256 prior is a new model, not a leg), and write the
# weights, the checkpoints and the TensorBoard log to one folder.
#
#   bash scripts/gpu_train.sh                      # on the device: 8 minutes into "$OUT/train"
#   SECONDS_BUDGET=5 BATCH=4 bash scripts/gpu_train.sh /tmp/dry --datalist d.json --data_root data   # CPU dry run
#
# Arguments after the output folder are passed to the training config (tests/test_gpu_train.py
# runs the dry run on tiny data this way). The device is the config's: CUDA when there is one.
#
# From a session with the device tool (after `bash scripts/gpu_check.sh --prepare` here, for the
# packages the device's python lacks): run(command="bash scripts/gpu_train.sh", carry=[".whl"],
# timeout_s=560). The weights come back as $OUT/train/model.pt: evaluate them on the CPU like
# any other leg (docs/README.md, "validation") before publishing with scripts/publish_weights.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:?set OUT or pass the output folder}/train}"
shift || true
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -d "$ROOT/.whl" ] && ! "$PY" -c "import monai, astra, ignite, nibabel" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$ROOT/.whl" --target /tmp/gpu_site astra-toolbox monai nibabel pytorch-ignite
    export PYTHONPATH="/tmp/gpu_site:${PYTHONPATH:-}"
    export LD_LIBRARY_PATH="$ROOT/.whl/lib:${LD_LIBRARY_PATH:-}"
fi
mkdir -p "$OUT_DIR"
"$PY" -m monai.bundle run training \
    --config_file "['configs/train.json','configs/train_augment.json']" \
    --init_from "${INIT:-models/model.pt}" --output_dir "$OUT_DIR" \
    --mixed_precision auto --min_snr_gamma 5 \
    --batch_size "${BATCH:-64}" --num_workers 0 --max_epochs "${EPOCHS:-200}" --val_interval 1000 \
    --stop_after_seconds "${SECONDS_BUDGET:-480}" "$@" 2>&1 | tee "$OUT_DIR/train.log"
ls -l "$OUT_DIR"
