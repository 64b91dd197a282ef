"""Benchmark slab-parallel reconstruction: one process of 2 threads against 2 gloo processes of 1 thread each.

    python scripts/benchmark_distributed.py                          # the sample's central 16 slices, 10 steps
    python scripts/benchmark_distributed.py --depth 40 --steps 50 --batch_size 4

Both runs are ``configs/inference.json`` (the second with ``configs/multi_gpu_inference.json``
under ``torchrun --standalone --nproc_per_node=2``, the slabs of each step shared) on the central
``--depth`` slices of ``sample/sample_ct.nii.gz`` (8 simulated parallel-beam views, ``dbpp``, the
shipped prior, the same seed). It prints one JSON line:

- ``one_process_seconds``, ``two_process_seconds``: the reconstruction's ``seconds`` in
  ``metrics.json`` (the slowest process for two); ``ratio`` = two / one (below 1: faster);
  ``one_process_one_thread_seconds``: a third run, one process of 1 thread, the reference that
  says how much of the ratio is the second process and how much the second thread's poor use;
- ``max_abs_difference``: between the two written reconstructions, in normalised attenuation
  (``max_abs_difference_hu`` in HU);
- ``per_step``: what one DDIM step costs: ``bytes_all_reduced`` (the working volume in fp32, once
  a step), ``all_reduce_seconds`` (process 0, waiting for the slower process included),
  ``network_seconds_one_process`` and ``network_seconds_per_process`` (each process's share), and
  ``rest_seconds_one_process`` (Tweedie estimate, data consistency and re-noising, which every
  process repeats).

On N devices a step takes about ``network / N + rest + all-reduce`` (a ring all-reduce sends
``2 (N - 1) / N * bytes_all_reduced`` per device), with ``network / N`` rounded up to whole
batches: each process runs the batches ``i % N == rank``, so a step needs at least N batches.
The machine's other work changes every number: time it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HU_PER_UNIT = 1000.0 * (1.0 + 2000.0 / 1000.0)  # d HU / d normalised attenuation (configs/inference.json hu_max 2000)


def central_slices(depth: int, path: Path) -> Path:
    """Write the central ``depth`` axial slices of the shipped sample to ``path`` (NIfTI, the sample's affine)."""
    img = nib.load(ROOT / "sample" / "sample_ct.nii.gz")
    data = np.asarray(img.dataobj)
    if not 3 <= depth <= data.shape[2]:
        raise SystemExit(f"--depth must be in [3, {data.shape[2]}] (the sample's slices), got {depth}")
    z0 = (data.shape[2] - depth) // 2
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, z0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data[:, :, z0:z0 + depth], affine), path)
    return path


def worker(args: argparse.Namespace) -> None:
    """One reconstruction through the bundle's configs (under torchrun: with the multi-GPU overlay); ``rank<r>.json``."""
    sys.path.insert(0, str(ROOT))
    from monai.bundle import ConfigParser

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    files = [ROOT / "configs" / "inference.json"] + ([ROOT / "configs" / "multi_gpu_inference.json"] if distributed else [])
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({
        "bundle_root": str(ROOT), "input_path": args.input, "output_dir": args.worker, "steps": args.steps,
        "batch_size": args.batch_size, "seed": args.seed, "progress": False, "save_png": False,
    })  # fmt: skip
    if args.device == "cpu":
        parser.update({"device": "cpu"})
    parser.get_parsed_content("initialize")
    summary = parser.get_parsed_content("run")[0]
    blend = parser.get_parsed_content("blend")
    stats = {k: summary[k] for k in ("seconds", "network_calls", "network_seconds", "working_shape")}
    stats.update({k: getattr(blend, k, 0) for k in ("calls", "reduced_bytes", "reduce_seconds")})
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.worker) / f"rank{rank}.json").write_text(json.dumps(stats))
    parser.get_parsed_content("finalize")


def launch(command: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16, help="central slices of the sample")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--batch_size", type=int, default=3, help="slabs per network call (a step needs >= 2 batches to share)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (gloo), or cuda (nccl, one GPU per process)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        volume = central_slices(args.depth, Path(tmp) / "sample_center.nii.gz")
        common = [__file__, "--input", str(volume), "--steps", str(args.steps), "--batch_size", str(args.batch_size),
                  "--seed", str(args.seed), "--device", args.device]  # fmt: skip
        one, one_thread, two = Path(tmp) / "one", Path(tmp) / "one_thread", Path(tmp) / "two"
        launch([sys.executable, *common, "--worker", str(one)], threads=2)
        launch([sys.executable, *common, "--worker", str(one_thread)], threads=1)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        launch([*torchrun, *common, "--worker", str(two)], threads=1)
        single = json.loads((one / "rank0.json").read_text())
        single_thread = json.loads((one_thread / "rank0.json").read_text())
        ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
        a, b = (np.asarray(nib.load(str(d / "sample_center_recon.nii.gz")).dataobj, dtype=np.float64) for d in (one, two))

    steps = args.steps
    two_seconds = max(r["seconds"] for r in ranks)
    result = {
        "grid": single["working_shape"], "steps": steps, "batch_size": args.batch_size, "device": args.device,
        "one_process_seconds": single["seconds"], "two_process_seconds": two_seconds,
        "ratio": two_seconds / single["seconds"], "one_process_one_thread_seconds": single_thread["seconds"],
        "max_abs_difference": float(np.abs(a - b).max()) / HU_PER_UNIT, "max_abs_difference_hu": float(np.abs(a - b).max()),
        "per_step": {
            "bytes_all_reduced": ranks[0]["reduced_bytes"] // max(ranks[0]["calls"], 1),
            "all_reduce_seconds": ranks[0]["reduce_seconds"] / steps,
            "network_seconds_one_process": single["network_seconds"] / steps,
            "network_seconds_one_process_one_thread": single_thread["network_seconds"] / steps,
            "network_seconds_per_process": [r["network_seconds"] / steps for r in ranks],
            "network_calls_per_process": [r["network_calls"] / steps for r in ranks],
            "rest_seconds_one_process": (single["seconds"] - single["network_seconds"]) / steps,
        },
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
