"""The simulated scan as one value object: beam, views or arc and step, photons, electronic noise.

One rule turns the settings into a geometry (:func:`make_geometry`): an arc of 180 degrees or
more is a sparse-view scan of ``views`` angles (over 180 degrees for parallel beam, 360 for fan
and cone beam); a smaller arc is a limited-angle scan at ``step_degrees`` steps, and ``views``
is not used. The inference workflow, the evaluation, MONAI Label's size guard and the training
validation ask an :class:`Acquisition` instead of testing the settings themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from bundle.physics.geometry import Geometry, limited_angle, sparse_view
from bundle.physics.operators.base import LinearOperator
from bundle.physics.simulation import MU_MAX, simulate_sinogram
from bundle.settings import setting_number

__all__ = ["BEAMS", "Acquisition", "detector_bins", "is_limited_angle", "make_geometry", "planned_views"]

#: The beams a simulated scan can have (cone beam needs a GPU backend).
BEAMS: tuple[str, ...] = ("parallel", "fan", "cone")
_NULL = (None, "", "null", "None", "none")


def is_limited_angle(arc_degrees: float) -> bool:
    """The one rule: an arc below 180 degrees is a limited-angle scan, anything else sparse view."""
    return float(arc_degrees) < 180.0


def planned_views(views: int, arc_degrees: float = 180.0, step_degrees: float = 1.0) -> int:
    """The number of views :func:`make_geometry` gives, computed without building any angles."""
    if not is_limited_angle(arc_degrees):
        return int(views)
    return max(1, int(round(arc_degrees / step_degrees)))


def make_geometry(
    vol_shape: Sequence[int],
    voxel_size: Sequence[float],
    views: int = 8,
    arc_degrees: float = 180.0,
    step_degrees: float = 1.0,
    beam: str = "parallel",
) -> Geometry:
    """Sparse view (``views`` angles) for ``arc_degrees >= 180``, else limited angle (``arc_degrees`` at ``step_degrees``)."""
    if not is_limited_angle(arc_degrees):
        return sparse_view(int(views), vol_shape, voxel_size, beam=beam)
    return limited_angle(float(arc_degrees), float(step_degrees), vol_shape, voxel_size, beam=beam)


def detector_bins(geometry: Geometry) -> int:
    """Detector bins per view of a slice-stack geometry; ``rows * cols / Z`` for cone beam (the same sinogram size)."""
    det_shape = getattr(geometry, "det_shape", None)
    if det_shape is not None:
        return max(1, int(det_shape[0]) * int(det_shape[1]) // max(int(geometry.vol_shape[0]), 1))
    return int(geometry.det_count)


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """A simulated CT scan; the settings are checked on construction, each error naming its setting.

    Args:
        views: projections of the sparse-view scan (``arc_degrees >= 180``).
        arc_degrees: the scanned arc; below 180 a limited-angle scan at ``step_degrees``.
        step_degrees: angular step of the limited-angle scan.
        beam: one of :data:`BEAMS`.
        photons: incident photons per ray (``None``: noiseless).
        electronic_noise: standard deviation of the electronic noise in counts (needs ``photons``).
    """

    views: int = 8
    arc_degrees: float = 180.0
    step_degrees: float = 1.0
    beam: str = "parallel"
    photons: float | None = None
    electronic_noise: float = 0.0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("views", int(setting_number("views", self.views, 1, integer=True)))
        put("arc_degrees", float(setting_number("arc_degrees", self.arc_degrees, 0.0, 360.0, open_minimum=True)))
        put("step_degrees", float(setting_number("step_degrees", self.step_degrees, 0.0, open_minimum=True)))
        if self.beam not in BEAMS:
            raise ValueError(f"beam must be one of {BEAMS}, got {self.beam!r}")
        photons = None if self.photons in _NULL else float(setting_number("photons", self.photons, 0.0, open_minimum=True))
        put("photons", photons)
        put("electronic_noise", float(setting_number("electronic_noise", self.electronic_noise, 0.0)))

    @property
    def limited_angle(self) -> bool:
        """Whether the scan covers less than 180 degrees (then ``step_degrees`` sets the views)."""
        return is_limited_angle(self.arc_degrees)

    @property
    def n_views(self) -> int:
        """The number of projections, computed without building any angles."""
        return planned_views(self.views, self.arc_degrees, self.step_degrees)

    def geometry(self, vol_shape: Sequence[int], voxel_size: Sequence[float]) -> Geometry:
        """The geometry of this scan of a ``(Z, H, W)`` grid with voxel size ``(dz, dy, dx)`` mm."""
        return make_geometry(vol_shape, voxel_size, self.views, self.arc_degrees, self.step_degrees, self.beam)

    def detector_bins(self, vol_shape: Sequence[int], voxel_size: Sequence[float]) -> int:
        """Detector bins per view of this scan of the grid, from a one-view probe (no angles built)."""
        return detector_bins(make_geometry(vol_shape, voxel_size, 1, 180.0, 1.0, self.beam))

    def simulate(
        self,
        x: torch.Tensor,
        operator: LinearOperator,
        generator: torch.Generator | None = None,
        mu_max: float = MU_MAX,
    ) -> torch.Tensor:
        """The normalised sinogram of ``x`` through ``operator`` with this scan's noise (``simulate_sinogram``)."""
        return simulate_sinogram(x, operator, self.photons, self.electronic_noise, generator, mu_max=mu_max)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dictionary (the command line's names)."""
        return dataclasses.asdict(self)
