"""Intensity transforms: Hounsfield units to normalised attenuation (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from bundle.physics import MU_WATER, hu_to_normalized

__all__ = ["HUToNormalizedd", "ValidateVolumed"]


def _source(data: Mapping, key: Hashable) -> str:
    """The file an item came from, for error messages."""
    img = data[key]
    meta = getattr(img, "meta", None) or data.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


class ValidateVolumed(MapTransform):
    """Refuse volumes that cannot be used: not 3D, NaN/Inf, or fewer slices than needed.

    The error names the file the volume was read from (MONAI's ``filename_or_obj``).

    Args:
        keys: keys of channel-first images ``(C, X, Y, Z)``.
        min_slices: the fewest axial slices accepted (a slab of k slices at separation s
            needs ``(k - 1) * s + 1``).
    """

    def __init__(self, keys: KeysCollection, min_slices: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_slices = int(min_slices)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            where = _source(d, key)
            if img.ndim != 4:
                raise ValueError(f"{where}: expected a 3D volume (channel-first (C, X, Y, Z)), got shape {tuple(img.shape)}")
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise ValueError(f"{where}: the volume contains NaN or Inf values")
            if img.shape[-1] < self.min_slices:
                raise ValueError(f"{where}: {img.shape[-1]} axial slices, but at least {self.min_slices} are needed")
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
