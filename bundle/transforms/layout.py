"""Array layouts: MONAI's channel-first ``(1, X, Y, Z)`` images <-> the package's ``(Z, H, W) = (Z, Y, X)`` volumes."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["to_zhw", "from_zhw", "voxel_size_zhw"]

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def to_zhw(img: ArrayT) -> ArrayT:
    """``(1, X, Y, Z)`` channel-first image -> ``(Z, Y, X)`` volume (a plain tensor for MetaTensors).

    Raises:
        ValueError: unless ``img`` has 4 dims and one channel.
    """
    if img.ndim != 4 or img.shape[0] != 1:
        raise ValueError(f"expected a channel-first image (1, X, Y, Z), got shape {tuple(img.shape)}")
    if isinstance(img, torch.Tensor):
        t = img.as_tensor() if hasattr(img, "as_tensor") else img
        return t[0].permute(2, 1, 0)
    return np.transpose(img[0], (2, 1, 0))


def from_zhw(vol: ArrayT) -> ArrayT:
    """``(Z, Y, X)`` volume -> ``(1, X, Y, Z)`` channel-first image (inverse of :func:`to_zhw`).

    Raises:
        ValueError: unless ``vol`` has 3 dims.
    """
    if vol.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) volume, got shape {tuple(vol.shape)}")
    if isinstance(vol, torch.Tensor):
        return vol.permute(2, 1, 0)[None]
    return np.transpose(vol, (2, 1, 0))[None]


def voxel_size_zhw(img: torch.Tensor) -> tuple[float, float, float]:
    """``(dz, dy, dx)`` in mm of a MONAI MetaTensor ``(1, X, Y, Z)`` (from its affine's pixdim).

    Raises:
        ValueError: when ``img`` carries no spacing (not a MetaTensor).
    """
    pixdim = getattr(img, "pixdim", None)
    if pixdim is None:
        raise ValueError("the image carries no spacing (not a MONAI MetaTensor); pass the voxel size explicitly")
    px, py, pz = (float(v) for v in pixdim[:3])
    return (pz, py, px)
