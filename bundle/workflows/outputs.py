"""The outputs of a reconstruction run, written as one set: a staging folder, MONAI's ``SaveImage``, then a move into place.

Every file of a run is first written into a hidden staging folder inside ``output_dir``
(created, and so checked writable, before any work), then moved into place when all are
complete, removing the files of an earlier run that this run does not write (a stale ``_std``).
A failure, SIGINT or SIGTERM removes the staging folder and leaves the earlier outputs as they were.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OUTPUT_SUFFIXES", "publish", "save_volume", "staging_folder"]

#: Files of one input, besides ``metrics.json``: ``<name><suffix>``.
OUTPUT_SUFFIXES = ("_recon.nii.gz", "_std.nii.gz", "_views.png")


def save_volume(image: torch.Tensor, affine: Any, path: str | Path, description: str) -> Path:
    """Write a channel-first image ``(1, X, Y, Z)`` with ``affine`` as float32 NIfTI through MONAI's ``SaveImage``.

    The header gives the units: millimetres for the grid, ``description`` (e.g. ``"HU"``) for the values.

    Raises:
        ValueError: the image holds NaN or Inf, or ``path`` does not end in ``.nii.gz``.
    """
    import nibabel as nib
    from monai.transforms import SaveImage

    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"{path}: reconstructions are written as .nii.gz")
    data = torch.as_tensor(image).detach().float().cpu()
    if not torch.isfinite(data).all():
        raise ValueError(f"refusing to write {path}: the volume contains NaN or Inf values")
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header["descrip"] = description.encode()[:79]
    saver = SaveImage(
        output_ext=".nii.gz",
        output_dtype=np.float32,
        resample=False,
        separate_folder=False,
        print_log=False,
        squeeze_end_dims=data.shape[-1] > 1,  # MONAI's writer fails on a squeezed single slice
    )
    saver.set_options(write_kwargs={"header": header})
    saver(data, meta_data={"affine": torch.as_tensor(np.asarray(affine, dtype=np.float64))}, filename=str(path)[: -len(".nii.gz")])
    return path


@contextmanager
def staging_folder(output_dir: Path) -> Iterator[Path]:
    """A hidden folder inside ``output_dir`` for one run's outputs, removed on exit whatever happens.

    Creating it checks that ``output_dir`` is writable before the work starts. While it exists,
    SIGTERM raises ``SystemExit`` (in the main thread) so that the folder is removed as on
    SIGINT, which raises ``KeyboardInterrupt``.

    Raises:
        PermissionError: ``output_dir`` cannot be created or written, naming it.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=output_dir))
    except OSError as err:
        raise PermissionError(f"output_dir {output_dir} is not writable: {err.strerror or err}") from err
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def publish(stage: Path, output_dir: Path, names: list[str]) -> None:
    """Move the staged files of ``names`` into ``output_dir`` and remove those this run did not write.

    The earlier ``metrics.json`` goes first and the new one last, so a ``metrics.json`` always
    describes the files beside it.
    """
    written = [n for n in names if (stage / n).is_file()]
    (output_dir / "metrics.json").unlink(missing_ok=True)
    for n in names:
        if n not in written:
            (output_dir / n).unlink(missing_ok=True)  # a stale output of an earlier run (e.g. its _std)
    for n in sorted(written, key=lambda n: n == "metrics.json"):
        os.replace(stage / n, output_dir / n)
