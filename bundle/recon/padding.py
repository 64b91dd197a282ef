"""The working volume of the diffusion sampler: the operator's domain padded in-plane to a size the network accepts.

A UNet with ``L`` levels needs ``H`` and ``W`` divisible by ``2**(L-1)``, and the prior was
trained on slices of at least ``image_size``; a measured sinogram's geometry may have any
grid (e.g. 122 x 101). The sampler then runs on a larger, centred working volume: the prior
sees the whole padded slab, while data consistency acts on the central crop only, which is
exactly the operator's domain, so the measurement model ``y = A x`` is unchanged and the
returned volume has the operator's domain shape. Outside the crop the volume follows the
prior alone (no measurement sees it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["working_shape", "centre_crop", "CroppedDataConsistency"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def working_shape(shape: tuple[int, ...], divisor: int = 1, min_size: int | None = None) -> tuple[int, int, int]:
    """The padded ``(Z, H', W')``: ``H'`` and ``W'`` at least ``min_size`` and multiples of ``divisor`` (Z unchanged).

    Args:
        shape: the operator's domain ``(Z, H, W)``.
        divisor: what H and W must be divisible by (the network's downsampling factor).
        min_size: the smallest in-plane size (e.g. the training size); ``None`` or 0: no minimum.

    Raises:
        ValueError: a shape that is not 3D, or a divisor below 1.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a volume shape (Z, H, W), got {tuple(shape)}")
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    z, h, w = (int(s) for s in shape)
    low = int(min_size or 0)
    return z, _round_up(max(h, low), divisor), _round_up(max(w, low), divisor)


def centre_crop(shape: tuple[int, ...], padded: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Index of the ``shape`` volume centred in the ``padded`` one (the lower side gets the smaller half, as MONAI's SpatialPad)."""
    h0 = (padded[1] - shape[1]) // 2
    w0 = (padded[2] - shape[2]) // 2
    return slice(None), slice(h0, h0 + shape[1]), slice(w0, w0 + shape[2])


class CroppedDataConsistency:
    """Apply a data-consistency step to the central crop of a padded image, in place, and leave the border as it is.

    Args:
        data_consistency: the step on the operator's domain (``image -> image``).
        index: the crop, from :func:`centre_crop`.
    """

    def __init__(self, data_consistency: Callable[[torch.Tensor], torch.Tensor], index: tuple[slice, slice, slice]) -> None:
        self.data_consistency = data_consistency
        self.index = index

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (padded) with its crop replaced by the data-consistent crop; modifies and returns ``image``."""
        image[self.index] = self.data_consistency(image[self.index].contiguous()).to(image.dtype)
        return image

    def __repr__(self) -> str:
        return f"CroppedDataConsistency({self.data_consistency!r}, {self.index!r})"
