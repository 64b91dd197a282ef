"""scripts/error_by_region.py: region masks and errors on a synthetic phantom, and its command line."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import error_by_region  # noqa: E402


def _phantom(shape=(24, 24, 8)) -> np.ndarray:
    """Air around a soft-tissue cylinder (40 HU) with a fat ring (-100 HU) and a bone rod (700 HU)."""
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    r = np.hypot(x, y)
    slice_ = np.full(shape[:2], -1000.0)
    slice_[r < 9] = -100.0
    slice_[r < 7] = 40.0
    slice_[r < 2] = 700.0
    return np.repeat(slice_[:, :, None], shape[2], axis=2).astype(np.float32)


def test_regions_partition_the_volume():
    ref = _phantom()
    masks = error_by_region.regions(ref, shell=2, bands=4)
    tissues = sum(masks[name].astype(int) for name in error_by_region.TISSUES)
    assert (tissues == 1).all()  # the four tissue classes cover every voxel once
    body = ref > -500
    edge, interior = masks["body edge (outer 2 voxels)"], masks["body interior"]
    assert not (edge & interior).any() and ((edge | interior) == body).all()
    assert not (masks["air shell (2 voxels outside the body)"] & body).any()
    bands = [m for name, m in masks.items() if name.startswith("body, slices")]
    assert len(bands) == 4 and (sum(b.astype(int) for b in bands) == body.astype(int)).all()


def test_a_blurred_outline_shows_at_the_edge_not_inside():
    ref = _phantom()
    blurred = ndimage.gaussian_filter(ref, sigma=(1.0, 1.0, 0.0))
    blurred[ndimage.binary_erosion(ref > -500, iterations=4)] = ref[ndimage.binary_erosion(ref > -500, iterations=4)]
    errors = error_by_region.region_errors(ref, blurred, error_by_region.regions(ref, shell=2, bands=2))
    assert errors["body edge (outer 2 voxels)"] > 50.0
    assert errors["body interior"] < errors["body edge (outer 2 voxels)"] / 2
    assert error_by_region.region_errors(ref, ref, error_by_region.regions(ref))["body interior"] == 0.0


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "error_by_region.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, check=False)


def _save(path, volume):
    nib.save(nib.Nifti1Image(volume, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


def test_command_prints_one_column_per_reconstruction(tmp_path):
    ref = _phantom()
    ref_path = _save(tmp_path / "ref.nii.gz", ref)
    a = _save(tmp_path / "a.nii.gz", ref + 10.0)
    done = _run(ref_path, f"a={a}", f"b={ref_path}", "--bands", 2)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| body interior")]
    assert rows and rows[0].endswith("| 10.0 | 0.0 |")
    assert sum(line.startswith("| body, slices") for line in done.stdout.splitlines()) == 2


@pytest.mark.parametrize("case", ["shape", "missing", "no_name"])
def test_bad_input_names_the_file_or_argument(tmp_path, case):
    ref_path = _save(tmp_path / "ref.nii.gz", _phantom())
    other = {"shape": f"a={_save(tmp_path / 'small.nii.gz', _phantom((12, 12, 8)))}",
             "missing": f"a={tmp_path / 'nope.nii.gz'}", "no_name": str(ref_path)}[case]
    done = _run(ref_path, other)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    expected = {"shape": "small.nii.gz: shape (12, 12, 8) differs", "missing": "nope.nii.gz: no such file",
                "no_name": "give each reconstruction as NAME=PATH"}[case]
    assert expected in last
