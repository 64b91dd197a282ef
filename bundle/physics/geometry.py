"""CT acquisition geometries as small immutable value objects (lengths in mm, angles in radians).

Three geometries are provided:

- :class:`ParallelBeamGeometry`: a stack of 2D parallel-beam slices (what the DiffusionBlend
  paper used); sinogram ``(Z, n_views, det_count)``.
- :class:`FanBeamGeometry`: a stack of 2D fan-beam slices with a flat detector; sinogram
  ``(Z, n_views, det_count)``.
- :class:`ConeBeamGeometry`: a 3D circular cone-beam scan with a flat detector; sinogram
  ``(det_rows, n_views, det_cols)`` (ASTRA's 3D order).

Volumes are ``(Z, H, W)`` with voxel size ``(dz, dy, dx)``, centred on the rotation axis.
A geometry JSON may also record where that volume lies in the world (:class:`SourceGrid`, the
optional ``"source"`` block: the affine and shape of the CT a sinogram was made from), so that
a reconstruction from the sinogram can be written on the source CT's grid.
Equality compares the integer fields exactly and the float fields with a relative tolerance
of :data:`RTOL`; ``eval(repr(g)) == g`` rebuilds a geometry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union

import numpy as np

__all__ = [
    "RTOL",
    "ParallelBeamGeometry",
    "FanBeamGeometry",
    "ConeBeamGeometry",
    "Geometry",
    "sparse_view",
    "limited_angle",
    "load_json",
    "from_dict",
    "check_angles",
    "SourceGrid",
    "load_source_grid",
]

#: Relative tolerance of geometry equality (float fields); absolute floor ``RTOL * 1e-3``.
RTOL: float = 1e-6

#: Relative tolerance of a source grid's spacing against the geometry's voxel size (NIfTI headers hold float32).
SPACING_RTOL: float = 1e-4

#: Default source-to-rotation-axis and rotation-axis-to-detector distances (mm) of the fan
#: and cone factories: typical of clinical scanners (about 595 mm and 490 mm).
DEFAULT_SOURCE_ORIGIN: float = 595.0
DEFAULT_ORIGIN_DET: float = 490.0


def _int_tuple(name: str, value: Sequence[int], length: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence of {length} integers, got {value!r}") from err
    if len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(out)}: {value!r}")
    if any(o != v for o, v in zip(out, value)):
        raise ValueError(f"{name} must contain integers, got {value!r}")
    if any(o < 1 for o in out):
        raise ValueError(f"{name} entries must be >= 1, got {value!r}")
    return out


def _float_tuple(name: str, value: Sequence[float], length: int | None = None, positive: bool = True) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from err
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(out)}")
    if not all(math.isfinite(o) for o in out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and any(o <= 0 for o in out):
        raise ValueError(f"{name} entries must be > 0, got {value!r}")
    return out


def _positive_float(name: str, value: float) -> float:
    out = float(value)
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def _positive_int(name: str, value: int) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b):
            return False
        if all(isinstance(v, int) for v in a + b):
            return a == b
        return bool(np.allclose(a, b, rtol=RTOL, atol=RTOL * 1e-3))
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(np.isclose(a, b, rtol=RTOL, atol=RTOL * 1e-3))


class _GeometryBase:
    """Shared behaviour: validation helpers, tolerance equality, dict/JSON round trip."""

    kind: ClassVar[str]
    vol_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    angles: tuple[float, ...]

    def _check_common(self) -> None:
        object.__setattr__(self, "vol_shape", _int_tuple("vol_shape", self.vol_shape, 3))
        object.__setattr__(self, "voxel_size", _float_tuple("voxel_size", self.voxel_size, 3))
        angles = _float_tuple("angles", self.angles, positive=False)
        if len(angles) < 1:
            raise ValueError("angles must contain at least one projection angle")
        object.__setattr__(self, "angles", angles)

    @property
    def n_views(self) -> int:
        """Number of projection angles."""
        return len(self.angles)

    @property
    def fov_radius(self) -> float:
        """Radius (mm) of the circle circumscribing one axial slice of the volume."""
        _, h, w = self.vol_shape
        _, dy, dx = self.voxel_size
        return 0.5 * math.hypot(h * dy, w * dx)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_close(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __hash__(self) -> int:
        # Only exact (integer) fields, so that geometries equal within the tolerance hash equally.
        ints = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), int))  # type: ignore[arg-type]
        return hash((self.kind, self.vol_shape, self.n_views, ints))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary with a ``"beam"`` key naming the geometry type."""
        d: dict[str, Any] = {"beam": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_json(self, path: Union[str, Path], source: "SourceGrid | None" = None) -> None:
        """Write :meth:`to_dict` as JSON to ``path``, with the ``"source"`` block of ``source`` when given.

        Raises:
            ValueError: ``source`` is not this geometry's grid (:meth:`SourceGrid.check`).
        """
        d = self.to_dict()
        if source is not None:
            source.check(self, str(path))
            d["source"] = source.to_dict()
        Path(path).write_text(json.dumps(d, indent=1))

    def replace(self, **changes: Any) -> "Geometry":
        """Copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True, eq=False)
class _SliceStackGeometry(_GeometryBase):
    """A stack of identical 2D scans, one per slice, with a line detector; sinogram ``(Z, n_views, det_count)``."""

    vol_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    angles: tuple[float, ...]
    det_count: int
    det_spacing: float

    def __post_init__(self) -> None:
        self._check_common()
        object.__setattr__(self, "det_count", _positive_int("det_count", self.det_count))
        object.__setattr__(self, "det_spacing", _positive_float("det_spacing", self.det_spacing))

    @property
    def sino_shape(self) -> tuple[int, int, int]:
        """Sinogram shape ``(Z, n_views, det_count)``."""
        return (self.vol_shape[0], self.n_views, self.det_count)


@dataclasses.dataclass(frozen=True, eq=False)
class ParallelBeamGeometry(_SliceStackGeometry):
    """Stack of 2D parallel-beam slices; sinogram ``(Z, n_views, det_count)``.

    Args:
        vol_shape: volume shape ``(Z, H, W)``.
        voxel_size: voxel size ``(dz, dy, dx)`` in mm.
        angles: projection angles in radians.
        det_count: number of detector bins per slice.
        det_spacing: detector bin width in mm.
    """

    kind: ClassVar[str] = "parallel"


@dataclasses.dataclass(frozen=True, eq=False)
class FanBeamGeometry(_SliceStackGeometry):
    """Stack of 2D fan-beam slices with a flat detector; sinogram ``(Z, n_views, det_count)``.

    Args:
        vol_shape: volume shape ``(Z, H, W)``.
        voxel_size: voxel size ``(dz, dy, dx)`` in mm.
        angles: source angles in radians.
        det_count: number of detector bins per slice.
        det_spacing: detector bin width in mm (on the detector, not at the rotation axis).
        source_origin: source-to-rotation-axis distance in mm (must exceed :attr:`fov_radius`).
        origin_det: rotation-axis-to-detector distance in mm.
    """

    kind: ClassVar[str] = "fan"
    source_origin: float
    origin_det: float

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "source_origin", _positive_float("source_origin", self.source_origin))
        object.__setattr__(self, "origin_det", _positive_float("origin_det", self.origin_det))
        if self.source_origin <= self.fov_radius:
            raise ValueError(
                f"source_origin={self.source_origin} mm puts the source inside the field of view "
                f"(radius {self.fov_radius:.3f} mm)"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class ConeBeamGeometry(_GeometryBase):
    """Circular cone-beam scan with a flat detector; sinogram ``(det_rows, n_views, det_cols)``.

    Args:
        vol_shape: volume shape ``(Z, H, W)``.
        voxel_size: voxel size ``(dz, dy, dx)`` in mm.
        angles: source angles in radians.
        det_shape: detector ``(rows, cols)``.
        det_spacing: detector pixel size ``(row spacing, column spacing)`` in mm.
        source_origin: source-to-rotation-axis distance in mm (must exceed :attr:`fov_radius`).
        origin_det: rotation-axis-to-detector distance in mm.
    """

    kind: ClassVar[str] = "cone"
    vol_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    angles: tuple[float, ...]
    det_shape: tuple[int, int]
    det_spacing: tuple[float, float]
    source_origin: float
    origin_det: float

    def __post_init__(self) -> None:
        self._check_common()
        object.__setattr__(self, "det_shape", _int_tuple("det_shape", self.det_shape, 2))
        object.__setattr__(self, "det_spacing", _float_tuple("det_spacing", self.det_spacing, 2))
        object.__setattr__(self, "source_origin", _positive_float("source_origin", self.source_origin))
        object.__setattr__(self, "origin_det", _positive_float("origin_det", self.origin_det))
        if self.source_origin <= self.fov_radius:
            raise ValueError(
                f"source_origin={self.source_origin} mm puts the source inside the field of view "
                f"(radius {self.fov_radius:.3f} mm)"
            )

    @property
    def sino_shape(self) -> tuple[int, int, int]:
        """Sinogram shape ``(det_rows, n_views, det_cols)``."""
        return (self.det_shape[0], self.n_views, self.det_shape[1])


Geometry = Union[ParallelBeamGeometry, FanBeamGeometry, ConeBeamGeometry]

_CLASSES: dict[str, type] = {c.kind: c for c in (ParallelBeamGeometry, FanBeamGeometry, ConeBeamGeometry)}


def from_dict(d: dict[str, Any]) -> Geometry:
    """Rebuild a geometry from :meth:`to_dict` output (the ``"beam"`` key selects the class; a ``"source"`` block is not part of it)."""
    if not isinstance(d, dict) or "beam" not in d:
        raise ValueError(f"a geometry dictionary needs a 'beam' key, got {d!r}")
    d = dict(d)
    d.pop("source", None)  # where the volume lies in the world: read by load_source_grid
    beam = d.pop("beam")
    if beam not in _CLASSES:
        raise ValueError(f"unknown beam {beam!r}; expected one of {sorted(_CLASSES)}")
    cls = _CLASSES[beam]
    names = {f.name for f in dataclasses.fields(cls)}
    missing, extra = names - set(d), set(d) - names
    if missing or extra:
        raise ValueError(f"{beam} geometry: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    return cls(**d)


def load_json(path: Union[str, Path], limit_bytes: int | None = None) -> Geometry:
    """Read a geometry written by ``to_json``, refusing one too large to reconstruct.

    Args:
        path: the JSON file.
        limit_bytes: memory limit of the size guard (``bundle.limits.check_geometry_size``);
            default ``bundle.limits.memory_limit_bytes()``.

    Raises:
        ValueError: invalid JSON or fields, naming the file.
        bundle.limits.ResourceLimitError: the geometry needs more memory than the limit, naming the file.
    """
    from bundle.limits import ResourceLimitError, check_geometry_size

    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    try:
        geometry = from_dict(d)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    try:
        check_geometry_size(geometry, limit_bytes=limit_bytes)
    except ResourceLimitError as err:
        raise ResourceLimitError(f"geometry {path}: {err}") from err
    return geometry


def check_angles(geometry: Geometry, source: str) -> None:
    """Refuse projection angles outside [0, 2 pi] or that look like degrees (whole numbers a degree or more apart).

    Args:
        geometry: the geometry.
        source: the geometry's file, for the message.

    Raises:
        ValueError: naming the file, the angles' range and the setting that accepts them anyway.
    """
    angles = np.asarray(geometry.angles, dtype=np.float64)
    low, high = float(angles.min()), float(angles.max())
    override = "set allow_implausible to true to use them anyway"
    if low < -1e-6 or high > 2.0 * math.pi + 1e-6:
        hint = " they look like degrees;" if high <= 360.0 + 1e-6 and low >= -1e-6 else ""
        raise ValueError(
            f"geometry {source}: angles range over [{low:.4g}, {high:.4g}], outside [0, 2 pi] radians;{hint} "
            f"angles are in radians ({override})"
        )
    whole = np.allclose(angles, np.round(angles), atol=1e-9)
    if len(angles) >= 3 and whole and high >= 2.0:
        raise ValueError(
            f"geometry {source}: the angles are whole numbers ({', '.join(f'{a:g}' for a in angles[:4])}, ...): "
            f"they look like degrees; angles are in radians ({override})"
        )


@dataclasses.dataclass(frozen=True)
class SourceGrid:
    """Where the volume of a geometry lies in the world: the NIfTI affine and shape of the CT a sinogram was made from.

    The geometry JSON's optional ``"source"`` block (``{"affine": 4 x 4, "shape": [X, Y, Z],
    "spacing": [dx, dy, dz]}``). The affine maps voxel indices ``(i, j, k)`` of the volume in
    NIfTI order ``(X, Y, Z)`` (``bundle.transforms.from_zhw``: the ``(Z, H, W)`` volume's
    ``[k, j, i]``) to RAS world coordinates in mm, as a NIfTI file's affine or a MONAI
    MetaTensor's ``affine`` does. It describes the geometry's own grid: ``shape`` is
    ``vol_shape`` reversed and ``spacing`` (the affine's column lengths) ``voxel_size``
    reversed, so a reconstruction on that grid is written with this affine and overlays the CT.
    A CT resampled before the sinogram was simulated is recorded by the resampled volume's affine.

    Args:
        affine: the 4 x 4 affine, any array-like (numpy, torch, nested lists): last row
            ``0 0 0 1``, an invertible 3 x 3 part.
        shape: ``(X, Y, Z)``.
    """

    affine: tuple[tuple[float, ...], ...]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        try:
            a = np.asarray(self.affine, dtype=np.float64)
        except (TypeError, ValueError):
            a = np.full(1, np.nan)
        if a.shape != (4, 4) or not np.isfinite(a).all():
            raise ValueError(f"source affine must be a finite 4 x 4 matrix, got {self.affine!r}")
        if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"source affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
        if abs(np.linalg.det(a[:3, :3])) < 1e-12:
            raise ValueError("source affine is singular (a voxel of zero volume)")
        object.__setattr__(self, "affine", tuple(tuple(float(v) for v in row) for row in a))
        object.__setattr__(self, "shape", _int_tuple("source shape", self.shape, 3))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing ``(dx, dy, dz)`` in mm: the lengths of the affine's first three columns."""
        norms = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def check(self, geometry: "Geometry", source: str) -> None:
        """Refuse a grid that is not the geometry's: shape ``vol_shape`` reversed, spacing ``voxel_size`` reversed.

        Raises:
            ValueError: naming ``source`` (the JSON file) and both grids.
        """
        grid, spacing = tuple(geometry.vol_shape[::-1]), tuple(geometry.voxel_size[::-1])
        if self.shape != grid or not np.allclose(self.spacing, spacing, rtol=SPACING_RTOL, atol=0.0):
            raise ValueError(
                f"{source}: the source grid (shape {list(self.shape)}, spacing {[round(v, 6) for v in self.spacing]}) "
                f"is not the geometry's grid (vol_shape {list(geometry.vol_shape)} reversed: {list(grid)}, "
                f"voxel_size reversed: {list(spacing)}); record the affine of the volume the sinogram was made from"
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``"source"`` block: ``affine``, ``shape`` and (for readers) ``spacing``."""
        return {"affine": [list(row) for row in self.affine], "shape": list(self.shape), "spacing": list(self.spacing)}

    @staticmethod
    def from_dict(d: Any) -> "SourceGrid":
        """Read a ``"source"`` block; a ``spacing`` in it must equal the affine's column lengths.

        Raises:
            ValueError: a block that is not an object with ``affine`` and ``shape``, or fields that disagree.
        """
        if not isinstance(d, dict) or not {"affine", "shape"} <= set(d):
            raise ValueError(f"a source block needs 'affine' and 'shape' (and optionally 'spacing'), got {d!r}")
        extra = set(d) - {"affine", "shape", "spacing"}
        if extra:
            raise ValueError(f"source block: unknown fields {sorted(extra)}")
        grid = SourceGrid(d["affine"], d["shape"])
        if "spacing" in d:
            spacing = _float_tuple("source spacing", d["spacing"], 3)
            if not np.allclose(spacing, grid.spacing, rtol=SPACING_RTOL, atol=0.0):
                raise ValueError(
                    f"source spacing {list(spacing)} differs from the affine's column lengths "
                    f"{[round(v, 6) for v in grid.spacing]}"
                )
        return grid


def load_source_grid(path: Union[str, Path]) -> SourceGrid | None:
    """The ``"source"`` block of a geometry JSON, checked against its geometry; None when the JSON has none.

    Raises:
        ValueError: an invalid block or one that is not the geometry's grid, naming the file.
    """
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(d, dict) or "source" not in d:
        return None
    try:
        grid = SourceGrid.from_dict(d["source"])
        geometry = from_dict(d)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    grid.check(geometry, str(path))
    return grid


for _cls in _CLASSES.values():
    _cls.from_dict = staticmethod(from_dict)  # type: ignore[attr-defined]
    _cls.load_json = staticmethod(load_json)  # type: ignore[attr-defined]


def _make(
    beam: str,
    angles: np.ndarray,
    vol_shape: Sequence[int],
    voxel_size: Sequence[float],
    det_count: int | None,
    det_spacing: float | None,
    source_origin: float,
    origin_det: float,
) -> Geometry:
    vs = _int_tuple("vol_shape", vol_shape, 3)
    vx = _float_tuple("voxel_size", voxel_size, 3)
    z, h, w = vs
    dz, dy, dx = vx
    ang = tuple(float(a) for a in angles)
    if beam == "parallel":
        spacing = dx if det_spacing is None else det_spacing
        count = math.ceil(math.sqrt(2.0) * max(h, w) * max(dx, dy) / spacing - 1e-9) if det_count is None else det_count
        return ParallelBeamGeometry(vs, vx, ang, count, spacing)
    if beam not in ("fan", "cone"):
        raise ValueError(f"unknown beam {beam!r}; expected 'parallel', 'fan' or 'cone'")
    r = 0.5 * math.hypot(h * dy, w * dx)
    if source_origin <= r:
        raise ValueError(f"source_origin={source_origin} mm is inside the field of view (radius {r:.3f} mm)")
    mag = (source_origin + origin_det) / source_origin
    half_width = (source_origin + origin_det) * math.tan(math.asin(r / source_origin))
    spacing = max(dx, dy) * mag if det_spacing is None else det_spacing
    count = math.ceil(2.0 * half_width / spacing - 1e-9) if det_count is None else det_count
    if beam == "fan":
        return FanBeamGeometry(vs, vx, ang, count, spacing, source_origin, origin_det)
    row_spacing = dz * mag
    rows = math.ceil(z * dz * (source_origin + origin_det) / (source_origin - r) / row_spacing - 1e-9)
    return ConeBeamGeometry(vs, vx, ang, (rows, count), (row_spacing, spacing), source_origin, origin_det)


def sparse_view(
    n_views: int,
    vol_shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    beam: str = "parallel",
    det_count: int | None = None,
    det_spacing: float | None = None,
    source_origin: float = DEFAULT_SOURCE_ORIGIN,
    origin_det: float = DEFAULT_ORIGIN_DET,
) -> Geometry:
    """``n_views`` angles evenly over 180 degrees (parallel) or 360 degrees (fan, cone).

    The detector covers the field of view by default: parallel ``ceil(sqrt(2) max(H, W))`` bins
    of one pixel; fan/cone a flat detector with magnified pixel-size bins spanning the fan that
    encloses the slice's circumscribed circle (cone rows: the volume's height, magnified at the
    point nearest the source). For cone, ``det_spacing`` sets the column spacing only.

    Args:
        n_views: number of projections (>= 1).
        vol_shape: ``(Z, H, W)``.
        voxel_size: ``(dz, dy, dx)`` in mm.
        beam: ``"parallel"``, ``"fan"`` or ``"cone"``.
        det_count: detector bins (columns for cone); default covers the field of view.
        det_spacing: detector bin width in mm; default one (magnified) pixel.
        source_origin: source-to-axis distance (fan/cone), mm.
        origin_det: axis-to-detector distance (fan/cone), mm.
    """
    n = _positive_int("n_views", n_views)
    arc = math.pi if beam == "parallel" else 2.0 * math.pi
    angles = np.arange(n, dtype=np.float64) * (arc / n)
    return _make(beam, angles, vol_shape, voxel_size, det_count, det_spacing, source_origin, origin_det)


def limited_angle(
    arc_degrees: float,
    step_degrees: float,
    vol_shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    beam: str = "parallel",
    det_count: int | None = None,
    det_spacing: float | None = None,
    source_origin: float = DEFAULT_SOURCE_ORIGIN,
    origin_det: float = DEFAULT_ORIGIN_DET,
) -> Geometry:
    """Angles ``0, step, 2 step, ...`` below ``arc`` degrees: ``round(arc / step)`` views.

    For example ``limited_angle(90, 1, ...)`` gives 90 views at 0..89 degrees. Other arguments
    as in :func:`sparse_view`.
    """
    arc = _positive_float("arc_degrees", arc_degrees)
    step = _positive_float("step_degrees", step_degrees)
    if step > arc:
        raise ValueError(f"step_degrees={step} is larger than arc_degrees={arc}")
    if arc > 360.0:
        raise ValueError(f"arc_degrees={arc} exceeds 360")
    n = max(1, int(round(arc / step)))
    angles = np.deg2rad(np.arange(n, dtype=np.float64) * step)
    return _make(beam, angles, vol_shape, voxel_size, det_count, det_spacing, source_origin, origin_det)
