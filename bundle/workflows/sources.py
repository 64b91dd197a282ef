"""The inputs of the reconstruction workflow: which files (one, a folder, a datalist), and what each one gives.

An input is either kind:

- a CT volume in HU (NIfTI, NRRD, MHA or a DICOM series folder): the config's ``preprocessing``
  resamples it to the model grid; :class:`VolumeSource` simulates the measurements from it with
  the :class:`~bundle.physics.acquisition.Acquisition`, maps a reconstruction back to the input's
  grid and affine with the config's ``postprocessing`` (``Invertd``), and gives the input itself
  as the ground truth;
- a measured sinogram (``.npy`` or NIfTI, ``(Z, n_views, n_det)``) with its geometry JSON
  (``geometry_path``, or ``<name>.json`` beside it): :class:`SinogramSource` gives it as the
  measurements; the reconstruction lies on the geometry's grid, centred on the rotation axis,
  and there is no ground truth.

An input is a sinogram by its geometry JSON, whatever its suffix
(``bundle.transforms.sinogram.find_sinogram_geometry``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from monai.data import MetaTensor

from bundle.physics.acquisition import Acquisition, detector_bins
from bundle.physics.geometry import Geometry, load_source_grid
from bundle.physics.simulation import MU_WATER, hu_to_normalized
from bundle.transforms.layout import from_zhw, to_zhw, voxel_size_zhw
from bundle.transforms.sinogram import find_sinogram_geometry, load_sinogram, reconstruction_affine
from bundle.workflows.data import load_datalist

__all__ = [
    "INPUT_KINDS",
    "VOLUME_SUFFIXES",
    "LoadInput",
    "SinogramSource",
    "Source",
    "VolumeSource",
    "input_name",
    "list_inputs",
    "make_source",
    "merge_shares",
    "share_inputs",
]

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
#: What a workflow accepts: either kind (recognised by the geometry JSON), or only one.
INPUT_KINDS = ("auto", "volume", "sinogram")
_NULL = (None, "", "null", "None", "none")


def input_name(path: str | Path) -> str:
    """The input's name without its (double) suffix: ``a/ct.nii.gz -> ct``; a DICOM folder's own name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _folder_inputs(folder: Path) -> list[Path]:
    """The volumes and sinograms in ``folder``: files with a volume suffix or ``.npy``, and DICOM series subfolders."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.lower().endswith((*VOLUME_SUFFIXES, ".npy")):
            found.append(p)
        elif p.is_dir() and any(q.is_file() for q in p.rglob("*")):
            found.append(p)
    return found


def _item(path: Path, geometry_path: Any, input_kind: str) -> dict[str, Any]:
    """``{"image", "geometry_path", "name"}`` of one input, refusing one of the kind ``input_kind`` does not take."""
    if not path.exists():  # a file, or a folder holding a DICOM series
        raise FileNotFoundError(f"input {path} does not exist")
    geometry = find_sinogram_geometry(path, geometry_path)
    if input_kind == "volume" and geometry is not None:
        raise ValueError(f"input {path} is a sinogram (its geometry is {geometry}), but this workflow takes CT volumes")
    if input_kind == "sinogram" and geometry is None:
        raise ValueError(
            f"input {path} is a CT volume (no geometry JSON beside it and no geometry_path), but this workflow takes sinograms"
        )
    return {"image": str(path), "geometry_path": None if geometry is None else str(geometry), "name": input_name(path)}


def list_inputs(
    input_path: str | Path | None = None,
    input_dir: str | Path | None = None,
    datalist: str | Path | None = None,
    datalist_key: str = "testing",
    geometry_path: str | Path | None = None,
    input_kind: str = "auto",
) -> list[dict[str, Any]]:
    """The inputs of a run, each ``{"image": path, "geometry_path": JSON or None, "name": output name}``.

    ``input_dir`` (every volume and sinogram in it) or ``datalist`` (the ``image`` entries of its
    ``datalist_key`` list) replaces ``input_path``; ``geometry_path`` applies to ``input_path`` only.

    Raises:
        FileNotFoundError: an input, the folder or the datalist does not exist (named).
        ValueError: both ``input_dir`` and ``datalist``, an empty folder, an input of the wrong
            kind, or two inputs with the same name (their outputs would collide).
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    input_dir = None if input_dir in _NULL else Path(input_dir)  # type: ignore[arg-type]
    datalist = None if datalist in _NULL else Path(datalist)  # type: ignore[arg-type]
    if input_dir is not None and datalist is not None:
        raise ValueError(f"set input_dir ({input_dir}) or datalist ({datalist}), not both")
    if input_dir is not None:
        if not input_dir.is_dir():
            raise FileNotFoundError(f"input_dir {input_dir} does not exist or is not a folder")
        paths = _folder_inputs(input_dir)
        if not paths:
            raise ValueError(f"input_dir {input_dir} holds no CT volume ({', '.join(VOLUME_SUFFIXES)}, DICOM folder) or sinogram (.npy)")
        items = [_item(p, None, input_kind) for p in paths]
    elif datalist is not None:
        items = [_item(Path(entry["image"]), None, input_kind) for entry in load_datalist(datalist, datalist_key)]
    else:
        items = [_item(Path(str(input_path)), None if geometry_path in _NULL else geometry_path, input_kind)]
    names = [item["name"] for item in items]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"inputs named {twice} occur more than once: their outputs would overwrite each other")
    return items


