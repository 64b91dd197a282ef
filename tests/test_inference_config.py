"""Smoke runs of configs/inference.json through monai.bundle on a small crop of the sample, and bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

from bundle.networks import SlabDenoiser

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "inference.json")
TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}
TINY_OVERRIDES = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, False],
    "network_def#num_head_channels": 8,
    "network_def_2d#channels": [8, 16],
    "network_def_2d#attention_levels": [False, False],
    "network_def_2d#num_head_channels": 8,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A 24 x 20 x 7 crop of the sample (7 slices: not a multiple of 3), tiny checkpoints for k=3 and k=1."""
    tmp = tmp_path_factory.mktemp("inference")
    img = nib.load(str(ROOT / "sample" / "sample_ct.nii.gz"))
    start = np.array([45, 40, 15])
    crop = np.asarray(img.dataobj)[45:69, 40:60, 15:22]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ start + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(crop, affine), str(tmp / "crop.nii.gz"))
    torch.manual_seed(0)
    torch.save(SlabDenoiser(slab_size=3, **TINY).state_dict(), tmp / "tiny.pt")
    torch.save(SlabDenoiser(slab_size=1, separations=(1,), **TINY).state_dict(), tmp / "tiny_2d.pt")
    return {"dir": tmp, "crop": tmp / "crop.nii.gz", "ckpt": tmp / "tiny.pt", "ckpt_2d": tmp / "tiny_2d.pt"}


class raises:
    """Like ``pytest.raises``, but also matches the cause of MONAI's "Failed to evaluate" RuntimeError wrapper."""

    def __init__(self, kind: type[BaseException], match: str) -> None:
        self.kind, self.match = kind, match

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert exc is not None, f"{self.kind.__name__} was not raised"
        while exc is not None and not isinstance(exc, self.kind):
            exc = exc.__cause__
        assert exc is not None, f"{self.kind.__name__} was not raised"
        assert re.search(self.match, str(exc)), f"{str(exc)!r} does not match {self.match!r}"
        return True


def _run(data: dict[str, Path], out: Path, config_file=CONFIG, **overrides) -> dict:
    settings = {
        "input_path": str(data["crop"]),
        "output_dir": str(out),
        "ckpt_path": str(data["ckpt"]),
        "ckpt_path_2d": str(data["ckpt_2d"]),
        "device": "cpu",
        "steps": 3,
        "image_size": 32,
        "progress": False,
        **TINY_OVERRIDES,
        **overrides,
    }
    run(config_file=config_file, **settings)
    return json.loads((out / "metrics.json").read_text())


def test_default_method_writes_outputs_on_the_input_grid(data, tmp_path):
    metrics = _run(data, tmp_path)
    source, recon = nib.load(str(data["crop"])), nib.load(str(tmp_path / "crop_recon.nii.gz"))
    assert recon.shape == source.shape
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)
    assert np.isfinite(recon.get_fdata()).all()
    assert (tmp_path / "crop_views.png").stat().st_size > 0
    assert metrics["method"] == "dbpp" and metrics["nfe"] == 3 and metrics["network_calls"] >= 3
    for key in ("psnr_3d", "ssim_3d", "mae_body_hu", "psnr_axial", "psnr_coronal", "psnr_sagittal", "ssim_sagittal", "seconds", "peak_memory_mb"):
        assert np.isfinite(metrics[key]), key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # the complete record (issue 16): version, weights, every acquisition and sampler setting, device, precision
    import bundle

    assert metrics["bundle_version"] == bundle.__version__
    assert metrics["weights"]["setting"] == "ckpt_path" and len(metrics["weights"]["sha256"]) == 64
    assert metrics["acquisition"] == {"views": 8, "arc_degrees": 180.0, "step_degrees": 1.0, "beam": "parallel",
                                      "photons": None, "electronic_noise": 0.0}
    settings = metrics["method_settings"]
    assert (settings["steps"], settings["eta"], settings["slab_size"]) == (3, 0.85, 3)
    assert "ZTVDataConsistency(iterations=5, admm_iterations=1, rho=0.003" in settings["data_consistency"] and "NoiseSchedule(" in settings["noise_schedule"]
    assert metrics["device"] == "cpu" and metrics["precision"] in ("fp32", "bf16")
    assert metrics["memory_kind"] == "cpu_rss" and metrics["nfe"] == 3


@pytest.mark.parametrize("method", ["mbir", "fbp"])
def test_other_methods(data, tmp_path, method):
    metrics = _run(data, tmp_path, method=method, steps=2)
    assert metrics["method"] == method
    assert (tmp_path / "crop_recon.nii.gz").is_file()
    assert "object at 0x" not in metrics["inferer"] and metrics["inferer"].startswith(("DiffusionBlendInferer(", "FBPInferer("))
    if method == "fbp":
        assert metrics["method_settings"] == {"filter_name": "ram-lak", "cutoff": 1.0}


def test_samples_write_mean_and_std(data, tmp_path):
    metrics = _run(data, tmp_path, samples=2, steps=2, photons=1e5, arc_degrees=90.0, step_degrees=10.0)
    std = nib.load(str(tmp_path / "crop_std.nii.gz"))
    assert std.shape == nib.load(str(data["crop"])).shape and float(std.get_fdata().max()) > 0
    assert metrics["samples"] == 2 and metrics["nfe"] == 4
    assert len(metrics["geometry"]["angles"]) == 9


