"""RandSlabd, the slab dataset and datalist checks."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged

from bundle.workflows.data import RandomStates, SlabDataset, load_datalist
from bundle.transforms import RandSlabd, ValidateVolumed, slab_span
from tests.conftest import write_crop


def volume(depth: int, h: int = 5, w: int = 4) -> dict:
    # value of voxel (x, y, z) encodes its coordinates, so slabs can be checked exactly
    x, y, z = torch.meshgrid(torch.arange(w), torch.arange(h), torch.arange(depth), indexing="ij")
    vol = (z * 10000 + y * 100 + x).float()[None]
    return {"image": MetaTensor(vol, meta={"filename_or_obj": f"vol{depth}.nii.gz"})}


@pytest.mark.parametrize("depth", [3, 7, 10])
@pytest.mark.parametrize("slab_size", [1, 3])
def test_slabs_are_k_slices_at_the_drawn_separation(depth: int, slab_size: int) -> None:
    t = RandSlabd("image", slab_size=slab_size, separations=(1, 2, 3), num_samples=20).set_random_state(0)
    for item in t(volume(depth)):
        slab, s = item["image"], int(item["separation"])
        assert slab.shape == (slab_size, 5, 4)  # (k, H=Y, W=X)
        z = (slab[:, 0, 0] // 10000).long()
        assert torch.equal(z, z[0] + s * torch.arange(slab_size))
        assert z[-1] < depth and slab_span(slab_size, s) <= depth
        assert torch.equal(slab[0, :, :] % 10000, (torch.arange(5)[:, None] * 100 + torch.arange(4)[None]).float())


def test_every_fitting_separation_is_drawn() -> None:
    t = RandSlabd("image", slab_size=3, separations=(1, 2, 3), num_samples=200).set_random_state(1)
    assert {int(i["separation"]) for i in t(volume(7))} == {1, 2, 3}
    assert {int(i["separation"]) for i in t(volume(5))} == {1, 2}  # s=3 needs 7 slices


def test_too_thin_volume_names_the_file() -> None:
    with pytest.raises(ValueError, match=r"vol2.nii.gz: 2 axial slices, but a slab of 3 slices needs at least 3"):
        RandSlabd("image", slab_size=3)(volume(2))


def test_validate_refuses_nan_and_names_the_file() -> None:
    d = volume(4)
    d["image"][0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="vol4.nii.gz: the volume contains NaN"):
        ValidateVolumed("image")(d)


def test_slab_dataset_length_and_items() -> None:
    ds = SlabDataset([volume(6), volume(9)], RandSlabd("image", slab_size=3), samples_per_volume=4)
    assert len(ds) == 8
    assert ds[5]["image"].shape == (3, 5, 4)


def test_random_states_round_trip() -> None:
    t = Compose([RandSlabd("image", slab_size=3, num_samples=4)])
    states = RandomStates([t])
    saved = states.state_dict()
    first = [int(i["separation"]) for i in t(volume(9))] + [torch.rand(1).item()]
    states.load_state_dict(saved)
    again = [int(i["separation"]) for i in t(volume(9))] + [torch.rand(1).item()]
    assert first == again


def test_datalist_checks(tmp_path) -> None:
    write_crop(tmp_path / "a.nii.gz")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    assert load_datalist(good)[0]["image"] == str(tmp_path / "a.nii.gz")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=r"missing.json: entry 1 of 'training' names .*gone.nii.gz"):
        load_datalist(missing)
    no_image = tmp_path / "noimage.json"
    no_image.write_text(json.dumps({"training": [{"label": "x"}]}))
    with pytest.raises(ValueError, match="entry 0 of 'training' has no 'image'"):
        load_datalist(no_image)
    with pytest.raises(ValueError, match="no non-empty list 'validation'"):
        load_datalist(good, "validation")


def test_unreadable_volume_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(Exception, match="broken.nii.gz"):
        LoadImaged("image", ensure_channel_first=True)({"image": str(bad)})


def test_augmentation_overlay_moves_whole_slabs_and_keeps_air_outside() -> None:
    """configs/train_augment.json: one random in-plane affine per slab (all k slices alike), air (-1) where it pads."""
    from monai.bundle import ConfigParser

    from tests.conftest import ROOT

    def slab_transforms(*overlays: str):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / "train.json"), *(str(ROOT / "configs" / o) for o in overlays)])
        parser.update({"bundle_root": str(ROOT), "augment_prob": 1.0})
        return parser.get_parsed_content("slab_transforms")

    vol = torch.zeros(1, 48, 48, 9)
    vol[:, 8:40, 12:36] = 0.5  # a box, the same on every slice
    plain = slab_transforms().set_random_state(3)({"image": vol})[0]["image"]
    augmented_chain = slab_transforms("train_augment.json").set_random_state(3)
    items = [augmented_chain({"image": vol})[0] for _ in range(4)]
    tracked = {type(r).__name__ for r in RandomStates([augmented_chain])._randomizables}
    assert {"RandSlabd", "RandAffined", "RandAffine", "RandFlipd"} <= tracked  # every generator is checkpointed
    for item in items:
        slab = torch.as_tensor(item["image"])
        assert slab.shape == plain.shape == (3, 48, 48)
        assert float(slab.min()) >= -1 and float(slab.max()) <= 1
        assert torch.equal(slab[0], slab[1]) and torch.equal(slab[0], slab[2])  # one transform for the slab
        assert float(slab[:, 0, 0].max()) == -1.0  # corners stay air
        assert not torch.equal(slab, torch.as_tensor(plain))


def test_intensity_overlay_scales_and_blurs_whole_slabs_and_keeps_air() -> None:
    """configs/train_intensity.json: a mild attenuation scale and an in-plane blur, one draw per slab."""
    from monai.bundle import ConfigParser

    from tests.conftest import ROOT

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / n) for n in ("train.json", "train_augment.json", "train_intensity.json")])
    parser.update({"bundle_root": str(ROOT), "augment_prob": 0.0, "intensity_scale_prob": 1.0, "smooth_prob": 1.0, "smooth_sigma": [0.8, 0.8]})
    chain = parser.get_parsed_content("slab_transforms").set_random_state(5)
    tracked = {type(r).__name__ for r in RandomStates([chain])._randomizables}
    assert {"RandScaleIntensityd", "RandGaussianSmoothd"} <= tracked  # checkpointed with the rest
    vol = torch.zeros(1, 48, 48, 9)
    vol[:, 8:40, 12:36] = 0.5
    scale = float(parser["intensity_scale"])
    for _ in range(4):
        slab = torch.as_tensor(chain({"image": vol})[0]["image"])
        assert torch.equal(slab[0], slab[1]) and torch.equal(slab[0], slab[2])  # one draw for the slab
        assert float(slab[:, 0, 0].max()) == -1.0  # air stays air: scaling keeps 0 and the blur is local
        centre = (float(slab[0, 24, 24]) + 1) / 2  # back to the normalised attenuation
        assert abs(centre / 0.5 - 1) <= scale + 1e-4 and abs(centre / 0.5 - 1) > 0
        edge = (slab[0, 24] + 1) / 2  # a row across the box's edge (the flip may mirror it)
        assert ((edge > 0.01) & (edge < 0.45)).any()  # the step is blurred, not sharp


def test_elastic_overlay_deforms_whole_slabs_smoothly_and_keeps_air() -> None:
    """configs/train_elastic.json: one smooth random deformation per slab (all k slices alike), air where it pads."""
    from monai.bundle import ConfigParser

    from tests.conftest import ROOT

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / n) for n in ("train.json", "train_augment.json", "train_elastic.json")])
    parser.update({"bundle_root": str(ROOT), "augment_prob": 0.0, "elastic_prob": 1.0, "elastic_spacing": 16})
    chain = parser.get_parsed_content("slab_transforms").set_random_state(7)
    tracked = {type(r).__name__ for r in RandomStates([chain])._randomizables}
    assert "Rand2DElasticd" in tracked  # checkpointed with the rest
    vol = torch.zeros(1, 48, 48, 9)
    vol[:, 8:40, 12:36] = 0.5
    box = torch.full((48, 48), -1.0)
    box[8:40, 12:36] = 0.0
    moved = 0
    for _ in range(4):
        slab = torch.as_tensor(chain({"image": vol})[0]["image"])
        assert slab.shape == (3, 48, 48)
        assert torch.equal(slab[0], slab[1]) and torch.equal(slab[0], slab[2])  # one deformation for the slab
        assert float(slab[:, 0, 0].max()) == -1.0  # corners stay air
        inside = (slab[0] > -0.5).float().mean()  # the box's area changes by a few percent, not more
        assert abs(float(inside) - float((box > -0.5).float().mean())) < 0.1
        moved += not (torch.equal(slab[0], box) or torch.equal(slab[0], box.flip(1)))
    assert moved == 4


def test_slab_dataset_weights_volumes_and_drops_the_weight_from_slabs() -> None:
    small = [dict(volume(6), weight=0.25) for _ in range(3)]
    ds = SlabDataset([volume(9), *small], RandSlabd("image", slab_size=3), samples_per_volume=8)
    assert ds.counts == [8, 2, 2, 2] and len(ds) == 14
    assert ds[7]["image"].shape == (3, 5, 4) and "weight" not in ds[8]
    assert "weight" not in ds[13]
    with pytest.raises(IndexError):
        ds[14]
    with pytest.raises(ValueError, match="volume 0 has weight=0.0"):
        SlabDataset([dict(volume(6), weight=0)], RandSlabd("image", slab_size=3))
