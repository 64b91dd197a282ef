"""Bad inputs and settings of the reconstruction CLI (``python -m monai.bundle run``): each a clear error, or its override.

Sinograms are recognised by their geometry JSON whatever their suffix; a diffusion method needs
loadable weights and records them; implausible sinograms, angles and non-HU volumes are refused
unless ``allow_implausible`` is set; settings are range-checked before any work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.physics.geometry import sparse_view
from bundle.networks import SlabDenoiser
from bundle.physics.operators import make_operator
from bundle.workflows.inference import Reconstruction
from bundle.transforms.sinogram import find_sinogram_geometry, save_sinogram
from tests.conftest import ROOT, TINY_NETWORK, subprocess_env, write_crop


def bundle_run(tmp: Path, *, config_file: str = "configs/inference.json", **settings) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the inference config on CPU, output in ``tmp/out`` unless given."""
    settings = {"output_dir": str(tmp / "out"), "device": "cpu", "progress": False, "image_size": 32, **settings}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file]
    for key, value in settings.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )


def failed_with(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Assert the run failed and its output's last lines say every one of ``parts``; the output."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    tail = "\n".join(output.strip().splitlines()[-3:])
    for part in parts:
        assert part in tail, f"{part!r} not in the last lines:\n{tail}"
    return output


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A 24 x 24 x 4 crop, a tiny k=3 checkpoint, and a 6-view sinogram of a phantom (with its geometry)."""
    tmp = tmp_path_factory.mktemp("checks")
    crop = write_crop(tmp / "crop.nii.gz", xy=24, slices=4)
    torch.manual_seed(0)
    tiny = {k: v for k, v in TINY_NETWORK["network_def"].items() if k != "_target_"}
    tiny.update(slab_size=3, separations=(1, 2, 3))
    torch.save(SlabDenoiser(**tiny).state_dict(), tmp / "tiny.pt")
    geometry = sparse_view(6, (4, 16, 16), (3.0, 3.0, 3.0))
    phantom = torch.zeros(geometry.vol_shape)
    phantom[:, 4:12, 5:11] = 0.3
    sino = make_operator(geometry)(phantom)
    return {"dir": tmp, "crop": crop, "ckpt": tmp / "tiny.pt", "geometry": geometry, "sino": sino}


# -- sinograms are recognised by their geometry JSON -------------------------------------------------


def test_nifti_sinogram_with_geometry_beside_it_is_a_sinogram(work, tmp_path):
    save_sinogram(tmp_path / "scan.nii.gz", work["sino"], work["geometry"])
    ok(bundle_run(tmp_path, input_path=str(tmp_path / "scan.nii.gz"), method="sirt"))
    recon = nib.load(str(tmp_path / "out" / "scan_recon.nii.gz"))
    assert recon.shape == (16, 16, 4)  # the geometry's grid, not the file's (Z, views, bins) array
    assert "psnr_3d" not in json.loads((tmp_path / "out" / "metrics.json").read_text())  # no ground truth

    proc = bundle_run(tmp_path, input_path=str(tmp_path / "scan.nii.gz"), method="sirt", input_kind="volume")
    failed_with(proc, "scan.nii.gz", "is a sinogram", "takes CT volumes")
    failed_with(bundle_run(tmp_path, input_path=str(work["crop"]), method="fbp", input_kind="sinogram"), "crop.nii.gz", "takes sinograms")


def test_find_sinogram_geometry(work, tmp_path):
    save_sinogram(tmp_path / "scan.npy", work["sino"], work["geometry"])
    assert find_sinogram_geometry(tmp_path / "scan.npy") == tmp_path / "scan.json"
    assert find_sinogram_geometry(work["crop"]) is None
    (tmp_path / "ct.json").write_text(json.dumps({"Modality": "CT"}))  # a dcm2niix sidecar is no geometry
    (tmp_path / "ct.nii.gz").write_bytes(work["crop"].read_bytes())
    assert find_sinogram_geometry(tmp_path / "ct.nii.gz") is None
    with pytest.raises(ValueError, match="geometry_path .*missing.json.* does not exist"):
        find_sinogram_geometry(tmp_path / "ct.nii.gz", tmp_path / "missing.json")


def test_npy_without_geometry_names_the_file(work, tmp_path):
    np.save(tmp_path / "lonely.npy", work["sino"].numpy())
    failed_with(bundle_run(tmp_path, input_path=str(tmp_path / "lonely.npy"), method="fbp"), "lonely.npy", "no geometry")


# -- weights --------------------------------------------------------------------------------------------


def test_diffusion_method_needs_weights_and_records_them(work, tmp_path):
    common = dict(input_path=str(work["crop"]), steps=2, **TINY_NETWORK)
    failed_with(bundle_run(tmp_path, ckpt_path="", **common), "ckpt_path", "needs the trained weights")
    failed_with(bundle_run(tmp_path, ckpt_path=str(tmp_path / "none.pt"), **common), "ckpt_path", "none.pt", "does not exist")
    assert not (tmp_path / "out" / "metrics.json").exists()
    ok(bundle_run(tmp_path, ckpt_path=str(work["ckpt"]), **common))
    weights = json.loads((tmp_path / "out" / "metrics.json").read_text())["weights"]
    assert weights["path"] == str(work["ckpt"])
    assert weights["sha256"] == hashlib.sha256(work["ckpt"].read_bytes()).hexdigest()


# -- plausibility, with the override --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("negative", "not negative"),
        ("counts", "raw detector counts"),
        ("degrees", "look like degrees"),
    ],
)
def test_implausible_sinogram_is_refused_unless_allowed(work, tmp_path, case, message):
    sino, geometry = work["sino"], work["geometry"]
    if case == "negative":
        sino = -sino
    elif case == "counts":
        sino = 1e5 * torch.exp(-sino * 0.0576)
    else:
        geometry = geometry.replace(angles=tuple(float(a) for a in np.arange(6) * 30.0))
    save_sinogram(tmp_path / "scan.npy", sino, geometry)
    failed_with(bundle_run(tmp_path, input_path=str(tmp_path / "scan.npy"), method="fbp"), "scan", message, "allow_implausible")
    if case == "negative":  # the override runs it
        ok(bundle_run(tmp_path, input_path=str(tmp_path / "scan.npy"), method="fbp", allow_implausible=True))


def test_volume_not_in_hu_is_refused_unless_allowed(work, tmp_path):
    source = nib.load(str(work["crop"]))
    mri = np.asarray(source.dataobj).astype(np.float32) + 1024.0  # unrescaled DICOM: stored values, no intercept
    nib.save(nib.Nifti1Image(mri, source.affine), str(tmp_path / "raw.nii.gz"))
    failed_with(bundle_run(tmp_path, input_path=str(tmp_path / "raw.nii.gz"), method="fbp"), "raw.nii.gz", "in HU", "allow_implausible")
    ok(bundle_run(tmp_path, input_path=str(tmp_path / "raw.nii.gz"), method="fbp", allow_implausible="true"))


# -- settings and devices -------------------------------------------------------------------------------


def test_out_of_range_settings_name_the_setting(work, tmp_path):
    failed_with(bundle_run(tmp_path, input_path=str(work["crop"]), ckpt_path=str(work["ckpt"]), eta=2, **TINY_NETWORK), "eta", "<= 1")
    if not torch.cuda.is_available():
        failed_with(bundle_run(tmp_path, input_path=str(work["crop"]), method="fbp", device="cuda"), "device", "CUDA is not available")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("views", 0, "views must be an integer >= 1"),
        ("photons", -5, "photons must be a number > 0"),
        ("seed", -1, "seed must be an integer >= 0"),
        ("seed", 1.5, "seed must be an integer"),
        ("samples", 0, "samples must be an integer >= 1"),
        ("steps", 0, "steps must be an integer >= 1"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("cg_iterations", -1, "cg_iterations must be an integer >= 0"),
        ("eta", -0.1, "eta must be a number >= 0 and <= 1"),
        ("step_degrees", 0, "step_degrees must be a number > 0"),
    ],
)
def test_setting_ranges(work, setting, value, message):
    from bundle.recon.inferers import make_inferer

    inferer_settings = {"steps": 2, "batch_size": 4, "cg_iterations": 1, "eta": 0.5}
    acquisition = {}
    if setting in inferer_settings:
        inferer_settings[setting] = value
    else:
        acquisition[setting] = value
    with pytest.raises(ValueError, match=message):
        Reconstruction(work["crop"], work["dir"] / "unused", lambda d: d, make_inferer("dbpp", **inferer_settings), **acquisition)


# -- unreadable volumes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "message"), [("4d", "a 4D image"), ("empty_dicom", "empty folder"), ("truncated", "cannot be read")])
def test_unreadable_volume_names_the_file(work, tmp_path, case, message):
    if case == "4d":
        source = nib.load(str(work["crop"]))
        data = np.stack([np.asarray(source.dataobj)] * 2, axis=-1)
        nib.save(nib.Nifti1Image(data, source.affine), str(tmp_path / "series.nii.gz"))
        path = tmp_path / "series.nii.gz"
    elif case == "empty_dicom":
        path = tmp_path / "dicom_series"
        path.mkdir()
    else:
        raw = gzip.decompress(work["crop"].read_bytes())
        path = tmp_path / "cut.nii.gz"
        path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    failed_with(bundle_run(tmp_path, input_path=str(path), method="fbp"), path.name, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
