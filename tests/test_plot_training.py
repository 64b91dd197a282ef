"""scripts/plot_training.py on TensorBoard events written by torch: legs end to end, --until, the printed means."""

from __future__ import annotations

import subprocess
import sys

from torch.utils.tensorboard import SummaryWriter

from tests.conftest import ROOT


def _write_run(run_dir, losses):
    writer = SummaryWriter(str(run_dir))
    for step, loss in enumerate(losses, start=1):
        writer.add_scalar("train_loss", loss, step)
    writer.close()


def _plot(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_training.py"), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )


def test_legs_until_and_means(tmp_path):
    _write_run(tmp_path / "leg1", [0.04] * 10)
    _write_run(tmp_path / "leg2", [0.02] * 10 + [0.5] * 5)  # the last 5 come after the shipped checkpoint
    out = tmp_path / "loss.png"
    done = _plot(tmp_path / "leg1", tmp_path / "leg2", "--until", 20, "--window", 10, "--smooth", 5, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0
    assert "20 iterations (to 20)" in done.stdout
    assert "mean loss 0.0400 over the first 10, 0.0200 over the last 10" in done.stdout


def test_until_before_first_iteration_is_an_error(tmp_path):
    _write_run(tmp_path / "run", [0.1] * 3)
    done = _plot(tmp_path / "run", "--until", 0, "--out", tmp_path / "x.png")
    assert done.returncode != 0
    assert "--until 0" in done.stderr


def test_run_without_loss_is_an_error(tmp_path):
    writer = SummaryWriter(str(tmp_path / "empty"))
    writer.add_scalar("other", 1.0, 1)
    writer.close()
    done = _plot(tmp_path / "empty", "--out", tmp_path / "x.png")
    assert done.returncode != 0
    assert "no 'train_loss' scalars" in done.stderr
