"""scripts/support_check.py: the hull's safety counts on a synthetic volume, and its error for a missing file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("support_check", ROOT / "scripts" / "support_check.py")
support_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(support_check)


def test_a_body_in_air_stays_inside_the_hull_and_the_air_around_it_is_removed(tmp_path, capsys):
    yy, xx = np.meshgrid(np.arange(40) - 19.5, np.arange(40) - 19.5, indexing="ij")
    hu = np.where((yy**2 + xx**2) <= 12**2, 40.0, -1000.0)[:, :, None].repeat(4, axis=2).astype(np.float32)
    path = tmp_path / "disc.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    support_check.main([str(path), "--thresholds", "0.003", "--views", "8", "4"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["views"] for r in rows] == [8, 4]
    for row in rows:
        assert row["shape"] == [4, 40, 40] and row["body_voxels_outside"] == 0
        assert 0.3 < row["air_removed"] < 1.0
    assert rows[0]["air_removed"] > rows[1]["air_removed"], "more views carve more air"


def test_a_missing_volume_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*nothere.nii.gz: no such file"):
        support_check.main([str(tmp_path / "nothere.nii.gz")])
