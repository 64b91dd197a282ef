"""SimulateSinogramd / LoadSinogramd and the layout helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import LoadSinogramd, SimulateSinogramd, load_sinogram, save_sinogram


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
