"""configs/multi_gpu_evaluate.json: two torchrun ranks (gloo, CPU) share the cells and give the one-process table exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env, write_crop

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_PROCESS = "['configs/inference.json','configs/evaluate.json']"
TWO_RANKS = "['configs/inference.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']"
MEASURED = ("seconds", "memory", "network_share")  # what differs from run to run: time and memory


def evaluate(launcher: list[str], configs: str, volume: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    argv = [
        *launcher, "-m", "monai.bundle", "run", "--config_file", configs, "--eval_volumes", f"['{volume}']",
        "--eval_methods", "['fbp','sirt']", "--eval_dir", str(out), "--device", "cpu", "--image_size", "24",
        "--eval_settings", "[{'name': '4 views', 'views': 4}, {'name': '60 degrees', 'arc_degrees': 60.0, 'step_degrees': 20.0}]",
        "--ckpt_path", "", "--ckpt_path_2d", "", "--progress", "false", *more,
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def table(out: Path) -> list[dict]:
    """results.json's rows without the measured fields, reconstruction paths relative to ``out``."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [
        {k: (str(Path(v).relative_to(out)) if k == "recon_path" else v) for k, v in row.items() if not any(m in k for m in MEASURED)}
        for row in rows
    ]


def test_two_ranks_give_the_one_process_table(tmp_path: Path) -> None:
    volume = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    evaluate([sys.executable], ONE_PROCESS, volume, tmp_path / "one")
    ranks = evaluate(TORCHRUN, TWO_RANKS, volume, tmp_path / "two")
    log = ranks.stdout + ranks.stderr
    assert "rank 0 of 2: cell 2 of 2" in log and "rank 1 of 2: cell 2 of 2" in log  # cells 0, 2 and 1, 3
    one, two = table(tmp_path / "one"), table(tmp_path / "two")
    assert [(r["setting"], r["method"]) for r in two] == [
        ("4 views", "fbp"), ("4 views", "sirt"), ("60 degrees", "fbp"), ("60 degrees", "sirt")
    ]
    assert two == one  # every metric bit for bit
    assert (tmp_path / "two" / "results.csv").read_text().splitlines()[0].startswith("volume,setting,method,psnr_3d")
    for name in ("results.png", "figures/crop_4_views_views.png", "figures/crop_60_degrees_zprofile.png"):
        assert (tmp_path / "two" / name).stat().st_size > 0, name

    recon = tmp_path / "two" / "crop" / "60_degrees" / "sirt" / "crop_recon.nii.gz"
    before = recon.stat().st_mtime_ns
    resumed = evaluate(TORCHRUN, TWO_RANKS, volume, tmp_path / "two", "--eval_resume", "true")
    assert (resumed.stdout + resumed.stderr).count("reusing crop | ") == 4
    assert recon.stat().st_mtime_ns == before and table(tmp_path / "two") == one
