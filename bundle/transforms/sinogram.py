"""MONAI MapTransforms that produce sinograms: simulate them from a volume, or load measured ones.

A sinogram always travels with its geometry (docs/architecture.md): in a data dictionary,
``sinogram`` holds a float32 tensor of ``geometry.sino_shape`` (``(Z, n_views, n_det)`` for
slice stacks) and ``geometry`` the :mod:`bundle.physics.geometry` object. On disk, a sinogram is a
``.npy`` or ``.nii``/``.nii.gz`` array in that same order (the NIfTI data array is taken as
is) next to its geometry JSON (:func:`save_sinogram` writes both). The JSON may record the grid
of the CT the sinogram was made from (its ``"source"`` block, :class:`bundle.physics.geometry.SourceGrid`):
:func:`reconstruction_affine` then places a reconstruction on that CT's grid, so that it overlays it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from bundle.physics.acquisition import Acquisition
from bundle.physics.geometry import Geometry, SourceGrid, check_angles, load_json
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_MAX, check_line_integrals
from bundle.settings import as_bool
from bundle.transforms.layout import to_zhw, voxel_size_zhw

__all__ = [
    "SimulateSinogramd",
    "LoadSinogramd",
    "save_sinogram",
    "load_sinogram",
    "geometry_path_for",
    "find_sinogram_geometry",
    "is_geometry_json",
    "source_grid",
    "reconstruction_affine",
]

PathLike = Union[str, Path]


def geometry_path_for(sinogram_path: PathLike) -> Path:
    """Default geometry JSON next to a sinogram file: ``scan.npy`` / ``scan.nii.gz`` -> ``scan.json``."""
    p = Path(sinogram_path)
    name = p.name
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_suffix(".json")


def is_geometry_json(path: PathLike) -> bool:
    """Whether ``path`` is a JSON file holding a geometry (an object with a ``"beam"`` key).

    Other JSON files beside a volume (e.g. the BIDS sidecar ``ct.json`` that dcm2niix writes next
    to ``ct.nii.gz``) are not geometries.
    """
    import json

    p = Path(path)
    if not p.is_file():
        return False
    try:
        d = json.loads(p.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "beam" in d


def find_sinogram_geometry(path: PathLike, geometry_path: Optional[PathLike] = None) -> Optional[Path]:
    """The geometry JSON of a sinogram input, or None when ``path`` is a CT volume.

    An input is a sinogram when a geometry is given, or when a geometry JSON lies beside it
    under the name :func:`save_sinogram` gives it (:func:`geometry_path_for`: ``scan.nii.gz`` ->
    ``scan.json``), whatever its suffix. A ``.npy`` file is always a sinogram.

    Args:
        path: the input file (or DICOM folder).
        geometry_path: the geometry JSON given by the user (``geometry_path``); empty or None: look beside the file.

    Raises:
        ValueError: a given geometry file that does not exist, or a ``.npy`` input without a
            geometry JSON, naming the file.
    """
    p = Path(path)
    if geometry_path not in (None, "") and str(geometry_path).strip().lower() not in ("none", "null"):
        gpath = Path(geometry_path)
        if not gpath.is_file():
            raise ValueError(f"geometry_path {gpath} (the geometry of sinogram {p}) does not exist")
        return gpath
    if p.is_dir():
        return None
    beside = geometry_path_for(p)
    if is_geometry_json(beside):
        return beside
    if p.name.lower().endswith(".npy"):
        raise ValueError(
            f"sinogram {p} has no geometry: expected {beside} beside it (as save_sinogram writes it) or set geometry_path"
        )
    return None


def source_grid(source: Any, geometry: Geometry, what: str = "the source") -> SourceGrid:
    """The :class:`SourceGrid` of the volume a sinogram of ``geometry`` was made from.

    Args:
        source: a :class:`SourceGrid`; an image with an ``affine`` (a nibabel image ``(X, Y, Z)``,
            a MONAI MetaTensor ``(1, X, Y, Z)``), whose shape must be the geometry's grid; or a
            4 x 4 affine alone (array-like), for the geometry's grid.
        geometry: the sinogram's geometry.
        what: how to name the source in a message.

    Raises:
        ValueError: the source's grid is not the geometry's (shape or spacing), or not an affine.
    """
    if isinstance(source, SourceGrid):
        grid = source
    elif hasattr(source, "affine"):
        affine = source.affine.detach().cpu() if isinstance(source.affine, torch.Tensor) else source.affine
        grid = SourceGrid(affine, tuple(int(n) for n in tuple(source.shape)[-3:]))
    else:
        grid = SourceGrid(source.detach().cpu() if isinstance(source, torch.Tensor) else source, geometry.vol_shape[::-1])
    grid.check(geometry, what)
    return grid


def reconstruction_affine(geometry: Geometry, source: Optional[SourceGrid] = None) -> np.ndarray:
    """The NIfTI affine of a reconstruction on ``geometry``'s grid (array ``(X, Y, Z)``, :func:`from_zhw`).

    With the sinogram's source grid (``bundle.physics.geometry.load_source_grid``) it is the
    source CT's affine, so the reconstruction overlays that CT; without it, the grid's voxel size
    with the volume centred on the origin (the rotation axis).
    """
    if source is not None:
        source.check(geometry, "the source grid")
        return np.asarray(source.affine, dtype=np.float64)
    dz, dy, dx = geometry.voxel_size
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = -0.5 * (np.array(geometry.vol_shape[::-1]) - 1) * np.array([dx, dy, dz])
    return affine


def save_sinogram(
    path: PathLike, sinogram: torch.Tensor | np.ndarray, geometry: Geometry, source: Any = None
) -> Path:
    """Write ``sinogram`` (``.npy`` or ``.nii.gz``) and its geometry JSON; returns the JSON path.

    Args:
        path: the sinogram file.
        sinogram: an array of ``geometry.sino_shape``.
        geometry: its geometry.
        source: the CT it was made from, recorded as the JSON's ``"source"`` block so that a
            reconstruction lies on that CT's grid: anything :func:`source_grid` takes (the CT
            image itself, a MetaTensor, or its affine); None records none.

    Raises:
        ValueError: when the shape differs from ``geometry.sino_shape``, or ``source`` is not the geometry's grid.
    """
    arr = sinogram.detach().cpu().numpy() if isinstance(sinogram, torch.Tensor) else np.asarray(sinogram)
    arr = arr.astype(np.float32)
    if tuple(arr.shape) != tuple(geometry.sino_shape):
        raise ValueError(f"sinogram shape {tuple(arr.shape)} does not match the geometry's {geometry.sino_shape}")
    grid = source_grid(source, geometry, f"the source of sinogram {path}") if source is not None else None
    p = Path(path)
    if p.name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    elif p.suffix == ".npy":
        np.save(p, arr)
    else:
        raise ValueError(f"{p}: sinogram files are .npy, .nii or .nii.gz")
    gpath = geometry_path_for(p)
    geometry.to_json(gpath, source=grid)
    return gpath


def load_sinogram(
    path: PathLike,
    geometry_path: Optional[PathLike] = None,
    allow_implausible: bool = False,
    limit_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, Geometry]:
    """Read a sinogram file and its geometry JSON, checking size, shape, finiteness and plausibility.

    The geometry is read first and refused when too large to reconstruct (``bundle.limits``),
    before the array is read.

    Args:
        path: ``.npy``, ``.nii`` or ``.nii.gz`` array of ``geometry.sino_shape``.
        geometry_path: geometry JSON; default :func:`geometry_path_for` ``(path)``.
        allow_implausible: accept line integrals that are negative or too large for the field of
            view (``bundle.physics.check_line_integrals``) and angles outside [0, 2 pi] or in
            degrees (``bundle.physics.geometry.check_angles``).
        limit_bytes: memory limit of the size guard; default ``bundle.limits.memory_limit_bytes()``.

    Raises:
        ValueError: unknown file type, missing geometry, a shape mismatch (naming both files
            and shapes), NaN/Inf values or implausible values (naming the file).
        bundle.limits.ResourceLimitError: a geometry too large for the memory limit.
    """
    p = Path(path)
    gpath = Path(geometry_path) if geometry_path is not None else geometry_path_for(p)
    if not p.is_file():
        raise ValueError(f"sinogram file {p} does not exist")
    if not gpath.is_file():
        raise ValueError(f"geometry file {gpath} for sinogram {p} does not exist")
    geometry = load_json(gpath, limit_bytes=limit_bytes)
    try:
        if p.name.endswith((".nii.gz", ".nii")):
            import nibabel as nib

            arr = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
        elif p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False).astype(np.float32)
        else:
            raise ValueError(f"{p}: sinogram files are .npy, .nii or .nii.gz")
    except (OSError, EOFError, ValueError) as err:
        if str(p) in str(err):
            raise
        raise ValueError(f"sinogram {p} cannot be read: {type(err).__name__}: {err}") from err
    if tuple(arr.shape) != tuple(geometry.sino_shape):
        raise ValueError(
            f"sinogram {p} has shape {tuple(arr.shape)} but its geometry {gpath} expects {geometry.sino_shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"sinogram {p} contains NaN or Inf values")
    if not allow_implausible:
        check_angles(geometry, str(gpath))
        check_line_integrals(arr, 2.0 * geometry.fov_radius, str(p))
    return torch.from_numpy(arr), geometry


class SimulateSinogramd(Randomizable, MapTransform):
    """Simulate a sinogram from a normalised channel-first volume ``(1, X, Y, Z)``.

    The scan is an :class:`bundle.physics.acquisition.Acquisition` (checked on construction,
    each error naming its setting), whose geometry is built from the image's shape and spacing
    (MetaTensor pixdim, or ``voxel_size``): ``n_views`` angles, or a limited-angle scan of
    ``arc_degrees`` at ``step_degrees`` when ``arc_degrees`` is set below 180. Stores the
    sinogram (float32 tensor of ``geometry.sino_shape``) under ``sinogram_key`` and the geometry
    under ``geometry_key``. Noise (when ``photons`` is set) is seeded from the transform's random
    state (``set_random_state``), so a seeded pipeline is reproducible.

    Args:
        keys: the one key of the normalised image.
        sinogram_key: output key of the sinogram.
        geometry_key: output key of the geometry.
        n_views: views of the sparse-view scan.
        beam: ``"parallel"`` or ``"fan"`` (or ``"cone"`` where a GPU backend exists).
        arc_degrees: if set, the scanned arc (below 180: a limited-angle scan ...
        step_degrees: ... at this angular step).
        photons: incident photons per ray (``None``: noiseless).
        electronic_noise: electronic noise standard deviation in counts.
        mu_max: attenuation (1/mm) of normalised value 1.
        voxel_size: ``(dz, dy, dx)`` in mm, overriding the image's spacing.
        backend: projector backend for :func:`bundle.physics.operators.make_operator`.
        allow_missing_keys: skip a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        sinogram_key: str = "sinogram",
        geometry_key: str = "geometry",
        n_views: int = 8,
        beam: str = "parallel",
        arc_degrees: Optional[float] = None,
        step_degrees: float = 1.0,
        photons: Optional[float] = None,
        electronic_noise: float = 0.0,
        mu_max: float = MU_MAX,
        voxel_size: Optional[Sequence[float]] = None,
        backend: str = "auto",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SimulateSinogramd takes exactly one image key, got {self.keys}")
        self.sinogram_key, self.geometry_key = sinogram_key, geometry_key
        arc = 180.0 if arc_degrees is None else arc_degrees
        self.acquisition = Acquisition(n_views, arc, step_degrees, beam, photons, electronic_noise)
        self.mu_max = mu_max
        self.voxel_size = tuple(voxel_size) if voxel_size is not None else None
        self.backend = backend
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the noise seed from the transform's random state."""
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def geometry_for(self, vol_shape: Sequence[int], voxel_size: Sequence[float]) -> Geometry:
        """The geometry this transform builds for a ``(Z, H, W)`` volume."""
        return self.acquisition.geometry(vol_shape, voxel_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, torch.Tensor):
                img = torch.as_tensor(np.asarray(img))
            vol = to_zhw(img).to(torch.float32).contiguous()
            voxel = self.voxel_size if self.voxel_size is not None else voxel_size_zhw(img)
            geometry = self.geometry_for(tuple(vol.shape), voxel)
            op = make_operator(geometry, backend=self.backend, device=vol.device)
            gen = torch.Generator(device=vol.device).manual_seed(self._seed)
            d[self.sinogram_key] = self.acquisition.simulate(vol, op, generator=gen, mu_max=self.mu_max)
            d[self.geometry_key] = geometry
        return d