def share_inputs(items: list[Any], rank: int, world: int) -> list[Any]:
    """The inputs that process ``rank`` of ``world`` reconstructs when a run shares its inputs: ``i % world == rank``.

    Raises:
        ValueError: ``rank`` is not in ``[0, world)``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return list(items[rank::world])


def merge_shares(shares: list[list[Any]]) -> list[Any]:
    """The results of every process's :func:`share_inputs` share (``shares[rank]``) back in input order."""
    world = len(shares)
    return [shares[i % world][i // world] for i in range(sum(len(share) for share in shares))]


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause of an exception chain (MONAI wraps a transform's error in RuntimeErrors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


class LoadInput:
    """The dataset's transform: an item of :func:`list_inputs` -> the loaded input, with its ``path`` and ``name``.

    A sinogram gives ``sinogram`` (tensor) and ``geometry``; a CT volume goes through
    ``preprocessing`` (``image`` on the model grid, ``ground_truth`` in HU on the input's grid when
    the preprocessing copies it). An unreadable file is an error naming it.

    Args:
        preprocessing: the config's preprocessing of ``{"image": path}``.
        allow_implausible: accept implausible sinograms (``bundle.transforms.sinogram.load_sinogram``).
        limit_bytes: the memory limit of the sinogram's geometry.
    """

    def __init__(self, preprocessing: Callable[[dict], dict], allow_implausible: bool = False, limit_bytes: int | None = None) -> None:
        self.preprocessing = preprocessing
        self.allow_implausible = allow_implausible
        self.limit_bytes = limit_bytes

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        path = Path(item["image"])
        if item["geometry_path"] is not None:
            sino, geometry = load_sinogram(path, item["geometry_path"], self.allow_implausible, self.limit_bytes)
            source = load_source_grid(item["geometry_path"])
            return {"path": str(path), "name": item["name"], "sinogram": sino, "geometry": geometry, "source": source}
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            raise ValueError(f"input {path} is an empty folder: expected a DICOM series or a volume file")
        try:
            loaded = self.preprocessing({"image": str(path)})
        except Exception as err:
            cause = _root_cause(err)
            if isinstance(cause, ValueError) and path.name in str(cause):
                raise cause from err  # already names the file (ValidateVolumed)
            raise ValueError(f"input {path} cannot be read as a CT volume: {type(cause).__name__}: {cause}") from err
        if not torch.isfinite(torch.as_tensor(loaded["image"])).all():
            raise ValueError(f"input {path} contains NaN or Inf values")
        return {"path": str(path), "name": item["name"], **loaded}


class VolumeSource:
    """A CT volume: measurements simulated with the acquisition, the map back to the input's grid, the ground truth.

    Args:
        item: a :class:`LoadInput` result of a CT volume.
        acquisition: the simulated scan.
        mu_max: the attenuation (1/mm) of normalised value 1 (``hu_max`` of the preprocessing).
    """

    def __init__(self, item: Mapping[str, Any], acquisition: Acquisition, mu_max: float) -> None:
        self.name, self.path = item["name"], Path(item["path"])
        self.image = item["image"]
        hu = item.get("ground_truth")
        if hu is None:
            logger.warning("the preprocessing keeps no ground_truth copy of %s: no metrics", self.path)
        #: the input in normalised attenuation on its own grid ``(1, X, Y, Z)``; None when the preprocessing kept no copy
        self.ground_truth = None if hu is None else hu_to_normalized(torch.as_tensor(hu).float(), MU_WATER, mu_max)
        self.volume = to_zhw(self.image).float()  # (Z, H, W) on the model grid
        self.voxel_size = voxel_size_zhw(self.image)
        self.acquisition = acquisition
        self.mu_max = mu_max

    @property
    def plan(self) -> tuple[tuple[int, int, int], int, int, str]:
        """``(grid, n_views, n_det, beam)`` of the reconstruction, for the memory guard; no angles built."""
        shape = tuple(int(s) for s in self.volume.shape)
        return shape, self.acquisition.n_views, self.acquisition.detector_bins(shape, self.voxel_size), self.acquisition.beam  # type: ignore[return-value]

    def geometry(self) -> Geometry:
        """The simulated scan's geometry of the model grid."""
        return self.acquisition.geometry(tuple(self.volume.shape), self.voxel_size)

    def measurements(self, operator: Any, generator: torch.Generator) -> torch.Tensor:
        """The simulated sinogram of the volume (on the operator's device)."""
        return self.acquisition.simulate(self.volume.to(operator.device), operator, generator, mu_max=self.mu_max)

    def outputs(self, volumes: Mapping[str, torch.Tensor | None], postprocessing: Callable[[dict], dict]) -> dict[str, MetaTensor]:
        """``(Z, H, W)`` volumes on the model grid -> ``(1, X, Y, Z)`` images on the input's grid (``postprocessing``: ``Invertd``)."""
        data: dict[str, Any] = {"image": self.image}
        data.update({key: MetaTensor(from_zhw(v)) for key, v in volumes.items() if v is not None})
        inverted = postprocessing(data)
        return {key: inverted[key] for key, v in volumes.items() if v is not None}


class SinogramSource:
    """A measured sinogram with its geometry: the measurements themselves, the geometry's grid as the output grid, no ground truth.

    Args:
        item: a :class:`LoadInput` result of a sinogram.
    """

    ground_truth = None

    def __init__(self, item: Mapping[str, Any]) -> None:
        self.name, self.path = item["name"], Path(item["path"])
        self.sinogram: torch.Tensor = item["sinogram"]
        self._geometry: Geometry = item["geometry"]
        self._source = item.get("source")  # the grid of the CT the sinogram was made from, if its JSON records it
        self.volume = None

    @property
    def plan(self) -> tuple[tuple[int, int, int], int, int, str]:
        """``(grid, n_views, n_det, beam)`` of the reconstruction, for the memory guard."""
        g = self._geometry
        return tuple(g.vol_shape), g.n_views, detector_bins(g), g.kind  # type: ignore[return-value]

    def geometry(self) -> Geometry:
        """The geometry of the sinogram's JSON."""
        return self._geometry

    def measurements(self, operator: Any, generator: torch.Generator) -> torch.Tensor:
        """The sinogram (on the operator's device)."""
        return self.sinogram.to(operator.device)

    def outputs(self, volumes: Mapping[str, torch.Tensor | None], postprocessing: Any = None) -> dict[str, MetaTensor]:
        """``(Z, H, W)`` volumes -> ``(1, X, Y, Z)`` images on the source CT's grid when the geometry JSON records it, else centred on the rotation axis."""
        affine = reconstruction_affine(self._geometry, self._source)
        return {key: MetaTensor(from_zhw(v), affine=torch.as_tensor(affine)) for key, v in volumes.items() if v is not None}


Source = Union[VolumeSource, SinogramSource]


def make_source(item: Mapping[str, Any], acquisition: Acquisition, mu_max: float) -> Source:
    """The source of a loaded item: a :class:`SinogramSource` when it holds a sinogram, else a :class:`VolumeSource`."""
    return SinogramSource(item) if "sinogram" in item else VolumeSource(item, acquisition, mu_max)
