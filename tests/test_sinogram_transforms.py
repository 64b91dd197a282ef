"""SimulateSinogramd / LoadSinogramd, the layout helpers, and the source grid a sinogram records."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.physics.geometry import SourceGrid, load_json, load_source_grid, sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_WATER, hu_to_normalized
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import (
    LoadSinogramd,
    SimulateSinogramd,
    load_sinogram,
    reconstruction_affine,
    save_sinogram,
    source_grid,
)

ROOT = Path(__file__).resolve().parents[1]


def _image(x=20, y=18, z=3, spacing=(1.5, 1.5, 2.5)) -> MetaTensor:
    data = torch.rand(1, x, y, z, generator=torch.Generator().manual_seed(0))
    return MetaTensor(data, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_layout_round_trip():
    img = _image()
    vol = to_zhw(img)
    assert vol.shape == (3, 18, 20)
    assert vol[2, 5, 7] == img[0, 7, 5, 2]
    torch.testing.assert_close(from_zhw(vol), img.as_tensor())
    assert voxel_size_zhw(img) == (2.5, 1.5, 1.5)
    a = np.zeros((1, 4, 5, 6))
    assert to_zhw(a).shape == (6, 5, 4) and from_zhw(to_zhw(a)).shape == a.shape
    with pytest.raises(ValueError, match="channel-first"):
        to_zhw(torch.zeros(2, 4, 5, 6))
    with pytest.raises(ValueError, match="spacing"):
        voxel_size_zhw(torch.zeros(1, 4, 5, 6))


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_simulate_noiseless_matches_operator(beam):
    img = _image()
    out = SimulateSinogramd("image", n_views=6, beam=beam)({"image": img})
    g = out["geometry"]
    assert g.vol_shape == (3, 18, 20) and g.voxel_size == (2.5, 1.5, 1.5) and g.kind == beam
    torch.testing.assert_close(out["sinogram"], make_operator(g)(to_zhw(img).contiguous()))


def test_simulate_limited_angle_and_seeded_noise():
    img = _image()
    t = SimulateSinogramd("image", arc_degrees=90, step_degrees=10, photons=1e4)
    t.set_random_state(seed=5)
    a = t({"image": img})
    t.set_random_state(seed=5)
    b = t({"image": img})
    assert a["geometry"].n_views == 9
    torch.testing.assert_close(a["sinogram"], b["sinogram"])
    assert not torch.equal(a["sinogram"], t({"image": img})["sinogram"])
    with pytest.raises(ValueError, match="spacing"):
        SimulateSinogramd("image")({"image": torch.rand(1, 8, 8, 2)})
    assert SimulateSinogramd("image", voxel_size=(1, 1, 1))({"image": torch.rand(1, 8, 8, 2)})["sinogram"].shape[0] == 2


@pytest.mark.parametrize("suffix", [".npy", ".nii.gz"])
def test_save_load_round_trip(tmp_path, suffix):
    g = sparse_view(5, (2, 16, 16), (2.0, 1.0, 1.0), beam="fan")
    sino = torch.rand(g.sino_shape)
    path = tmp_path / f"scan{suffix}"
    gpath = save_sinogram(path, sino, g)
    assert gpath.name == "scan.json"
    out = LoadSinogramd("sinogram")({"sinogram": str(path)})
    assert out["geometry"] == g
    torch.testing.assert_close(out["sinogram"], sino)
    out = LoadSinogramd("sinogram")({"sinogram": path, "geometry": gpath})
    assert out["geometry"] == g


def test_load_errors(tmp_path):
    g = sparse_view(5, (2, 16, 16))
    bad_shape = tmp_path / "bad.npy"
    np.save(bad_shape, np.zeros((2, 4, g.det_count), np.float32))
    g.to_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"bad\.npy.*\(2, 4, 23\).*bad\.json.*\(2, 5, 23\)"):
        load_sinogram(bad_shape)
    nan = tmp_path / "nan.npy"
    arr = np.zeros(g.sino_shape, np.float32)
    arr[0, 0, 0] = np.nan
    np.save(nan, arr)
    g.to_json(tmp_path / "nan.json")
    with pytest.raises(ValueError, match=r"nan\.npy contains NaN"):
        LoadSinogramd()({"sinogram": str(nan)})
    lonely = tmp_path / "lonely.npy"
    np.save(lonely, arr)
    with pytest.raises(ValueError, match="geometry file"):
        load_sinogram(lonely)
    with pytest.raises(ValueError, match="does not match"):
        save_sinogram(tmp_path / "x.npy", np.zeros((1, 2, 3)), g)


# -- the source grid: a reconstruction from a sinogram lies on the CT it was made from (issue 16) ------


def _ct(tmp_path: Path) -> nib.Nifti1Image:
    """A 24 x 20 x 6 crop of the sample (HU, 3 mm) with its own affine."""
    img = nib.load(str(ROOT / "sample" / "sample_ct.nii.gz")).slicer[45:69, 40:60, 14:20]
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    return nib.load(str(tmp_path / "ct.nii.gz"))


def _geometry_of(ct: nib.Nifti1Image, views: int = 12):
    dx, dy, dz = (float(v) for v in ct.header.get_zooms()[:3])
    return sparse_view(views, ct.shape[::-1], (dz, dy, dx))


def test_save_sinogram_records_the_source_grid(tmp_path):
    ct = _ct(tmp_path)
    g = _geometry_of(ct)
    sino = torch.zeros(g.sino_shape)
    meta = MetaTensor(torch.zeros(1, *ct.shape), affine=torch.as_tensor(ct.affine))
    for name, source in (("image", ct), ("metatensor", meta), ("affine", ct.affine), ("grid", SourceGrid(ct.affine, ct.shape))):
        gpath = save_sinogram(tmp_path / f"{name}.nii.gz", sino, g, source=source)
        block = json.loads(gpath.read_text())["source"]
        assert block["shape"] == list(ct.shape), name
        np.testing.assert_allclose(block["affine"], ct.affine, err_msg=name)
        np.testing.assert_allclose(block["spacing"], ct.header.get_zooms()[:3], rtol=1e-6, err_msg=name)
        assert load_json(gpath) == g
        np.testing.assert_allclose(reconstruction_affine(g, load_source_grid(gpath)), ct.affine)
    assert "source" not in json.loads(save_sinogram(tmp_path / "none.nii.gz", sino, g).read_text())


def test_save_sinogram_refuses_a_source_of_another_grid(tmp_path):
    ct = _ct(tmp_path)
    g = _geometry_of(ct)
    with pytest.raises(ValueError, match=r"the source of sinogram .*other\.nii\.gz: the source grid \(shape \[24, 20, 3\]"):
        save_sinogram(tmp_path / "other.nii.gz", torch.zeros(g.sino_shape), g, source=ct.slicer[:, :, :3])
    assert not (tmp_path / "other.nii.gz").exists() and not (tmp_path / "other.json").exists()
    with pytest.raises(ValueError, match="spacing"):
        source_grid(np.diag([1.0, 1.0, 1.0, 1.0]), g)


def test_reconstruction_affine_without_source_is_centred():
    g = sparse_view(4, (5, 16, 12), (3.0, 0.5, 0.75))
    affine = reconstruction_affine(g)
    np.testing.assert_allclose(np.diag(affine), [0.75, 0.5, 3.0, 1.0])
    centre = affine @ np.array([(12 - 1) / 2, (16 - 1) / 2, (5 - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)  # the volume's centre on the rotation axis


def test_workflow_writes_the_reconstruction_on_the_source_grid(tmp_path):
    """configs/inference.json on a sinogram with a source block: the reconstruction has the CT's shape and affine.

    The same path serves ``python -m monai.bundle run`` and MONAI Label's ``sinogram_ct``.
    """
    from monai.bundle import run

    ct = _ct(tmp_path)
    g = _geometry_of(ct, views=60)
    truth = hu_to_normalized(to_zhw(torch.as_tensor(np.asarray(ct.dataobj, np.float32))[None]), MU_WATER, MU_WATER * 3.0)
    sino = make_operator(g)(truth.clamp(0.0, 1.0))
    save_sinogram(tmp_path / "scan.nii.gz", sino, g, source=ct)
    run(
        config_file=str(ROOT / "configs" / "inference.json"),
        input_path=str(tmp_path / "scan.nii.gz"),
        output_dir=str(tmp_path / "out"),
        method="fbp",
        device="cpu",
        progress=False,
    )
    recon = nib.load(str(tmp_path / "out" / "scan_recon.nii.gz"))
    assert recon.shape == ct.shape
    np.testing.assert_allclose(recon.affine, ct.affine, atol=1e-4)
    # voxel (i, j, k) of the reconstruction is voxel (i, j, k) of the CT: the layout is not transposed
    r = np.corrcoef(np.asarray(recon.dataobj).ravel(), np.asarray(ct.dataobj).ravel())[0, 1]
    assert r > 0.9, r