class LoadSinogramd(MapTransform):
    """Load a measured sinogram (``.npy``/``.nii.gz``, ``(Z, n_views, n_det)``) and its geometry JSON.

    ``data[key]`` is the sinogram's path; the geometry JSON's path is ``data[geometry_key]``
    when that is a path, else the file next to the sinogram (``scan.npy`` -> ``scan.json``).
    Replaces ``data[key]`` by a float32 tensor and ``data[geometry_key]`` by the geometry.

    Args:
        keys: the one key holding the sinogram path.
        geometry_key: key of the geometry JSON path (input) and geometry object (output).
        allow_implausible: accept implausible line integrals and angles (:func:`load_sinogram`).
        allow_missing_keys: skip a missing key.

    Raises:
        ValueError: shape mismatch between sinogram and geometry (naming both files and
            shapes), NaN/Inf or implausible values (naming the file), missing files.
    """

    def __init__(
        self,
        keys: KeysCollection = "sinogram",
        geometry_key: str = "geometry",
        allow_implausible: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LoadSinogramd takes exactly one sinogram key, got {self.keys}")
        self.geometry_key = geometry_key
        self.allow_implausible = as_bool(allow_implausible, "allow_implausible")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            gpath = d.get(self.geometry_key)
            gpath = gpath if isinstance(gpath, (str, Path)) else None
            sino, geometry = load_sinogram(d[key], gpath, allow_implausible=self.allow_implausible)
            d[key] = sino
            d[self.geometry_key] = geometry
        return d
