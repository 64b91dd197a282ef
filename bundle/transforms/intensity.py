"""Intensity transforms: Hounsfield units to normalised attenuation (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from bundle.physics.simulation import MU_WATER, hu_to_normalized
from bundle.settings import as_bool

__all__ = ["HUToNormalizedd", "ValidateVolumed", "check_hu"]


def _source(data: Mapping, key: Hashable) -> str:
    """The file an item came from, for error messages."""
    img = data[key]
    meta = getattr(img, "meta", None) or data.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


#: A CT volume in HU has air (-1000), lung or fat (about -100) among its darkest voxels; one whose
#: darkest percent lies above this is not in HU (an MRI, a DICOM series without RescaleIntercept).
#: Not -1000 itself, so that a crop inside the body (fat, no air) still passes.
MAX_DARK_HU: float = -50.0
#: The share of darkest voxels :data:`MAX_DARK_HU` applies to.
DARK_QUANTILE: float = 0.01


def check_hu(image: torch.Tensor, source: str) -> None:
    """Refuse an image whose darkest voxels are not air, lung or fat: it is not a CT volume in HU.

    Raises:
        ValueError: naming the file, the value found and the setting that accepts it anyway.
    """
    values = torch.as_tensor(image).detach().float().flatten()
    step = max(1, values.numel() // 1_000_000)  # a subsample is enough for a percentile
    dark = float(torch.quantile(values[::step], DARK_QUANTILE))
    if dark > MAX_DARK_HU:
        raise ValueError(
            f"{source}: does not look like a CT volume in HU: its darkest {DARK_QUANTILE:.0%} of voxels are at "
            f"{dark:.0f} and above, with no air (-1000 HU), lung or fat (below {MAX_DARK_HU:.0f} HU); an MRI, "
            f"or a DICOM series without RescaleSlope/RescaleIntercept? (set allow_implausible to true to use it anyway)"
        )


class ValidateVolumed(MapTransform):
    """Refuse volumes that cannot be used: not a single-channel 3D volume, NaN/Inf, fewer slices than needed, not HU.

    The error names the file the volume was read from (MONAI's ``filename_or_obj``).

    Args:
        keys: keys of channel-first images ``(C, X, Y, Z)``.
        min_slices: the fewest axial slices accepted (a slab of k slices at separation s
            needs ``(k - 1) * s + 1``).
        hu: the images are CT volumes in HU: refuse one without air, lung or fat (:func:`check_hu`).
        allow_implausible: skip the HU check.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_slices: int = 1,
        hu: bool = False,
        allow_implausible: bool | str = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_slices = int(min_slices)
        self.hu = as_bool(hu, "hu") and not as_bool(allow_implausible, "allow_implausible")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            where = _source(d, key)
            if img.ndim != 4:
                raise ValueError(f"{where}: expected a 3D volume (channel-first (C, X, Y, Z)), got shape {tuple(img.shape)}")
            if img.shape[0] != 1:
                raise ValueError(
                    f"{where}: expected a single 3D volume, got {img.shape[0]} volumes or channels "
                    f"(a 4D image, shape {tuple(img.shape[1:])} x {img.shape[0]}); extract one volume first"
                )
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise ValueError(f"{where}: the volume contains NaN or Inf values")
            if img.shape[-1] < self.min_slices:
                raise ValueError(f"{where}: {img.shape[-1]} axial slices, but at least {self.min_slices} are needed")
            if self.hu:
                check_hu(img, where)
        return d


class HUToNormalizedd(MapTransform):
    """Hounsfield units to normalised attenuation ``mu / mu_max`` in [0, 1].

    ``mu = mu_water (1 + HU / 1000)``, clipped at HU -1000 below (air) and at ``hu_max``
    above; ``mu_max = mu_water (1 + hu_max / 1000)``. The map is affine in HU, so
    ``y = A x`` stays linear in normalised units (``bundle.physics.hu_to_normalized``).

    Args:
        keys: keys of images in HU.
        hu_max: HU mapped to 1.
    """

    def __init__(self, keys: KeysCollection, hu_max: float = 2000.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.hu_max = float(hu_max)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mu_max = MU_WATER * (1.0 + self.hu_max / 1000.0)
        for key in self.key_iterator(d):
            d[key] = hu_to_normalized(d[key], mu_max=mu_max).clamp(max=1.0)
        return d
