"""PSNR and SSIM on the [0, 1] scale, in 3D and per orientation."""

from __future__ import annotations

import math

import pytest
import torch

from bundle.metrics import body_mae_hu, psnr, reconstruction_metrics, ssim
from bundle.physics.simulation import MU_MAX, MU_WATER, hu_to_normalized


def _volume(shape=(8, 16, 12), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_known_value():
    x = torch.zeros(4, 8, 8)
    y = torch.full((4, 8, 8), 0.1)
    assert psnr(y, x) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    for axis in range(3):
        assert psnr(y, x, axis) == pytest.approx(20.0, abs=1e-4)


def test_identical_volumes():
    x = _volume()
    m = reconstruction_metrics(x, x)
    assert m["psnr_3d"] == 100.0 and m["psnr_coronal"] == 100.0
    for key in ("ssim_3d", "ssim_axial", "ssim_coronal", "ssim_sagittal"):
        assert m[key] == pytest.approx(1.0, abs=1e-5)


def test_orientations_differ_for_anisotropic_error():
    x = _volume()
    noisy = x.clone()
    noisy[3] += 0.3  # one bad axial slice: hurts one axial slice but every coronal/sagittal slice
    m = reconstruction_metrics(noisy, x)
    assert m["psnr_axial"] > m["psnr_coronal"]
    assert set(m) == {f"{k}_{o}" for k in ("psnr", "ssim") for o in ("3d", "axial", "coronal", "sagittal")} | {"mae_body_hu"}
    assert all(math.isfinite(v) for v in m.values())


def test_ssim_decreases_with_noise_and_small_depth_works():
    x = _volume((3, 20, 20))
    n1 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    n2 = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert ssim(n1, x) > ssim(n2, x)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


def test_body_mae_is_in_hu_and_ignores_air_and_lung():
    hu = torch.full((4, 8, 8), -1000.0)
    hu[:, 2:6, 2:6] = 40.0  # soft tissue
    hu[:, 0, :] = -800.0  # lung: outside the body mask (-500 HU)
    truth = hu_to_normalized(hu, MU_WATER, MU_MAX)
    pred = hu_to_normalized(hu + 25.0 * (hu > -500), MU_WATER, MU_MAX)  # +25 HU inside the body only
    pred[:, 0, :] += 0.2  # a large error in the lung does not count
    assert body_mae_hu(pred, truth) == pytest.approx(25.0, abs=0.01)
    assert reconstruction_metrics(pred, truth)["mae_body_hu"] == pytest.approx(25.0, abs=0.01)
    assert math.isnan(body_mae_hu(truth, torch.zeros_like(truth)))  # no body at all
