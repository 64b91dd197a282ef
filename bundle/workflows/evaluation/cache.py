"""The evaluation's resume cache: what determines a cell's result, written beside its outputs as ``cell.json``.

A cell that already ran with exactly its specification (method, settings, samples,
acquisition, seed, ``hu_max``, a digest of the preprocessed ground truth and a digest of the
prior's weights file) and left its reconstruction is read back instead of run again. A prior
without a weights file (an in-memory network) cannot be identified, so its cells never are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io import file_sha256, save_json
from bundle.recon.inferers import METHODS, method_settings
from bundle.transforms.layout import to_zhw, voxel_size_zhw
from bundle.workflows.evaluation.plan import Cell
from bundle.workflows.priors import Priors

__all__ = ["CellCache", "PreparedVolumes"]

Grid = tuple[tuple[int, int, int], tuple[float, float, float]]


class PreparedVolumes:
    """What the evaluation needs of each volume after the preprocessing: its grid and its digest (each volume read once).

    Args:
        preprocessing: the inference preprocessing of ``{"image": path}`` (to the model grid).
    """

    def __init__(self, preprocessing: Callable[[dict], dict]) -> None:
        self.preprocessing = preprocessing
        self._records: dict[str, tuple[Grid, str]] = {}

    def _record(self, volume: Path) -> tuple[Grid, str]:
        key = str(volume)
        if key not in self._records:
            image = self.preprocessing({"image": key})["image"]
            grid = (tuple(int(n) for n in to_zhw(image).shape), voxel_size_zhw(image))
            array = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
            sha = hashlib.sha256(repr(array.shape).encode())
            sha.update(array.tobytes())
            self._records[key] = (grid, sha.hexdigest())  # type: ignore[assignment]
        return self._records[key]

    def grid(self, volume: Path) -> Grid:
        """The preprocessed volume's ``(Z, H, W)`` shape and voxel size ``(dz, dy, dx)``."""
        return self._record(volume)[0]

    def sha256(self, volume: Path) -> str:
        """SHA-256 of the preprocessed volume (a change of grid, spacing or intensity mapping changes it)."""
        return self._record(volume)[1]


class CellCache:
    """The specifications of cells and the outputs of those that already ran.

    Args:
        volumes: the preprocessed volumes' digests.
        priors: the priors (a method's weights file is part of its cells' specification).
        hu_max: HU mapped to 1 by the preprocessing.
    """

    def __init__(self, volumes: PreparedVolumes, priors: Priors, hu_max: float) -> None:
        self.volumes, self.priors, self.hu_max = volumes, priors, float(hu_max)
        self._weights: dict[Path, str] = {}

    def spec(self, cell: Cell) -> dict[str, Any]:
        """What determines ``cell``'s result, as it reads back from ``cell.json``."""
        prior = self.priors.for_method(cell.method, cell.slab_size)
        ckpt = prior.ckpt_path if prior is not None else None
        settings = dict(cell.inferer_settings)
        taken = method_settings(cell.method, settings) if cell.method in METHODS else settings
        spec = {
            "volume": str(cell.volume),
            "volume_sha256": self.volumes.sha256(cell.volume),
            "method": cell.method,
            "inferer_settings": {k: v for k, v in taken.items() if k != "progress"},  # what changes the result
            "samples": cell.samples,
            "acquisition": dict(cell.acquisition),
            "seed": cell.seed,
            "hu_max": self.hu_max,
            "weights_sha256": self._weights_sha256(ckpt) if ckpt else None,
            "reusable": prior is None or ckpt is not None,
        }
        return json.loads(json.dumps(spec, default=str))

    def finished(self, cell: Cell, output_dir: Path, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The metrics of ``cell`` if it already ran with ``spec`` in ``output_dir`` and left its reconstruction, or None."""
        if not spec["reusable"]:
            return None
        folder = cell.folder(output_dir)
        try:
            if json.loads((folder / "cell.json").read_text()) != spec:
                return None
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return metrics if cell.recon_path(output_dir).is_file() else None

    @staticmethod
    def forget(cell: Cell, output_dir: Path) -> None:
        """Remove ``cell``'s ``cell.json``: its outputs are about to change."""
        (cell.folder(output_dir) / "cell.json").unlink(missing_ok=True)

    @staticmethod
    def remember(cell: Cell, output_dir: Path, spec: Mapping[str, Any]) -> None:
        """Write ``spec`` as ``cell``'s ``cell.json``, once its outputs are complete."""
        save_json(spec, cell.folder(output_dir) / "cell.json")

    def _weights_sha256(self, path: Path) -> str:
        if path not in self._weights:
            self._weights[path] = file_sha256(path)
        return self._weights[path]
