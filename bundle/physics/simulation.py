"""CT physics: Hounsfield units <-> normalised attenuation, and noisy sinogram simulation.

Conventions (docs/architecture.md): attenuation ``mu = mu_water (1 + HU / 1000)``, clipped
at HU -1000 below (no negative attenuation); the normalised image is ``mu / mu_max`` (a pure
scaling, so ``y = A x`` holds in normalised units). Defaults: ``mu_water = 0.0192 / mm``
(water near 70 keV effective energy) and ``mu_max = 3 mu_water`` (HU 2000 maps to 1). With
lengths in mm, a normalised sinogram times ``mu_max`` is the dimensionless line integral
``p = -log(I / I0)``.
"""

from __future__ import annotations

from typing import Optional, TypeVar

import numpy as np
import torch

from bundle.physics.operators.base import LinearOperator, check_tensor

__all__ = ["MU_WATER", "MU_MAX", "check_line_integrals", "hu_to_normalized", "normalized_to_hu", "simulate_sinogram"]

#: Linear attenuation of water in 1/mm.
MU_WATER: float = 0.0192
#: Attenuation mapped to 1 by default: that of HU 2000.
MU_MAX: float = MU_WATER * (1.0 + 2000.0 / 1000.0)

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

#: Noise may push line integrals below zero by this share of the largest one before they count as negative.
NEGATIVE_TOLERANCE: float = 0.05
#: A line integral (normalised, mm) may reach this many times the longest chord through the field
#: of view (a path through material of normalised attenuation up to this, e.g. metal).
MAX_MEAN_ATTENUATION: float = 2.0


def _check_constants(mu_water: float, mu_max: float) -> None:
    if not (np.isfinite(mu_water) and mu_water > 0):
        raise ValueError(f"mu_water must be a finite number > 0, got {mu_water!r}")
    if not (np.isfinite(mu_max) and mu_max > 0):
        raise ValueError(f"mu_max must be a finite number > 0, got {mu_max!r}")


def hu_to_normalized(hu: ArrayT, mu_water: float = MU_WATER, mu_max: float = MU_MAX) -> ArrayT:
    """``mu_water (1 + HU/1000) / mu_max`` with HU clipped at -1000 below (torch or numpy in, same out).

    Args:
        hu: image in Hounsfield units.
        mu_water: attenuation of water (1/mm).
        mu_max: attenuation mapped to 1 (1/mm).
    """
    _check_constants(mu_water, mu_max)
    if isinstance(hu, torch.Tensor):
        h = hu if hu.is_floating_point() else hu.float()
        return torch.clamp(h, min=-1000.0).add(1000.0).mul(mu_water / (1000.0 * mu_max))
    if isinstance(hu, np.ndarray):
        h = hu if np.issubdtype(hu.dtype, np.floating) else hu.astype(np.float32)
        return (np.maximum(h, -1000.0) + 1000.0) * (mu_water / (1000.0 * mu_max))
    raise TypeError(f"hu must be a torch.Tensor or numpy.ndarray, got {type(hu).__name__}")


def normalized_to_hu(x: ArrayT, mu_water: float = MU_WATER, mu_max: float = MU_MAX) -> ArrayT:
    """Inverse of :func:`hu_to_normalized`: ``1000 (x mu_max / mu_water - 1)`` (no clipping).

    Args:
        x: normalised attenuation image.
        mu_water: attenuation of water (1/mm).
        mu_max: attenuation mapped to 1 (1/mm).
    """
    _check_constants(mu_water, mu_max)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x * (1000.0 * mu_max / mu_water) - 1000.0
    raise TypeError(f"x must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def simulate_sinogram(
    x: torch.Tensor,
    A: LinearOperator,
    photons: Optional[float] = None,
    electronic_noise: float = 0.0,
    generator: Optional[torch.Generator] = None,
    mu_max: float = MU_MAX,
    min_counts: float = 1.0,
) -> torch.Tensor:
    """Normalised sinogram ``A x``, optionally with Poisson (quantum) and Gaussian (electronic) noise.

    With ``photons = I0`` the line integrals ``p = mu_max A x`` become counts
    ``N ~ Poisson(I0 exp(-p)) + Normal(0, electronic_noise^2)``, clamped at ``min_counts``
    below, and come back as ``-log(N / I0) / mu_max``.

    Args:
        x: normalised volume of ``A.domain_shape``.
        A: the projector.
        photons: incident photons per ray ``I0``; ``None`` gives the noiseless sinogram.
        electronic_noise: standard deviation of the electronic noise, in counts (needs ``photons``).
        generator: torch generator on ``x``'s device (seeds the noise).
        mu_max: attenuation (1/mm) that the normalised image's 1 stands for.
        min_counts: counts are clamped to at least this before the log.

    Returns:
        The sinogram, same dtype and device as ``x``.
    """
    check_tensor(x, A.domain_shape, "x")
    if electronic_noise < 0 or not np.isfinite(electronic_noise):
        raise ValueError(f"electronic_noise must be a finite number >= 0, got {electronic_noise!r}")
    with torch.no_grad():
        y = A(x)
        if photons is None:
            if electronic_noise > 0:
                raise ValueError("electronic_noise is in counts and needs photons (incident photons per ray)")
            return y
        if not (np.isfinite(photons) and photons > 0):
            raise ValueError(f"photons must be a finite number > 0, got {photons!r}")
        if not (mu_max > 0):
            raise ValueError(f"mu_max must be > 0, got {mu_max!r}")
        expected = photons * torch.exp(-y.double() * mu_max)
        counts = torch.poisson(expected, generator=generator)
        if electronic_noise > 0:
            noise = torch.randn(counts.shape, generator=generator, dtype=counts.dtype, device=counts.device)
            counts = counts + electronic_noise * noise
        counts = torch.clamp(counts, min=min_counts)
        return (-torch.log(counts / photons) / mu_max).to(x.dtype)


def check_line_integrals(sinogram: torch.Tensor | np.ndarray, fov_diameter_mm: float, source: str) -> None:
    """Refuse a sinogram that cannot hold normalised line integrals ``A x`` (e.g. raw counts, or flipped signs).

    A normalised line integral lies between 0 (air) and the chord length in mm times the
    normalised attenuation (1 at ``hu_max``); noise can make it slightly negative near air.

    Args:
        sinogram: the measured sinogram.
        fov_diameter_mm: the longest chord through the reconstruction grid (mm).
        source: the file, for the message.

    Raises:
        ValueError: values below ``-NEGATIVE_TOLERANCE * max`` or above ``MAX_MEAN_ATTENUATION *
            fov_diameter_mm``, naming the file, with the setting that accepts them anyway.
    """
    values = torch.as_tensor(np.asarray(sinogram) if not isinstance(sinogram, torch.Tensor) else sinogram)
    low, high = float(values.min()), float(values.max())
    ceiling = MAX_MEAN_ATTENUATION * fov_diameter_mm
    override = "set allow_implausible to true to reconstruct it anyway"
    if high > ceiling:
        raise ValueError(
            f"sinogram {source}: values up to {high:.4g}, but a line integral through this geometry's field of view "
            f"is at most about {ceiling:.4g} (normalised attenuation x mm): raw detector counts or intensities "
            f"instead of line integrals -log(I / I0) / mu_max? ({override})"
        )
    if low < -NEGATIVE_TOLERANCE * max(abs(high), 1e-12):
        raise ValueError(
            f"sinogram {source}: line integrals as low as {low:.4g} (the largest is {high:.4g}); attenuation "
            f"line integrals are not negative: wrong sign or offset? ({override})"
        )
