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
- any other key must be an id of the inference config (``steps``, ``views``, ``method``,
  ``ckpt_path``, ``image_size``, ...): its value (read as JSON when it parses, else as a
  string) replaces the config's for every request; request parameters override it again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

import bundle
from bundle.monailabel.infer_tasks import SINOGRAM_CT, SPARSE_VIEW_CT, ReconstructionTask
from bundle.settings import as_bool

logger = logging.getLogger(__name__)

APP_KEYS = ("bundle_root", "config_file", "read_only")


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
        ValueError: a key that is neither an app setting nor an id of the config.
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
    return out


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
        self.overrides = config_overrides(conf, self.config_file)
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
        common = {"config_file": self.config_file, "bundle_root": self.bundle_root, "overrides": self.overrides}
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

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Run an infer task on a study id of the studies folder (or an uploaded file); never save a label.

        Raises:
            HTTPException: 404 when ``image`` is neither a study id nor a file MONAI Label uploaded.
        """
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
