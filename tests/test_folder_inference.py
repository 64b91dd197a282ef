"""Inference the MONAI way: a folder or a datalist of inputs reconstructs with one ``monai.bundle run`` command.

Each output lies on its input's grid with its affine (the config's ``Invertd``), written by MONAI's
``SaveImage`` in HU (float32, millimetres); ``metrics.json`` lists every input's metrics.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.transforms.sinogram import save_sinogram
from tests.conftest import ROOT, write_crop
from tests.test_input_checks import bundle_run, failed_with, ok


def _two_volumes(folder):
    """Two crops of the sample with different grids and affines (one off-centre, one with 5 slices)."""
    folder.mkdir()
    a = write_crop(folder / "a.nii.gz", xy=24, slices=4)
    img = nib.load(str(a))
    data = np.asarray(nib.load(str(ROOT / "sample" / "sample_ct.nii.gz")).dataobj)[40:60, 50:78, 10:15]
    affine = img.affine.copy()
    affine[:3, 3] += [7.0, -5.0, 12.0]
    nib.save(nib.Nifti1Image(data, affine), str(folder / "b.nii.gz"))
    (folder / "notes.txt").write_text("not an input")
    return [a, folder / "b.nii.gz"]


def test_a_folder_reconstructs_with_one_command_on_each_inputs_grid(tmp_path):
    inputs = _two_volumes(tmp_path / "scans")
    ok(bundle_run(tmp_path, input_dir=str(tmp_path / "scans"), method="sirt", save_png=False))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a_recon.nii.gz", "b_recon.nii.gz", "metrics.json"]
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["input"] for r in results] == [str(p) for p in inputs]
    for path, metrics in zip(inputs, results):
        source, recon = nib.load(str(path)), nib.load(str(out / f"{path.name[:-7]}_recon.nii.gz"))
        assert recon.shape == source.shape
        np.testing.assert_allclose(recon.affine, source.affine, atol=1e-4)
        assert recon.get_data_dtype() == np.float32 and recon.header.get_xyzt_units()[0] == "mm"
        assert recon.header["descrip"].tobytes().rstrip(b"\0") == b"HU"
        assert metrics["method"] == "sirt" and metrics["psnr_3d"] > 15.0, metrics
        values = np.asarray(recon.dataobj)
        assert -1100 < values.min() and values.max() < 4000  # written in HU


def test_an_empty_or_missing_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    failed_with(bundle_run(tmp_path, input_dir=str(tmp_path / "empty"), method="fbp"), "input_dir", "empty", "holds no CT volume")
    failed_with(bundle_run(tmp_path, input_dir=str(tmp_path / "none"), method="fbp"), "input_dir", "does not exist")


def test_a_datalist_of_a_volume_and_a_sinogram(tmp_path):
    """The ``testing`` entries of a datalist, of both kinds: the sinogram's output lies on its geometry's grid."""
    volume = write_crop(tmp_path / "ct.nii.gz", xy=24, slices=4)
    geometry = sparse_view(6, (4, 16, 16), (3.0, 3.0, 3.0))
    phantom = torch.zeros(geometry.vol_shape)
    phantom[:, 4:12, 5:11] = 0.3
    save_sinogram(tmp_path / "scan.npy", make_operator(geometry)(phantom), geometry)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": "ct.nii.gz"}, {"image": "scan.npy"}]}))
    out = tmp_path / "out"
    run(config_file=str(ROOT / "configs" / "inference.json"), datalist=str(datalist), output_dir=str(out),
        method="fbp", samples=2, device="cpu", progress=False, image_size=32)  # fmt: skip
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["input"] for r in results] == [str(volume), str(tmp_path / "scan.npy")]
    assert "psnr_3d" in results[0] and "psnr_3d" not in results[1]  # no ground truth for a measured sinogram
    assert nib.load(str(out / "ct_recon.nii.gz")).shape == nib.load(str(volume)).shape
    assert nib.load(str(out / "ct_std.nii.gz")).shape == nib.load(str(volume)).shape
    assert nib.load(str(out / "scan_recon.nii.gz")).shape == (16, 16, 4)


def test_the_configured_invertd_is_the_one_applied():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "device": "cpu"})
    reconstruction = parser.get_parsed_content("reconstruction")
    postprocessing = parser.get_parsed_content("postprocessing")
    assert reconstruction.postprocessing is postprocessing
    assert postprocessing.transforms[0].transform is parser.get_parsed_content("preprocessing")


def test_inputs_with_the_same_name_are_refused(tmp_path):
    write_crop(tmp_path / "ct.nii.gz", xy=24, slices=4)
    (tmp_path / "other").mkdir()
    write_crop(tmp_path / "other" / "ct.nii.gz", xy=24, slices=4)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": "ct.nii.gz"}, {"image": "other/ct.nii.gz"}]}))
    from bundle.workflows.sources import list_inputs

    with pytest.raises(ValueError, match=r"inputs named \['ct'\] occur more than once"):
        list_inputs(datalist=datalist)
    with pytest.raises(ValueError, match="not both"):
        list_inputs(input_dir=tmp_path, datalist=datalist)
