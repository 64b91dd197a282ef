"""Prepare CT volumes for training the slab prior: DICOM series or NIfTI/NRRD files -> resampled NIfTI + a datalist.

Every input volume is read (a DICOM series folder through SimpleITK/GDCM, or a NIfTI/NRRD
file), checked (3D, finite values, enough slices), clipped to [-1024, 3071] HU, resampled to
``--spacing`` (mm, linear interpolation) and written as int16 NIfTI under ``--out``; a MONAI
datalist JSON (``training`` / ``validation`` lists, paths relative to the JSON's folder) is
written next to them. Outputs are written atomically, so an interrupted run leaves no
half-written volume; a volume that cannot be used is reported by name and skipped (or
stops the run with ``--strict``).

Layouts found under an ``--input`` folder:

* ``auto`` (default): every NIfTI/NRRD file, and every folder holding a DICOM series.
* ``lidc``: LIDC-IDRI as downloaded from TCIA, ``LIDC-IDRI-0001/<study>/<series>/*.dcm``;
  only CT series are taken (the radiographs, modality CR/DX, are skipped), the series with the
  most slices per patient.
* ``aapm``: the AAPM 2016 Low Dose CT Grand Challenge, ``L067/full_1mm/*.IMA`` (or
  ``full_3mm``); only the full-dose series are taken, quarter-dose ones are skipped.

Usage:
    python scripts/prepare_data.py --input /data/LIDC-IDRI --layout lidc --out data/lidc --spacing 3 3 3
    python scripts/prepare_data.py --input scan1.nii.gz scan2.nii.gz --out data/mine --val-fraction 0.2
Then train with ``--datalist data/lidc/datalist.json --data_root data/lidc``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
logger = logging.getLogger("prepare_data")


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def dicom_series(folder: Path) -> list[tuple[Path, str, list[str]]]:
    """The DICOM series directly in ``folder``: (folder, series uid, sorted file names)."""
    reader = sitk.ImageSeriesReader()
    out = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            out.append((folder, uid, files))
    return out


def _modality(first_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
    except RuntimeError:
        return ""


def find_inputs(inputs: Sequence[Path], layout: str) -> list[tuple[str, object]]:
    """Find the volumes to convert: ``(name, path or DICOM file list)`` pairs."""
    found: list[tuple[str, object]] = []
    for root in inputs:
        if _is_volume_file(root):
            found.append((_stem(root), root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"input {root} is neither a volume file nor a folder")
        per_patient: dict[str, tuple[str, list[str]]] = {}
        for folder, _dirs, files in os.walk(root):
            folder = Path(folder)
            for f in sorted(files):
                if layout == "auto" and _is_volume_file(folder / f):
                    found.append((_stem(folder / f), folder / f))
            if layout == "aapm" and not folder.name.lower().startswith("full"):
                continue
            for _, uid, dcm in dicom_series(folder):
                if layout == "lidc" and _modality(dcm[0]) not in ("CT", ""):
                    continue
                rel = folder.relative_to(root)
                patient = rel.parts[0] if layout in ("lidc", "aapm") and rel.parts else "_".join(rel.parts) or root.name
                key = patient if layout in ("lidc", "aapm") else f"{patient}_{uid[-8:]}"
                if key not in per_patient or len(dcm) > len(per_patient[key][1]):
                    per_patient[key] = (uid, dcm)
        found.extend((name, files) for name, (_, files) in sorted(per_patient.items()))
    return found


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_volume(source: object) -> sitk.Image:
    """Read a volume file or a DICOM series (a list of files) as float32 HU."""
    if isinstance(source, list):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(source)
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(source))
    return sitk.Cast(image, sitk.sitkFloat32)


def check_volume(image: sitk.Image, min_slices: int) -> None:
    """Refuse what cannot be trained on."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3D scalar volume, got {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} components")
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise ValueError("the volume contains NaN or Inf values")
    if image.GetSize()[2] < min_slices:
        raise ValueError(f"{image.GetSize()[2]} axial slices, fewer than the {min_slices} required")


def resample(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """Clip to [-1024, 3071] HU and resample to ``spacing`` (mm) over the same physical extent."""
    image = sitk.Clamp(image, sitk.sitkFloat32, -1024.0, 3071.0)
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), tuple(spacing),
                         image.GetDirection(), -1024.0, sitk.sitkFloat32)


def write_atomic(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part.nii.gz")
    sitk.WriteImage(sitk.Cast(sitk.Round(image), sitk.sitkInt16), str(tmp), useCompression=True)
    os.replace(tmp, path)


def prepare(inputs: Iterable[tuple[str, object]], out: Path, spacing: Sequence[float], min_slices: int,
            val_fraction: float, seed: int, strict: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for name, source in inputs:
        where = str(source[0].rsplit("/", 1)[0]) if isinstance(source, list) else str(source)
        try:
            image = read_volume(source)
            check_volume(image, min_slices)
            image = resample(image, spacing)
            check_volume(image, min_slices)
        except (RuntimeError, ValueError) as err:  # SimpleITK reports unreadable files as RuntimeError
            problem = f"{where}: {str(err).strip().splitlines()[0]}"
            if strict:
                raise ValueError(problem) from err
            logger.warning("skipped %s", problem)
            continue
        target = out / f"{name}.nii.gz"
        write_atomic(image, target)
        written.append(target.name)
        logger.info("%s -> %s %s", where, target, image.GetSize())
    if not written:
        raise ValueError("no usable volume was found in the inputs")
    random.Random(seed).shuffle(written)
    n_val = int(round(val_fraction * len(written))) if len(written) > 1 else 0
    datalist = {
        "description": f"made by scripts/prepare_data.py; spacing {list(spacing)} mm",
        "training": [{"image": n} for n in sorted(written[n_val:])],
        "validation": [{"image": n} for n in sorted(written[:n_val])],
    }
    path = out / "datalist.json"
    tmp = path.with_name(".datalist.json.part")
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, nargs="+", required=True, help="volume files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder for the NIfTI volumes and datalist.json")
    p.add_argument("--layout", choices=("auto", "lidc", "aapm"), default="auto")
    p.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0), metavar=("X", "Y", "Z"))
    p.add_argument("--min-slices", type=int, default=3, help="fewest axial slices accepted (a slab needs k)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="stop at the first unusable volume instead of skipping it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = prepare(find_inputs(args.input, args.layout), args.out, args.spacing, args.min_slices,
                       args.val_fraction, args.seed, args.strict)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
