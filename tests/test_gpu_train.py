"""The prepared GPU training leg (scripts/gpu_train.sh), dry-run on the CPU on tiny data: it stops on time and writes one folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, subprocess_env, write_crop

pytestmark = pytest.mark.slow


def test_time_boxed_leg_writes_weights_log_and_checkpoint(tmp_path: Path) -> None:
    for name, xy in (("a.nii.gz", 40), ("b.nii.gz", 36)):
        write_crop(tmp_path / name, xy=xy, slices=8)
    (tmp_path / "d.json").write_text('{"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], "validation": []}')
    out = tmp_path / "train"
    env = {**subprocess_env(), "SECONDS_BUDGET": "3", "BATCH": "2", "EPOCHS": "1000", "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    proc = subprocess.run(
        ["bash", "scripts/gpu_train.sh", str(out), "--datalist", str(tmp_path / "d.json"), "--data_root", str(tmp_path),
         "--image_size", "32", "--samples_per_volume", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "stop_after_seconds 3: stopping at iteration" in log
    checkpoint = torch.load(out / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert 0 < checkpoint["trainer"]["iteration"] < 1000 * 2  # stopped by time, long before the 1,000 epochs
    weights = torch.load(out / "model.pt", weights_only=True)
    assert set(weights) == set(torch.load(ROOT / "models" / "model.pt", weights_only=True))  # the shipped architecture
    assert list(out.glob("events.out.tfevents.*"))
