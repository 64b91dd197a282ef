"""Image quality of reconstructions: PSNR and SSIM on the [0, 1] scale, in 3D and per orientation.

Volumes are ``(Z, H, W)`` tensors of normalised attenuation. Per-orientation numbers are the
mean over the 2D slices along one axis, as the DiffusionBlend paper reports them: axial
slices are ``x[z]``, coronal ``x[:, h]``, sagittal ``x[:, :, w]``. Both volumes are clipped to
[0, 1] first (the data range of the metrics).
"""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric

__all__ = ["ORIENTATIONS", "psnr", "ssim", "reconstruction_metrics"]

ORIENTATIONS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
MAX_PSNR = 100.0  # a slice reproduced exactly (MSE 0) counts as 100 dB instead of infinity


def _prepare(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"expected two volumes (Z, H, W) of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return pred.float().clamp(0, 1), target.float().clamp(0, 1).to(pred.device)


def _slices(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``(N, 1, ...)`` batch: the whole volume (``axis=None``) or its 2D slices along ``axis``."""
    if axis is None:
        return x[None, None]
    return x.movedim(axis, 0).unsqueeze(1)


def _window(shape: tuple[int, ...]) -> int:
    """MONAI's SSIM window (11), shrunk to the largest odd size that fits the smallest image side."""
    smallest = min(shape)
    size = min(11, smallest if smallest % 2 else smallest - 1)
    return max(size, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor, axis: int | None = None) -> float:
    """PSNR in dB on the [0, 1] scale: of the volume (``axis=None``) or the mean over slices along ``axis``."""
    pred, target = _prepare(pred, target)
    values = PSNRMetric(max_val=1.0, reduction="none")(_slices(pred, axis), _slices(target, axis))
    return float(values.nan_to_num(posinf=MAX_PSNR).clamp(max=MAX_PSNR).mean())


def ssim(pred: torch.Tensor, target: torch.Tensor, axis: int | None = None) -> float:
    """SSIM on the [0, 1] scale (MONAI's Gaussian-window SSIM): in 3D (``axis=None``) or the mean over slices along ``axis``."""
    pred, target = _prepare(pred, target)
    p, t = _slices(pred, axis), _slices(target, axis)
    spatial = tuple(p.shape[2:])
    metric = SSIMMetric(spatial_dims=len(spatial), data_range=1.0, win_size=_window(spatial), reduction="none")
    return float(metric(p, t).mean())


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM in 3D and per orientation: keys ``psnr_3d``, ``ssim_3d``, ``psnr_axial``, ... ``ssim_sagittal``."""
    out = {"psnr_3d": psnr(pred, target), "ssim_3d": ssim(pred, target)}
    for name, axis in ORIENTATIONS.items():
        out[f"psnr_{name}"] = psnr(pred, target, axis)
        out[f"ssim_{name}"] = ssim(pred, target, axis)
    return out
