"""MONAI Label infer tasks that serve the bundle's reconstruction (``configs/inference.json``).

Both tasks are of type ``OTHERS``: they return an image, not a label. Each request parses the
bundle's own inference config with :class:`monai.bundle.ConfigParser`, overrides its settings
from the request (``views``, ``arc_degrees``, ``method``, ``steps``, ...), points its
``input_path`` at the study and its ``output_dir`` at a temporary folder, and runs the config's
``reconstruction`` item: the same ``network_def``, ``preprocessing``, ``inferer`` and inverse
mapping as ``python -m monai.bundle run``. Nothing of the pipeline is copied here.

- :data:`SPARSE_VIEW_CT` (``sparse_view_ct``): the study is a CT volume in HU; the configured
  measurement is simulated from it and reconstructed. The result is on the study's grid, with
  its affine and spacing.
- :data:`SINOGRAM_CT` (``sinogram_ct``): the study is a measured sinogram (NIfTI,
  ``(Z, n_views, n_det)`` in array order) with its geometry JSON beside it in the studies
  folder (``<name>.json``, as ``bundle.transforms.sinogram.save_sinogram`` writes it); the
  result is on the geometry's grid: with the source CT's affine when the JSON records it (its
  ``"source"`` block, ``bundle.physics.geometry.SourceGrid``), else centred on the rotation axis.

Each task takes only its kind of study: ``sparse_view_ct`` refuses a sinogram (a study with a
geometry JSON beside it, :func:`bundle.transforms.sinogram.find_sinogram_geometry`) and
``sinogram_ct`` a CT volume. Every numeric setting has a range (:data:`SETTINGS`, the caps
``MAX_*``), and before anything is allocated the request's memory is estimated from the
study's header (or the geometry JSON), the views and the method (:mod:`bundle.limits`) and
refused above the server's limit (``memory_limit_gb``).

Bad requests raise :class:`fastapi.HTTPException` with a message: 400 for invalid settings,
404 for a missing study, 422 for a study that cannot be reconstructed (the wrong kind, not
3D, NaN, a sinogram that does not match its geometry, more memory than the limit), 500 for
anything else. The server keeps serving.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.physics.geometry import load_json, sparse_view
from bundle.physics.acquisition import Acquisition, is_limited_angle
from bundle.limits import GB, ResourceLimitError, check_memory, estimate_memory_bytes, memory_limit_bytes
from bundle.recon.inferers import METHODS
from bundle.recon.padding import working_shape
from bundle.recon.support import SUPPORT_KINDS
from bundle.workflows.inference import input_name, planned_views
from bundle.settings import check_device
from bundle.transforms.sinogram import find_sinogram_geometry, geometry_path_for

__all__ = [
    "SPARSE_VIEW_CT",
    "SINOGRAM_CT",
    "SETTINGS",
    "ReconstructionTask",
    "check_overrides",
    "parse_settings",
    "resolve_device",
    "study_kind",
]

logger = logging.getLogger(__name__)

SPARSE_VIEW_CT = "sparse_view_ct"
SINOGRAM_CT = "sinogram_ct"

#: The task of each kind of study.
TASK_OF_KIND = {"volume": SPARSE_VIEW_CT, "sinogram": SINOGRAM_CT}

_NONE = ("", "none", "null")

#: Caps of the request settings. A request holds the server's event loop, so each bounds the
#: work one request may ask for; memory is bounded separately by the size guard.
MAX_VIEWS = 3600  # 0.05 degrees over 180, more than a clinical scanner's projections per turn
MAX_STEPS = 1000  # the prior's training schedule has T = 1000 timesteps
MAX_SAMPLES = 16
MAX_BATCH_SIZE = 256
MAX_PHOTONS = 1e12  # per ray; beyond it the Poisson noise is far below the float32 resolution
MAX_SEED = 2**31 - 1


def _bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _first(value: Any) -> Any:
    """A list value (MONAI Label clients send a task's list options as lists) means its first item."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _first(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return int(number)


def _number(name: str, value: Any) -> tuple[Any, float]:
    """``value`` (its first item if a list) and its float; a non-number is a bad request."""
    value = _first(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    return value, number


def _float(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    """A number in ``(low, high]``; NaN and infinity never pass."""
    value, number = _number(name, value)
    if isinstance(value, bool) or not math.isfinite(number) or not (low < number <= high):
        raise ValueError(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
    return number


def _photons(name: str, value: Any) -> float | None:
    value = _first(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
        return None
    return _float(name, value, 0.0, MAX_PHOTONS)


def _share(name: str, value: Any, closed: bool) -> float:
    """A number in [0, 1] (``closed``) or [0, 1)."""
    value, number = _number(name, value)
    inside = 0.0 <= number <= 1.0 if closed else 0.0 <= number < 1.0
    if isinstance(value, bool) or not inside:
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return number


def _method(name: str, value: Any) -> str:
    value = str(_first(value)).strip()
    if value not in METHODS:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(METHODS)}")
    return value


def _support(name: str, value: Any) -> str:
    value = str(_first(value)).strip()
    if value not in SUPPORT_KINDS:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(SUPPORT_KINDS)}")
    return value


def _device(name: str, value: Any) -> str:
    value = _first(value)
    text = "auto" if value is None else str(value).strip().lower()
    resolve_device(text)  # validates
    return text


#: Request settings: name -> parser (raises ValueError naming the setting and its range).
#: ``views`` and ``step_degrees`` set the number of views; the size guard bounds that number
#: by memory first and then by :data:`MAX_VIEWS` (:func:`check_request_size`).
SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "views": lambda n, v: _int(n, v, minimum=1),
    "arc_degrees": lambda n, v: _float(n, v, 0.0, 360.0),
    "step_degrees": lambda n, v: _float(n, v, 0.0, 360.0),
    "photons": _photons,
    "method": _method,
    "steps": lambda n, v: _int(n, v, minimum=1, maximum=MAX_STEPS),
    "eta": lambda n, v: _share(n, v, closed=True),
    "samples": lambda n, v: _int(n, v, minimum=1, maximum=MAX_SAMPLES),
    "warm_start": lambda n, v: _share(n, v, closed=False),
    "support": _support,
    "batch_size": lambda n, v: _int(n, v, minimum=1, maximum=MAX_BATCH_SIZE),
    "seed": lambda n, v: _int(n, v, minimum=0, maximum=MAX_SEED),
    "device": _device,
}

#: The settings of a simulated scan: a sinogram study has none of them (one definition: ``Acquisition``).
MEASUREMENT_SETTINGS = tuple(field.name for field in dataclasses.fields(Acquisition))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises:
        ValueError: an unknown name or a CUDA device that this server does not have.
    """
    return check_device(name or "auto")


def parse_settings(request: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The validated values of the settings ``names`` that ``request`` sets (the rest keep the config's).

    Raises:
        HTTPException: 400 naming the first invalid setting.
    """
    try:
        return {name: SETTINGS[name](name, request[name]) for name in names if name in request}
    except ValueError as err:
        raise _bad(str(err)) from None


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Check the app's ``--conf`` values of request settings by the requests' rules (``views``: also <= :data:`MAX_VIEWS`).

    Raises:
        ValueError: naming the first invalid ``--conf`` setting.
    """
    for name, value in overrides.items():
        try:
            if name in SETTINGS:
                SETTINGS[name](name, value)
            if name == "views" and int(value) > MAX_VIEWS:
                raise ValueError(f"views must be <= {MAX_VIEWS}, got {value!r}")
        except ValueError as err:
            raise ValueError(f"--conf {name}: {err}") from None


def study_kind(path: str | Path) -> str:
    """``"sinogram"`` when a geometry JSON lies beside the study (as ``save_sinogram`` writes it), else ``"volume"``."""
    try:
        return "sinogram" if find_sinogram_geometry(path) is not None else "volume"
    except ValueError:  # a .npy without its geometry: a sinogram that cannot be reconstructed
        return "sinogram"


#: View counts above this exceed any memory limit; the estimate is made with this many (floats cannot hold them all).
ESTIMATED_VIEWS_MAX = 10**15


def _count(n: int) -> str:
    """A view count for a message: exact up to a trillion, else its order of magnitude."""
    return str(n) if n < 10**12 else f"about 10^{len(str(n)) - 1}"


def header_grid(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]] | None:
    """The ``(X, Y, Z)`` size and spacing of a 3D study in RAS axis order, read from its header alone.

    The array axes are matched to the world axes by the header's direction cosines, as
    ``Orientationd(axcodes="RAS")`` reorders them. None when the header cannot be read (e.g. a
    DICOM folder) or the image is not 3D: then the pipeline's own checks answer.
    """
    import SimpleITK as sitk

    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() != 3:
        return None
    direction = np.abs(np.reshape(reader.GetDirection(), (3, 3)))  # column j: world direction of array axis j
    world = [int(a) for a in direction.argmax(axis=0)]
    if sorted(world) != [0, 1, 2]:
        world = [0, 1, 2]
    size, spacing = [0, 0, 0], [1.0, 1.0, 1.0]
    for axis, (n, d) in zip(world, zip(reader.GetSize(), reader.GetSpacing())):
        size[axis], spacing[axis] = int(n), float(d)
    return (size[0], size[1], size[2]), (spacing[0], spacing[1], spacing[2])


def _config_value(parser: ConfigParser) -> Callable[..., Any]:
    """``value(id, default)``: the parsed value of a config id, or ``default`` when the config has no such id."""

    def value(name: str, default: Any = None) -> Any:
        return parser.get_parsed_content(name) if name in parser else default

    return value


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (ConfigParser wraps errors raised while instantiating)."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def check_request_size(kind: str, parser: ConfigParser, image: Path, memory_limit_gb: float | None) -> None:
    """The size guard: refuse a request whose memory estimate exceeds the limit, then one with too many views.

    Runs before anything of the size of the volume or the measurement is allocated: the
    sizes come from the study's header or its geometry JSON (:func:`request_sizes`).

    Raises:
        ResourceLimitError: the estimate exceeds the limit; the message names the study,
            the settings that set the views, the estimate and the limit.
        HTTPException: 400 for more than :data:`MAX_VIEWS` simulated views.
    """
    value = _config_value(parser)
    method = value("method", "fbp")
    grid, n_views, n_det, matrix, cause = request_sizes(kind, value, image)
    if grid is not None:
        if method not in ("fbp", "sirt", "tv"):  # the diffusion methods run on a padded working volume
            grid = working_shape(grid, int(value("size_divisor", 1)), int(value("image_size", 0) or 0))
        estimate = estimate_memory_bytes(
            grid,
            min(n_views, ESTIMATED_VIEWS_MAX),
            n_det,
            method,
            batch_size=int(value("batch_size", 16)),
            slab_size=int(value("slab_size", 3)),
            samples=int(value("samples", 1)),
            projector_matrix=matrix,
        )
        limit_gb = memory_limit_gb if memory_limit_gb is not None else value("memory_limit_gb")
        z, h, w = grid
        what = f"{method} of study {image.name} ({cause}: {_count(n_views)} views, a {z} x {h} x {w} grid)"
        check_memory(estimate, what, memory_limit_bytes(limit_gb))
        logger.info("%s: an estimated %.2f GB of memory", what, estimate / GB)
    if kind == "volume" and n_views > MAX_VIEWS:
        if cause.startswith("views="):
            raise _bad(f"views must be <= {MAX_VIEWS}, got {_count(n_views)}")
        raise _bad(f"{cause} gives {_count(n_views)} views, more than {MAX_VIEWS}: use a larger step_degrees")

def request_sizes(
    kind: str, value: Callable[..., Any], image: Path
) -> tuple[tuple[int, int, int] | None, int, int, bool, str]:
    """``(grid, n_views, n_det, projector_matrix, cause)`` of the request, computed without building any angles.

    ``grid`` is the reconstruction grid ``(Z, H, W)``: a sinogram's geometry grid, or a
    volume's header grid resampled to ``spacing`` and padded to ``image_size`` and
    ``size_divisor`` as the config's preprocessing does; None when the header cannot be
    read (the pipeline's own checks answer then). ``cause`` names the settings that give
    the views.
    """
    if kind == "sinogram":
        geometry_file = geometry_path_for(image)
        geometry = load_json(geometry_file)
        rows, n_views, cols = geometry.sino_shape
        grid = tuple(int(s) for s in geometry.vol_shape)
        matrix = getattr(geometry, "det_shape", None) is None
        return grid, n_views, max(1, rows * cols // grid[0]), matrix, f"its geometry {geometry_file.name}"
    views, arc, step = value("views", 8), float(value("arc_degrees", 180.0)), float(value("step_degrees", 1.0))
    try:
        n_views = planned_views(views, arc, step)
    except OverflowError:  # arc / step is beyond the floats
        n_views = 10**309
    cause = f"arc_degrees={arc:g} at step_degrees={step:g}" if is_limited_angle(arc) else f"views={views}"
    header = header_grid(image)
    if header is None:
        return None, n_views, 1, True, cause
    size, zooms = header
    spacing = [float(s) for s in value("spacing", zooms)]
    x, y, z = (max(1, math.ceil(n * d / s - 1e-6)) for n, d, s in zip(size, zooms, spacing))
    grid = working_shape((z, y, x), int(value("size_divisor", 1)), int(value("image_size", 0) or 0))
    try:  # one view gives the detector of the scan without its angles
        probe = sparse_view(1, grid, (spacing[2], spacing[1], spacing[0]), beam=value("beam", "parallel"))
    except ValueError:
        return None, n_views, 1, True, cause  # the pipeline refuses the geometry itself
    rows, _, cols = probe.sino_shape
    return grid, n_views, max(1, rows * cols // grid[0]), getattr(probe, "det_shape", None) is None, cause


class ReconstructionTask(InferTask):
    """Reconstruct a study with the bundle's ``configs/inference.json`` and return a NIfTI image.

    Args:
        kind: ``"volume"`` (simulate the measurement from a CT volume) or ``"sinogram"``
            (a measured sinogram with its geometry JSON).
        config_file: the bundle's inference config.
        bundle_root: the bundle's root folder (``@bundle_root`` of the config).
        overrides: config ids set for every request (the app's ``--conf`` values), e.g.
            ``{"steps": 50, "ckpt_path": "/models/model.pt"}``.
        description: shown by MONAI Label clients.
        memory_limit_gb: the most memory (GB) one request may need by the estimate of
            :mod:`bundle.limits`; None: the config's ``memory_limit_gb`` if it has one, else
            ``DIFFUSIONBLEND_MEMORY_LIMIT_GB`` or half the machine's memory.
    """

    def __init__(
        self,
        kind: str,
        config_file: str | Path,
        bundle_root: str | Path,
        overrides: Mapping[str, Any] | None = None,
        description: str = "",
        memory_limit_gb: float | str | None = None,
    ) -> None:
        if kind not in TASK_OF_KIND:
            raise ValueError(f"kind must be 'volume' or 'sinogram', got {kind!r}")
        self.kind = kind
        self.config_file = Path(config_file)
        self.bundle_root = Path(bundle_root)
        self.overrides = dict(overrides or {})
        self.memory_limit_gb = memory_limit_gb
        memory_limit_bytes(memory_limit_gb)  # validates
        self.names: tuple[str, ...] = tuple(
            n for n in SETTINGS if kind == "volume" or n not in MEASUREMENT_SETTINGS
        )
        defaults = self._config_defaults()
        super().__init__(InferType.OTHERS, labels=None, dimension=3, description=description, config=defaults)

    def _config_defaults(self) -> dict[str, Any]:
        """The settings' defaults (config values with the app's overrides) as client options.

        ``method``, ``support`` and ``device`` are lists with the default first: MONAI Label clients
        (3D Slicer) show a list as a drop-down and send the chosen item.
        """
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update(self.overrides)
        out: dict[str, Any] = {}
        for name in self.names:
            if name == "device":
                continue
            value = parser.get(name)
            if name == "method":
                value = [value, *[m for m in METHODS if m != value]]
            if name == "support":
                value = [value, *[k for k in SUPPORT_KINDS if k != value]]
            out[name] = "" if value is None else value
        out["device"] = ["auto", "cpu", "cuda"]
        return out

    def is_valid(self) -> bool:
        return self.config_file.is_file()

    def check_kind(self, image: Path) -> None:
        """Refuse a study of the other kind: a sinogram for ``sparse_view_ct``, a CT volume for ``sinogram_ct``.

        Raises:
            HTTPException: 422 naming the study and the task to use.
        """
        kind = study_kind(image)
        if kind == self.kind:
            return
        if kind == "sinogram":
            raise _bad(
                f"study {image.name} is a sinogram (its geometry JSON {geometry_path_for(image).name} lies beside it); "
                f"{SPARSE_VIEW_CT} takes CT volumes: use the {SINOGRAM_CT} task",
                status=422,
            )
        raise _bad(
            f"study {image.name} has no geometry JSON, so it is a CT volume; {SINOGRAM_CT} takes sinograms: "
            f"use the {SPARSE_VIEW_CT} task, or put its geometry {geometry_path_for(image).name} beside it",
            status=422,
        )

    def _parser(self, settings: Mapping[str, Any], image: Path, output_dir: Path) -> ConfigParser:
        """The bundle's inference config with the request's settings, study and output folder."""
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update({"bundle_root": str(self.bundle_root), **self.overrides})
        for name, value in settings.items():
            parser[name] = resolve_device(value) if name == "device" else value
        if self.memory_limit_gb is not None and "memory_limit_gb" in parser:
            parser["memory_limit_gb"] = self.memory_limit_gb
        parser["input_path"] = str(image)
        parser["output_dir"] = str(output_dir)
        parser["progress"] = False
        parser["geometry_path"] = str(geometry_path_for(image)) if self.kind == "sinogram" else None
        parser["input_kind"] = self.kind  # the workflow refuses the other kind as well
        parser["reconstruction#save_png"] = False
        return parser

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:  # type: ignore[override]
        """Reconstruct ``request["image"]`` (a path: MONAI Label resolves study ids) with the request's settings.

        Returns:
            The path of the reconstruction (a temporary NIfTI that MONAI Label sends and
            deletes) and a JSON-ready dict: settings, geometry, seconds and metrics.
        """
        start = time.perf_counter()
        settings = parse_settings(request, self.names)
        image_arg = request.get("image")
        if not isinstance(image_arg, str) or not image_arg:
            raise _bad("the request names no image (use ?image=<study id>)", status=404)
        image = Path(image_arg)
        if not image.exists():
            raise _bad(f"study {image_arg!r} not found", status=404)
        self.check_kind(image)
        logger.info("%s: %s with %s", self.kind, image.name, settings)

        with tempfile.TemporaryDirectory(prefix="dbct-") as tmp:
            out_dir = Path(tmp)
            try:
                parser = self._parser(settings, image, out_dir)
                check_request_size(self.kind, parser, image, self.memory_limit_gb)
                reconstruction = parser.get_parsed_content("reconstruction", instantiate=True)
                reconstruction.run()
            except HTTPException:
                raise
            except ResourceLimitError as err:
                logger.warning("refused: %s", err)
                raise _bad(str(err), status=422) from err
            except Exception as err:  # map the pipeline's errors to HTTP errors with their message
                cause = _root_cause(err)
                logger.exception("reconstruction of %s failed", image.name)
                message = str(cause).replace(f"{image.parent}{os.sep}", "")  # no server paths of studies
                if isinstance(cause, (ValueError, TypeError)):
                    raise _bad(f"cannot reconstruct study {image.name}: {message}", status=422) from err
                raise _bad(f"reconstruction of study {image.name} failed: {type(cause).__name__}: {message}", 500) from err
            result = out_dir / f"{input_name(image)}_recon.nii.gz"
            if not result.is_file():
                raise _bad(f"reconstruction of study {image.name} wrote no image", status=500)
            fd, final = tempfile.mkstemp(prefix=f"{input_name(image)}_recon-", suffix=".nii.gz")
            os.close(fd)
            shutil.move(str(result), final)
            metrics_file = out_dir / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}

        metrics.pop("input", None)  # a server path; the client knows its study
        return final, {
            "task": TASK_OF_KIND[self.kind],
            "settings": settings,
            "metrics": metrics,
            "seconds": round(time.perf_counter() - start, 3),
        }
