"""Image quality of reconstructions: PSNR and SSIM on the [0, 1] scale, in 3D and per orientation, and the body error in HU.

Volumes are ``(Z, H, W)`` tensors of normalised attenuation. Per-orientation numbers are the
mean over the 2D slices along one axis, as the DiffusionBlend paper reports them: axial
slices are ``x[z]``, coronal ``x[:, h]``, sagittal ``x[:, :, w]``. Both volumes are clipped to
[0, 1] first (the data range of the metrics). The mean absolute error in HU is taken inside
the body: the voxels whose ground truth is above -500 HU (air and lung parenchyma excluded), so
that a volume with much air around the patient does not look better than it is.
"""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric

from bundle.physics.simulation import MU_MAX, MU_WATER, hu_to_normalized

__all__ = ["BODY_HU", "ORIENTATIONS", "body_mae_hu", "psnr", "ssim", "reconstruction_metrics"]

ORIENTATIONS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
BODY_HU = -500.0  # ground-truth voxels above this are "inside the body" for the HU error
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


def body_mae_hu(
    pred: torch.Tensor, target: torch.Tensor, mu_water: float = MU_WATER, mu_max: float = MU_MAX, body_hu: float = BODY_HU
) -> float:
    """Mean absolute error in HU over the voxels whose ground truth is above ``body_hu`` (NaN if there are none).

    Both volumes are normalised attenuation ``mu / mu_max`` clipped to [0, 1] (as for PSNR);
    one unit of it is ``1000 mu_max / mu_water`` HU.
    """
    pred, target = _prepare(pred, target)
    body = target > float(hu_to_normalized(torch.tensor(body_hu), mu_water, mu_max))
    if not bool(body.any()):
        return float("nan")
    return float((pred[body] - target[body]).abs().mean()) * 1000.0 * mu_max / mu_water


def reconstruction_metrics(
    pred: torch.Tensor, target: torch.Tensor, mu_water: float = MU_WATER, mu_max: float = MU_MAX
) -> dict[str, float]:
    """PSNR and SSIM in 3D and per orientation (``psnr_3d``, ``ssim_3d``, ``psnr_axial``, ... ``ssim_sagittal``) and ``mae_body_hu``.

    ``mu_water`` and ``mu_max`` are the intensity scale of the volumes (``bundle.physics.simulation``), for the HU error.
    """
    out = {"psnr_3d": psnr(pred, target), "ssim_3d": ssim(pred, target)}
    out["mae_body_hu"] = body_mae_hu(pred, target, mu_water, mu_max)
    for name, axis in ORIENTATIONS.items():
        out[f"psnr_{name}"] = psnr(pred, target, axis)
        out[f"ssim_{name}"] = ssim(pred, target, axis)
    return out
