"""Writing reconstructions: atomic NIfTI and JSON files, and an orthogonal-view PNG figure.

Every writer first writes a temporary file in the destination folder and then moves it into
place with ``os.replace``, so a failure never leaves a partial file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["atomic_path", "file_sha256", "orthogonal_cuts", "save_figure", "save_json", "save_nifti"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); on success move it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def save_nifti(
    volume: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray | None, path: str | Path
) -> Path:
    """Write ``volume`` (array in NIfTI's (X, Y, Z) voxel order) with ``affine`` (4x4) to ``path`` atomically.

    Raises:
        ValueError: the volume holds NaN or Inf, or the affine is not 4x4.
    """
    import nibabel as nib

    data = _numpy(volume).astype(np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"refusing to write {path}: the volume contains NaN or Inf values")
    affine = np.eye(4) if affine is None else _numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"the affine for {path} must be 4x4, got {affine.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG to ``path`` atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def save_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` (tensors and numpy values converted) as indented JSON to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def orthogonal_cuts(shape: Sequence[int]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The central axial, coronal and sagittal slices of a ``(Z, Y, X)`` RAS volume, as radiologists view them.

    Axial: anterior at the top, the patient's right on the image's left; coronal: superior at
    the top, right on the left; sagittal: superior at the top, anterior on the left.
    """
    z, y, x = (int(n) // 2 for n in shape)
    return {
        "axial": lambda v: v[z, ::-1, ::-1],
        "coronal": lambda v: v[::-1, y, ::-1],
        "sagittal": lambda v: v[::-1, ::-1, x],
    }


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
