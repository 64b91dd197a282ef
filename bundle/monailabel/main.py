"""The MONAI Label app of the DiffusionBlend CT bundle: reconstruction served over MONAI Label's REST API.

Start it with ``python -m bundle.monailabel --studies <folder>`` (binds 127.0.0.1; see
docs/monailabel.md) or ``monailabel start_server --app bundle/monailabel --studies <folder>``.

Infer tasks (type ``OTHERS``, see :mod:`bundle.monailabel.infer_tasks`):

- ``sparse_view_ct``: simulate the configured measurement from a CT study and reconstruct it;
- ``sinogram_ct``: reconstruct a measured sinogram study (geometry JSON beside it).

App settings (``--conf key value``):

- ``bundle_root``: the bundle's folder (default: the one holding this app);
- ``config_file``: the inference config (default ``<bundle_root>/configs/inference.json``);
- ``read_only``: ``true`` (default) refuses every upload, edit and delete of the studies
  folder through the REST API (a reconstruction server needs none of them; see the Safety
  section of docs/monailabel.md); ``false`` allows them, as MONAI Label does; any other
  value stops the app with an error (a typo must not open the studies folder);
- ``memory_limit_gb``: the most memory one request may need by the size guard's estimate
  (default: ``DIFFUSIONBLEND_MEMORY_LIMIT_GB``, else half the machine's memory);
- any other key must be an id of the inference config (``steps``, ``views``, ``method``,
  ``ckpt_path``, ``image_size``, ...): its value (read as JSON when it parses, else as a
  string) replaces the config's for every request; request parameters override it again.
  Values of request settings must lie in the requests' ranges, else the app does not start.

Next Sample strategies: ``random`` offers CT volumes (for ``sparse_view_ct``),
``random_sinogram`` sinogram studies (for ``sinogram_ct``).

Requests that MONAI Label 0.8.5 itself would answer with a bare 500 get a 4xx with a
message here: an unknown task (404) and a ``params`` form field that is not a JSON object
(400, checked by :func:`install_params_check` before MONAI Label's endpoint reads it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random

import bundle
from bundle.limits import memory_limit_bytes
from bundle.monailabel.infer_tasks import SINOGRAM_CT, SPARSE_VIEW_CT, ReconstructionTask, check_overrides, study_kind
from bundle.settings import as_bool

logger = logging.getLogger(__name__)

APP_KEYS = ("bundle_root", "config_file", "read_only", "memory_limit_gb")


def _json_or_str(value: Any) -> Any:
    """``--conf`` values arrive as strings: ``"50" -> 50``, ``"null" -> None``, ``"abc" -> "abc"``."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def config_overrides(conf: Mapping[str, Any], config_file: Path) -> dict[str, Any]:
    """The app settings that are ids of the inference config, with their values decoded.

    Raises:
        ValueError: a key that is neither an app setting nor an id of the config, or a request
            setting's value outside the requests' range.
    """
    parser = ConfigParser()
    parser.read_config(str(config_file))
    out: dict[str, Any] = {}
    for key, value in conf.items():
        if key in APP_KEYS:
            continue
        if key not in parser:
            raise ValueError(f"--conf {key}: neither an app setting {list(APP_KEYS)} nor an id of {config_file}")
        out[key] = _json_or_str(value)
    check_overrides(out)
    return out


def parse_params(params: Any) -> dict[str, Any]:
    """The ``params`` form field of an infer request as a dict (an empty field is ``{}``).

    Raises:
        HTTPException: 400 when it is not JSON or not a JSON object.
    """
    if not params:
        return {}
    try:
        value = json.loads(params)
    except (TypeError, ValueError) as err:
        raise HTTPException(
            status_code=400,
            detail=f'params must be a JSON object such as {{"views": 8}}; it is not valid JSON: {err}',
        ) from None
    if not isinstance(value, dict):
        raise HTTPException(
            status_code=400,
            detail=f'params must be a JSON object such as {{"views": 8}}, got a JSON {type(value).__name__}',
        )
    return value


def install_params_check() -> None:
    """Check the ``params`` field before MONAI Label's ``POST /infer/<task>`` endpoint reads it.

    monailabel 0.8.5 decodes ``params`` with ``json.loads`` inside its endpoint
    (``monailabel.endpoints.infer.run_inference``) before the app sees the request, so text
    that is not a JSON object ended in a bare 500. The endpoint calls ``run_inference`` by its
    module name; this wraps it once with :func:`parse_params` and changes nothing else.
    """
    from monailabel.endpoints import infer as endpoint

    original: Callable[..., Any] = endpoint.run_inference
    if getattr(original, "checks_params", False):
        return

    @functools.wraps(original)
    def run_inference(
        background_tasks: Any, model: str, image: str = "", session_id: str = "", params: str = "{}", *args: Any
    ) -> Any:
        parse_params(params)
        return original(background_tasks, model, image, session_id, params, *args)

    run_inference.checks_params = True  # type: ignore[attr-defined]
    endpoint.run_inference = run_inference


