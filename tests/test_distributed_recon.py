"""Reconstruction under ``torchrun`` (configs/multi_gpu_inference.json) gives the one-process result.

Two gloo processes on the CPU: one volume's slabs shared at every step, or a folder's inputs
shared; each compared with ``python -m monai.bundle run`` of configs/inference.json alone at the
same seed. The sharded blend of a one-process group is the local blend exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist

from bundle.recon.partitions import blend, tile
from bundle.workflows.distributed import DistributedRun, ShardedBlend
from bundle.workflows.sources import merge_shares, share_inputs
from tests.conftest import ROOT, subprocess_env, write_crop

CONFIGS = "['configs/inference.json','configs/multi_gpu_inference.json']"
HU_PER_UNIT = 1000.0 * (1.0 + 2000.0 / 1000.0)  # d HU / d normalised attenuation at hu_max 2000 (mu_max / mu_water)


def _analytic(x, t, separation):
    return 0.5 * x + 0.01 * separation.reshape(-1, 1, 1, 1) + 1e-4 * t.reshape(-1, 1, 1, 1)


def test_a_one_process_group_is_the_local_blend_exactly(tmp_path):
    x = torch.randn(10, 5, 6, generator=torch.Generator().manual_seed(0))
    partition = tile(10, 3, 3, 1)
    sharded = ShardedBlend()
    assert torch.equal(sharded(_analytic, x, 7, partition, 2), blend(_analytic, x, 7, partition, 2))  # no group
    assert sharded.calls == 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = sharded(_analytic, x, 7, partition, 2)
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, blend(_analytic, x, 7, partition, 2))
    assert sharded.calls == 1 and sharded.reduced_bytes == x.numel() * 4


@pytest.mark.parametrize("n, world", [(1, 2), (2, 2), (5, 2), (7, 3)])
def test_inputs_are_shared_round_robin_and_merged_in_input_order(n, world):
    items = list(range(n))
    shares = [share_inputs(items, rank, world) for rank in range(world)]
    assert shares[0] == items[0::world] and sum(map(len, shares)) == n
    assert merge_shares(shares) == items
    with pytest.raises(ValueError, match="rank must be in"):
        share_inputs(items, world, world)


def test_parallel_setting_and_its_rule():
    with pytest.raises(ValueError, match=r"parallel must be one of .*multi_gpu_inference.json.*'rows'"):
        DistributedRun("rows")
    sharded = ShardedBlend()
    run = DistributedRun("auto", sharded)
    assert run.share([{"name": "a"}]) == [{"name": "a"}] and run.mode == "slabs" and sharded.enabled
    assert len(run.share([{"name": "a"}, {"name": "b"}])) == 2  # one process: its share is everything
    assert run.mode == "inputs" and not sharded.enabled  # several inputs: each reconstructed whole
    assert run.writes


def _run(tmp: Path, out: str, launcher: list[str], configs: str, **settings) -> subprocess.CompletedProcess:
    settings = {"output_dir": str(tmp / out), "device": "cpu", "progress": False, "image_size": 32, "save_png": False,
                "method": "dbpp", "steps": 3, "batch_size": 1, "seed": 3, **settings}  # fmt: skip
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", configs]
    for key, value in settings.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _one_and_two(tmp: Path, **settings) -> tuple[Path, Path]:
    _run(tmp, "one", [sys.executable], "configs/inference.json", **settings)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run(tmp, "two", torchrun, CONFIGS, **settings)
    return tmp / "one", tmp / "two"


def _difference(a: Path, b: Path) -> float:
    """Max abs difference of two written reconstructions in normalised attenuation (HU / HU_PER_UNIT)."""
    x, y = (np.asarray(nib.load(str(p)).dataobj, dtype=np.float64) for p in (a, b))
    assert x.shape == y.shape
    return float(np.abs(x - y).max()) / HU_PER_UNIT


def test_two_processes_reconstruct_one_volume_as_one_process(tmp_path):
    """DiffusionBlend++ with the shipped weights: each step's slabs shared by two gloo processes (one thread each)."""
    crop = write_crop(tmp_path / "crop.nii.gz", xy=32, slices=8)
    one, two = _one_and_two(tmp_path, input_path=str(crop))
    assert sorted(p.name for p in two.iterdir()) == ["crop_recon.nii.gz", "metrics.json"]  # process 0's set, nothing staged left
    assert _difference(one / "crop_recon.nii.gz", two / "crop_recon.nii.gz") <= 1e-5
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["parallel"] == "slabs" and m2["processes"] == 2 and "ShardedBlend(processes=2)" in m2["inferer"]
    # 8 slices at batch size 1: 3 or 4 slabs a step, so process 0 ran about half of the network calls
    assert m1["network_calls"] // 2 <= m2["network_calls"] < m1["network_calls"]
    assert abs(m1["psnr_3d"] - m2["psnr_3d"]) < 1e-3


def test_two_processes_share_a_folder_as_one_process(tmp_path):
    """Three inputs over two processes: each reconstructs its inputs whole; process 0 writes every result, in order."""
    (tmp_path / "scans").mkdir()
    inputs = [write_crop(tmp_path / "scans" / f"{n}.nii.gz", xy=xy, slices=z) for n, xy, z in (("a", 24, 6), ("b", 32, 5), ("c", 16, 4))]
    one, two = _one_and_two(tmp_path, input_dir=str(tmp_path / "scans"), steps=2)
    names = ["a_recon.nii.gz", "b_recon.nii.gz", "c_recon.nii.gz", "metrics.json"]
    assert sorted(p.name for p in two.iterdir()) == names  # process 1's b moved into process 0's set
    for name in names[:3]:
        assert _difference(one / name, two / name) <= 1e-5, name
    r1, r2 = (json.loads((d / "metrics.json").read_text())["results"] for d in (one, two))
    assert [r["input"] for r in r2] == [str(p) for p in inputs]
    assert all(r["parallel"] == "inputs" and r["processes"] == 2 for r in r2)
    assert [r["network_calls"] for r in r2] == [r["network_calls"] for r in r1]  # each volume whole on its process
    assert [round(r["psnr_3d"], 4) for r in r2] == [round(r["psnr_3d"], 4) for r in r1]
