"""Shared fixtures: the shipped sample, tiny crops of it, and the repository root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "sample_ct.nii.gz"

# A tiny network with the shipped model's structure: fast enough for CPU smoke runs.
TINY_NETWORK = {
    "network_def": {
        "_target_": "bundle.networks.SlabDenoiser",
        "slab_size": "@slab_size",
        "separations": "@separations",
        "channels": [8, 16],
        "attention_levels": [False, True],
        "norm_num_groups": 8,
        "num_head_channels": 8,
    }
}


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def sample_path() -> Path:
    assert SAMPLE.is_file(), f"the shipped sample {SAMPLE} is missing (scripts/make_sample.py makes it)"
    return SAMPLE


def write_crop(path: Path, xy: int = 32, slices: int = 8, hu: np.ndarray | None = None) -> Path:
    """Write a centred crop of the sample (xy x xy x slices voxels, 3 mm) as NIfTI."""
    img = nib.load(SAMPLE)
    data = np.asarray(img.dataobj) if hu is None else hu
    x0 = max(0, (data.shape[0] - xy) // 2)
    y0 = max(0, (data.shape[1] - xy) // 2)
    crop = data[x0:x0 + xy, y0:y0 + xy, :slices]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([x0, y0, 0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(crop, affine), path)
    return path


def subprocess_env() -> dict:
    """Environment for child processes: one thread each, the package importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    return env