class _StudiesOfKind:
    """A datastore whose unlabelled images are only the studies of one kind (``"volume"`` or ``"sinogram"``)."""

    def __init__(self, datastore: Datastore, kind: str) -> None:
        self._datastore = datastore
        self._kind = kind

    def get_unlabeled_images(self, *args: Any, **kwargs: Any) -> list[str]:
        images = self._datastore.get_unlabeled_images(*args, **kwargs)
        return [i for i in images if study_kind(self._datastore.get_image_uri(i)) == self._kind]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._datastore, name)


class RandomStudy(Random):
    """MONAI Label's ``random`` Next Sample strategy over the studies one task takes.

    Args:
        kind: ``"volume"`` (CT volumes, for ``sparse_view_ct``) or ``"sinogram"`` (for ``sinogram_ct``).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        task = SPARSE_VIEW_CT if kind == "volume" else SINOGRAM_CT
        self.description = f"A random {'CT volume' if kind == 'volume' else 'sinogram'} study (for {task})"

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        return super().__call__(request, _StudiesOfKind(datastore, self.kind))  # type: ignore[arg-type]


class ReadOnlyDatastore(LocalDatastore):
    """A local studies folder whose images and labels cannot be added, changed or removed over the API.

    MONAI Label still keeps its own index file and empty label folders in the studies folder.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise HTTPException(
            status_code=403,
            detail="this reconstruction server's studies folder is read-only (start it with --conf read_only false to allow uploads)",
        )

    add_image = _refuse
    remove_image = _refuse
    save_label = _refuse
    remove_label = _refuse
    update_image_info = _refuse
    update_label_info = _refuse


class DiffusionBlendCTApp(MONAILabelApp):
    """MONAI Label app with the bundle's reconstruction tasks ``sparse_view_ct`` and ``sinogram_ct``.

    Args:
        app_dir: this app's folder (MONAI Label's ``--app``).
        studies: the studies folder (MONAI Label's ``--studies``).
        conf: the ``--conf`` settings (see the module docstring).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.bundle_root = Path(conf.get("bundle_root") or Path(__file__).resolve().parents[2]).resolve()
        self.config_file = Path(conf.get("config_file") or self.bundle_root / "configs" / "inference.json").resolve()
        if not self.config_file.is_file():
            raise FileNotFoundError(f"inference config {self.config_file} not found (set --conf config_file)")
        self.read_only = as_bool(conf.get("read_only", "true"), "read_only")
        self.memory_limit_gb = conf.get("memory_limit_gb")
        memory_limit_bytes(self.memory_limit_gb)  # validates
        self.overrides = config_overrides(conf, self.config_file)
        install_params_check()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="DiffusionBlend CT reconstruction",
            description="Sparse-view / limited-angle CT reconstruction with a 3D-patch diffusion prior (DiffusionBlend++)",
            version=bundle.__version__,
            labels=None,
        )

    def init_datastore(self) -> Datastore:
        if self.read_only and not self.studies.startswith(("http://", "https://")):
            from monailabel.config import settings

            logger.info("read-only studies folder: %s", self.studies)
            return ReadOnlyDatastore(
                self.studies,
                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            )
        return super().init_datastore()

    def init_infers(self) -> dict[str, InferTask]:
        common = {
            "config_file": self.config_file,
            "bundle_root": self.bundle_root,
            "overrides": self.overrides,
            "memory_limit_gb": self.memory_limit_gb,
        }
        return {
            SPARSE_VIEW_CT: ReconstructionTask(
                "volume",
                description="Simulate a sparse-view / limited-angle scan of a CT study and reconstruct it",
                **common,
            ),
            SINOGRAM_CT: ReconstructionTask(
                "sinogram",
                description="Reconstruct a measured sinogram study (its geometry JSON lies beside it)",
                **common,
            ),
        }

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": RandomStudy("volume"), "random_sinogram": RandomStudy("sinogram")}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Run an infer task on a study id of the studies folder (or an uploaded file); never save a label.

        Raises:
            HTTPException: 404 for an unknown task, or when ``image`` is neither a study id nor
                a file MONAI Label uploaded.
        """
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown task {model!r}; this server's tasks are {sorted(self._infers)}"
            )
        request = dict(request)
        request["save_label"] = False
        image = request.get("image")
        if isinstance(image, str) and image:
            store = datastore or self.datastore()
            if not store.get_image_uri(image) and not _is_upload(image):
                raise HTTPException(status_code=404, detail=f"study {image!r} not found in the studies folder")
        return super().infer(request, datastore)


def _is_upload(path: str) -> bool:
    """Whether ``path`` is a file MONAI Label wrote for an upload (``POST /infer/...`` with a file).

    MONAI Label stores an uploaded file as a temporary file directly in the system's temporary
    folder and passes its path as the image; other server paths are not accepted as images.
    """
    p = Path(path)
    return p.is_file() and p.resolve().parent == Path(tempfile.gettempdir()).resolve() and os.access(p, os.R_OK)