def test_quality_overlay(data, tmp_path):
    """configs/inference_quality.json over inference.json: the posterior mean of 4 samples at 100 steps."""
    overlay = str(ROOT / "configs" / "inference_quality.json")
    settings = json.loads(Path(overlay).read_text())
    assert settings == {"steps": 100, "samples": 4}
    metrics = _run(data, tmp_path, config_file=[CONFIG, overlay], steps=2)  # steps cut for CI; samples from the overlay
    assert metrics["samples"] == 4 and metrics["nfe"] == 8
    assert (tmp_path / "crop_std.nii.gz").is_file()


def test_progress_false_as_the_command_line_gives_it(data, tmp_path, capfd):
    """``--progress false`` arrives as the string "false" and must turn the bar off."""
    _run(data, tmp_path, steps=2, progress="false")
    assert "DiffusionBlend:" not in capfd.readouterr().err


def test_warm_start_from_the_command_line(data, tmp_path):
    metrics = _run(data, tmp_path, steps=4, warm_start=0.5, warm_start_method="fbp")
    assert metrics["nfe"] == 2 and (tmp_path / "crop_recon.nii.gz").is_file()


def test_sinogram_input(data, tmp_path):
    from bundle.physics.geometry import sparse_view
    from bundle.physics.operators import make_operator

    geometry = sparse_view(6, (5, 16, 16), (3.0, 3.0, 3.0))
    x = torch.zeros(geometry.vol_shape)
    x[:, 4:12, 5:11] = 0.3
    np.save(tmp_path / "scan.npy", make_operator(geometry)(x).numpy())
    geometry.to_json(tmp_path / "scan.json")
    _run(data, tmp_path / "out", input_path=str(tmp_path / "scan.npy"), method="sirt")
    recon = nib.load(str(tmp_path / "out" / "scan_recon.nii.gz"))
    assert recon.shape == (16, 16, 5)
    np.testing.assert_allclose(np.diag(recon.affine)[:3], [3.0, 3.0, 3.0])


def test_sinogram_geometry_mismatch_names_the_files(data, tmp_path):
    from bundle.physics.geometry import sparse_view

    sparse_view(6, (5, 16, 16), (3.0, 3.0, 3.0)).to_json(tmp_path / "scan.json")
    np.save(tmp_path / "scan.npy", np.zeros((5, 7, 23), dtype=np.float32))
    with raises(ValueError, "scan.npy.*scan.json"):
        _run(data, tmp_path / "out", input_path=str(tmp_path / "scan.npy"), method="fbp")
    assert not (tmp_path / "out" / "scan_recon.nii.gz").exists()


def test_missing_input(data, tmp_path):
    with raises(FileNotFoundError, "nowhere.nii.gz"):
        _run(data, tmp_path, input_path=str(tmp_path / "nowhere.nii.gz"))


def test_nan_input(data, tmp_path):
    img = nib.load(str(data["crop"]))
    values = np.asarray(img.dataobj).astype(np.float32)
    values[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(values, img.affine), str(tmp_path / "nan.nii.gz"))
    with raises(ValueError, "nan.nii.gz.*NaN"):
        _run(data, tmp_path / "out", input_path=str(tmp_path / "nan.nii.gz"))


def test_checkpoint_for_another_slab_size(data, tmp_path):
    with raises(ValueError, "tiny_2d.pt"):
        _run(data, tmp_path, ckpt_path=str(data["ckpt_2d"]))


def test_unknown_method(data, tmp_path):
    with raises(ValueError, "unknown reconstruction method"):
        _run(data, tmp_path, method="magic")


def test_atomic_write_leaves_no_partial_nifti(tmp_path, monkeypatch):
    from bundle.io import save_nifti

    target = tmp_path / "x_recon.nii.gz"
    save_nifti(np.zeros((4, 4, 4)), np.eye(4), target)
    before = target.read_bytes()

    def broken(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.ones((4, 4, 4)), np.eye(4), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_recon.nii.gz"]
    with pytest.raises(ValueError, match="NaN"):
        save_nifti(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path / "nan_recon.nii.gz")
    assert not (tmp_path / "nan_recon.nii.gz").exists()


def test_evaluate_config_writes_one_table(data, tmp_path):
    run(
        config_file=[CONFIG, str(ROOT / "configs" / "evaluate.json")],
        eval_volumes=[str(data["crop"])],
        eval_methods=["fixed", "fbp"],
        eval_settings=[{"name": "6 views", "views": 6}, {"name": "90 degrees", "arc_degrees": 90.0, "step_degrees": 15.0, "photons": 1e5}],
        eval_dir=str(tmp_path),
        ckpt_path=str(data["ckpt"]),
        ckpt_path_2d=str(data["ckpt_2d"]),
        device="cpu",
        steps=2,
        image_size=32,
        progress=False,
        **TINY_OVERRIDES,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["setting"], r["method"]) for r in rows] == [
        ("6 views", "fixed"), ("6 views", "fbp"), ("90 degrees", "fixed"), ("90 degrees", "fbp")
    ]
    assert all(np.isfinite(r["psnr_3d"]) for r in rows)
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("volume,setting,method,psnr_3d,ssim_3d")
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "crop" / "90_degrees" / "fbp" / "crop_recon.nii.gz").is_file()
