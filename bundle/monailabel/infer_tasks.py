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
  result is on the geometry's grid (voxel size from the JSON, centred on the rotation axis).

Bad requests raise :class:`fastapi.HTTPException` with a message: 400 for invalid settings,
404 for a missing study, 422 for a study that cannot be reconstructed (not 3D, NaN, a
sinogram that does not match its geometry), 500 for anything else. The server keeps serving.
"""

from __future__ import annotations

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

import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.recon.inferers import METHODS
from bundle.reconstruction import input_name
from bundle.transforms.sinogram import geometry_path_for

__all__ = [
    "SPARSE_VIEW_CT",
    "SINOGRAM_CT",
    "SETTINGS",
    "ReconstructionTask",
    "parse_settings",
    "resolve_device",
]

logger = logging.getLogger(__name__)

SPARSE_VIEW_CT = "sparse_view_ct"
SINOGRAM_CT = "sinogram_ct"

_NONE = ("", "none", "null")


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
        raise _bad(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or isinstance(value, bool):
        raise _bad(f"{name} must be an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise _bad(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise _bad(f"{name} must be <= {maximum}, got {value!r}")
    return int(number)


def _number(name: str, value: Any) -> tuple[Any, float]:
    """``value`` (its first item if a list) and its float; a non-number is a bad request."""
    value = _first(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(f"{name} must be a number, got {value!r}") from None
    return value, number


def _float(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    value, number = _number(name, value)
    if isinstance(value, bool) or not (low < number <= high):
        raise _bad(f"{name} must be a number in ({low:g}, {high:g}], got {value!r}")
    return number


def _photons(name: str, value: Any) -> float | None:
    value = _first(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
        return None
    return _float(name, value)


def _fraction(name: str, value: Any) -> float:
    value, number = _number(name, value)
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise _bad(f"{name} must be a number in [0, 1), got {value!r}")
    return number


def _method(name: str, value: Any) -> str:
    value = str(_first(value)).strip()
    if value not in METHODS:
        raise _bad(f"unknown {name} {value!r}; choose one of {list(METHODS)}")
    return value


def _device(name: str, value: Any) -> str:
    value = _first(value)
    text = "auto" if value is None else str(value).strip().lower()
    resolve_device(text)  # validates
    return text


#: The most samples one request may ask for: a request holds the server's event loop.
MAX_SAMPLES = 16

#: Request settings: name -> parser (raises HTTP 400 with a message on a bad value).
SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "views": lambda n, v: _int(n, v, minimum=1),
    "arc_degrees": lambda n, v: _float(n, v, 0.0, 360.0),
    "step_degrees": lambda n, v: _float(n, v, 0.0, 360.0),
    "photons": _photons,
    "method": _method,
    "steps": lambda n, v: _int(n, v, minimum=1),
    "samples": lambda n, v: _int(n, v, minimum=1, maximum=MAX_SAMPLES),
    "warm_start": _fraction,
    "seed": lambda n, v: _int(n, v, minimum=0),
    "device": _device,
}

#: The settings that describe the simulated measurement (meaningless for a measured sinogram).
MEASUREMENT_SETTINGS = ("views", "arc_degrees", "step_degrees", "photons")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises:
        HTTPException: 400 for an unknown name or a CUDA device that this server does not have.
    """
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _bad(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _bad(f"device {name!r} requested, but this server has no CUDA device; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _bad(f"device {name!r} requested, but this server has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise _bad(f"unsupported device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


def parse_settings(request: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The validated values of the settings ``names`` that ``request`` sets (the rest keep the config's).

    Raises:
        HTTPException: 400 naming the first invalid setting.
    """
    return {name: SETTINGS[name](name, request[name]) for name in names if name in request}


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (ConfigParser wraps errors raised while instantiating)."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


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
    """

    def __init__(
        self,
        kind: str,
        config_file: str | Path,
        bundle_root: str | Path,
        overrides: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        if kind not in ("volume", "sinogram"):
            raise ValueError(f"kind must be 'volume' or 'sinogram', got {kind!r}")
        self.kind = kind
        self.config_file = Path(config_file)
        self.bundle_root = Path(bundle_root)
        self.overrides = dict(overrides or {})
        self.names: tuple[str, ...] = tuple(
            n for n in SETTINGS if kind == "volume" or n not in MEASUREMENT_SETTINGS
        )
        defaults = self._config_defaults()
        super().__init__(InferType.OTHERS, labels=None, dimension=3, description=description, config=defaults)

    def _config_defaults(self) -> dict[str, Any]:
        """The settings' defaults (config values with the app's overrides) as client options.

        ``method`` and ``device`` are lists with the default first: MONAI Label clients (3D
        Slicer) show a list as a drop-down and send the chosen item.
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
            out[name] = "" if value is None else value
        out["device"] = ["auto", "cpu", "cuda"]
        return out

    def is_valid(self) -> bool:
        return self.config_file.is_file()

    def _parser(self, settings: Mapping[str, Any], image: Path, output_dir: Path) -> ConfigParser:
        """The bundle's inference config with the request's settings, study and output folder."""
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update({"bundle_root": str(self.bundle_root), **self.overrides})
        for name, value in settings.items():
            if name == "device":
                parser["device"] = resolve_device(value)
            else:
                parser[name] = value
        parser["input_path"] = str(image)
        parser["output_dir"] = str(output_dir)
        parser["progress"] = False
        if self.kind == "sinogram":
            geometry = geometry_path_for(image)
            if not geometry.is_file():
                raise _bad(
                    f"study {image.name} has no geometry JSON: put {geometry.name} beside it in the studies folder",
                    status=422,
                )
            parser["geometry_path"] = str(geometry)
        else:
            parser["geometry_path"] = None
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
        logger.info("%s: %s with %s", self.kind, image.name, settings)

        with tempfile.TemporaryDirectory(prefix="dbct-") as tmp:
            out_dir = Path(tmp)
            try:
                parser = self._parser(settings, image, out_dir)
                reconstruction = parser.get_parsed_content("reconstruction", instantiate=True)
                reconstruction.run()
            except HTTPException:
                raise
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
            "task": SPARSE_VIEW_CT if self.kind == "volume" else SINOGRAM_CT,
            "settings": settings,
            "metrics": metrics,
            "seconds": round(time.perf_counter() - start, 3),
        }
