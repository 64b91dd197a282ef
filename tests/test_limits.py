"""The size guard (bundle.limits): estimates, the configurable limit, and refusals at every entry point before allocating."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle.physics.geometry import load_json, sparse_view
from bundle.limits import (
    GB,
    MEMORY_LIMIT_ENV,
    ResourceLimitError,
    check_geometry_size,
    check_memory,
    estimate_memory_bytes,
    memory_limit_bytes,
    total_memory_bytes,
)
from tests.conftest import write_crop
from tests.test_input_checks import bundle_run, failed_with


def test_estimate_grows_with_views_volume_and_method():
    small = estimate_memory_bytes((8, 128, 128), 8, 182, "fbp")
    assert estimate_memory_bytes((8, 128, 128), 800, 182, "fbp") > small
    assert estimate_memory_bytes((8, 256, 256), 8, 363, "fbp") > small
    assert estimate_memory_bytes((8, 128, 128), 8, 182, "dbpp") > small
    assert estimate_memory_bytes((8, 128, 128), 8, 182, "dbpp", samples=4) > estimate_memory_bytes((8, 128, 128), 8, 182, "dbpp")
    assert small < 2 * GB  # the default run of the shipped sample fits any machine
    assert estimate_memory_bytes((4, 1024, 1024), 8, 1449, "dbpp") > 10 * GB
    assert estimate_memory_bytes((100000, 100000, 100000), 10**9, 10**6, "tv") > 10**21  # Python ints, no overflow


def test_limit_setting_then_environment_then_machine(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    assert memory_limit_bytes() == int(0.5 * total_memory_bytes())
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "3")
    assert memory_limit_bytes() == 3 * GB
    assert memory_limit_bytes(1.5) == int(1.5 * GB)
    assert memory_limit_bytes("null") == 3 * GB
    with pytest.raises(ValueError, match="memory_limit_gb must be a number of GB > 0"):
        memory_limit_bytes(-1)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=MEMORY_LIMIT_ENV):
        memory_limit_bytes()


def test_refusal_gives_estimate_limit_and_what_to_change():
    with pytest.raises(ResourceLimitError, match=r"dbpp here needs an estimated 2\.0 GB .* limit of 1\.0 GB: use fewer views.*memory_limit_gb"):
        check_memory(2 * GB, "dbpp here", GB)
    check_memory(GB, "fits", GB)


def test_huge_geometry_json_is_refused_on_loading(tmp_path):
    d = sparse_view(8, (1, 16, 16)).to_dict()
    d["vol_shape"] = [4, 100000, 100000]
    (tmp_path / "huge.json").write_text(json.dumps(d))
    with pytest.raises(ResourceLimitError, match="huge.json.*100000 x 100000.*GB"):
        load_json(tmp_path / "huge.json")
    geometry = sparse_view(8, (4, 32, 32))
    assert check_geometry_size(geometry) < GB


def test_cli_refuses_many_views_and_a_large_dbpp_before_allocating(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    out = failed_with(bundle_run(tmp_path, input_path=str(crop), method="fbp", views=100000), "views", "GB", "limit")
    assert "100000 views" in out
    failed_with(bundle_run(tmp_path, input_path=str(crop), method="fbp", arc_degrees=90.0, step_degrees=1e-7), "900000000 views", "GB")

    big = np.full((1024, 1024, 4), -1000, dtype=np.int16)
    big[300:700, 300:700] = 40
    nib.save(nib.Nifti1Image(big, np.diag([3.0, 3.0, 3.0, 1.0])), str(tmp_path / "big.nii.gz"))
    failed_with(bundle_run(tmp_path, input_path=str(tmp_path / "big.nii.gz"), method="dbpp"), "dbpp", "1024 x 1024", "memory_limit_gb")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_limit_is_configurable(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    failed_with(bundle_run(tmp_path, input_path=str(crop), method="fbp", memory_limit_gb=0.01), "limit of 0.0 GB")


def test_sinogram_geometry_too_large_is_refused(tmp_path):
    d = sparse_view(8, (1, 16, 16)).to_dict()
    d["vol_shape"] = [4, 100000, 100000]
    (tmp_path / "scan.json").write_text(json.dumps(d))
    np.save(tmp_path / "scan.npy", np.zeros((4, 8, 23), np.float32))
    failed_with(bundle_run(tmp_path, input_path=str(tmp_path / "scan.npy"), method="fbp"), "scan.json", "GB")


def test_evaluation_refuses_an_oversized_cell_before_running_any(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    proc = bundle_run(
        tmp_path,
        config_file="['configs/inference.json', 'configs/evaluate.json']",
        eval_volumes=[str(crop)],
        eval_methods=["fbp"],
        eval_settings=[{"name": "few", "views": 4}, {"name": "many", "views": 100000}],
        eval_dir=str(tmp_path / "eval"),
    )
    failed_with(proc, "evaluation cell crop | many | fbp", "GB")
    assert not (tmp_path / "eval" / "crop" / "few").exists()  # refused before the first cell ran
