"""The support constraint: a voxel that a measured ray shows to be empty is air.

A ray whose line integral is (close to) zero crossed only air, so every voxel on it is air. The
voxels that no such ray crosses are the object's visual hull (shape from silhouettes,
Laurentini, IEEE PAMI 1994); from 8 views it is a polygon around the body. Restricting data
consistency to the hull keeps what the measurements already say about the air around the body,
where a sparse-view reconstruction otherwise leaves streaks and a sampler may leave a halo.

The mask needs nothing but the sinogram and the operator: one back-projection of the rays that
saw matter, compared with one back-projection of all rays.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bundle.physics.operators.base import LinearOperator
from bundle.settings import setting_number

__all__ = ["SUPPORT_KINDS", "SupportOperator", "SupportConstraint", "support_setting", "visual_hull"]

#: The ``support`` setting: ``none`` leaves every voxel free, ``hull`` holds the voxels outside the visual hull at air.
SUPPORT_KINDS: tuple[str, ...] = ("none", "hull")

DataConsistency = Callable[[torch.Tensor], torch.Tensor]


def support_setting(support: str, threshold: float) -> tuple[str, float]:
    """The ``support`` and ``support_threshold`` settings checked, or a ValueError naming the one that is wrong."""
    if support not in SUPPORT_KINDS:
        raise ValueError(f"support must be one of {list(SUPPORT_KINDS)}, got {support!r}")
    return support, float(setting_number("support_threshold", threshold, 0.0, 1.0, open_maximum=True))


def visual_hull(operator: LinearOperator, measurements: torch.Tensor, threshold: float = 0.003, margin: int = 1) -> torch.Tensor:
    """The voxels that every measured ray through them saw as matter: a boolean mask of ``operator.domain_shape``.

    A ray saw matter when its line integral is above ``threshold`` times the largest one. The
    default 0.3 % lost no voxel above -500 HU of any of the 59 volumes of ``../shared`` it was
    checked on (``scripts/support_check.py``, 8 and 4 views), where 1 % lost up to 67 in 23 of
    them (model card, "The support constraint"). Noise in air widens the hull, it does not cut
    it: its standard deviation is about 0.04 % of a chest's largest line integral at 1e5 photons
    and 0.12 % at 1e4, where some air rays then count as matter. Each detector column that saw
    matter also marks its ``margin`` neighbours, so the partial voxels at the body's outline
    stay inside. A voxel that no ray reaches is kept (nothing says it is empty). A sinogram of
    zeros gives an empty hull: the measurements saw nothing.

    Args:
        operator: the projector ``A`` (non-negative weights, as every ray-driven projector has).
        measurements: the sinogram ``y`` of ``operator.range_shape``.
        threshold: share of the largest line integral below which a ray counts as empty, in [0, 1).
        margin: detector columns (the last sinogram axis) each side of a matter ray that count as matter too.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"support_threshold must be in [0, 1), got {threshold!r}")
    if margin < 0:
        raise ValueError(f"the hull's margin must be >= 0 detector columns, got {margin!r}")
    y = measurements.float()
    matter = (y > threshold * float(y.abs().max())).float()
    if margin:
        rows = matter.reshape(-1, 1, matter.shape[-1])
        matter = F.max_pool1d(rows, 2 * margin + 1, stride=1, padding=margin).reshape(matter.shape)
    reached = operator.T(torch.ones_like(y))
    seen = operator.T(matter)
    # every ray through the voxel saw matter: its back-projected weight is all of the voxel's weight
    return seen >= reached * (1 - 1e-4)


class SupportOperator(LinearOperator):
    """``A M``: the projector restricted to a support ``M`` (its adjoint ``M A^T``).

    Its ``norm()`` is that of ``A``, so the data-consistency weights, which are relative to
    ``||A||^2``, mean the same with and without the support; its ``geometry`` is ``A``'s (so a
    parallel-beam FBP over it is the masked FBP, e.g. TV's start).
    """

    def __init__(self, operator: LinearOperator, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != tuple(operator.domain_shape):
            raise ValueError(f"the support has shape {tuple(mask.shape)}, the operator's domain is {operator.domain_shape}")
        super().__init__(operator.domain_shape, operator.range_shape, operator.device, operator.check_finite)
        self.operator = operator
        self.mask = mask.to(device=operator.device, dtype=torch.float32)
        self.geometry = getattr(operator, "geometry", None)

    # the input is checked once, by this operator's call: the wrapped one's raw maps follow
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator._apply(x * self.mask.to(x.dtype))

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        x = self.operator._apply_adjoint(y)
        return x * self.mask.to(x.dtype)

    def norm(self, n_iter: int = 50, generator: Optional[torch.Generator] = None) -> float:
        """The norm of the unrestricted operator (the weights' scale)."""
        return self.operator.norm(n_iter, generator)

    def __repr__(self) -> str:
        return f"SupportOperator({self.operator!r}, {int(self.mask.sum())} of {self.mask.numel()} voxels)"


class SupportConstraint:
    """A data-consistency step over a support: the step of ``A M`` started at ``M x``, its result times ``M``.

    Args:
        factory: ``factory(operator, measurements) -> step`` (e.g. ``ConjugateGradientDC``).
        operator: the projector ``A``.
        measurements: the sinogram ``y``.
        mask: the support (:func:`visual_hull`), of ``operator.domain_shape``.
    """

    def __init__(
        self,
        factory: Callable[[LinearOperator, torch.Tensor], DataConsistency],
        operator: LinearOperator,
        measurements: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        restricted = SupportOperator(operator, mask)
        self.mask = restricted.mask
        self.step = factory(restricted, measurements)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The data-consistent image with the voxels outside the support at air (0)."""
        mask = self.mask.to(image.dtype)
        return self.step(image * mask).mul_(mask)

    def __repr__(self) -> str:
        return f"SupportConstraint({self.step!r}, {int(self.mask.sum())} of {self.mask.numel()} voxels)"
