"""scripts/prepare_data.py on a DICOM series, NIfTI files and bad volumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from tests.conftest import ROOT, write_crop

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_data  # noqa: E402


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(2.0, 2.0, 2.5), modality: str = "CT") -> None:
    """Write ``hu`` (z, y, x) as one DICOM file per slice with SimpleITK."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID so the slices form one series
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    for z in range(hu.shape[0]):
        img = sitk.GetImageFromArray(hu[z].astype(np.int16))
        img.SetSpacing(spacing[:2])
        for tag, value in {
            "0008|0060": modality, "0020|000e": series_uid, "0020|000d": "1.2.3", "0020|0013": str(z + 1),
            "0020|0032": f"0\\0\\{z * spacing[2]}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(spacing[2]),
            "0028|1052": "0", "0028|1053": "1",
        }.items():
            img.SetMetaData(tag, value)
        img.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(img)


def test_dicom_and_nifti_to_resampled_volumes_and_datalist(tmp_path: Path) -> None:
    hu = np.asarray(nib.load(write_crop(tmp_path / "a.nii.gz", xy=24, slices=8)).dataobj)
    write_dicom_series(tmp_path / "in" / "patient1" / "series", hu.transpose(2, 1, 0))
    write_crop(tmp_path / "in" / "b.nii.gz", xy=20, slices=6)
    assert prepare_data.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--val-fraction", "0.5"]) == 0
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    names = [e["image"] for e in datalist["training"] + datalist["validation"]]
    assert len(datalist["training"]) == len(datalist["validation"]) == 1 and len(names) == 2
    dicom = sitk.ReadImage(str(tmp_path / "out" / next(n for n in names if n != "b.nii.gz")))
    assert dicom.GetSpacing() == (3.0, 3.0, 3.0)
    assert dicom.GetSize() == (16, 16, 7)  # 24 x 2 mm / 3 mm, 8 x 2.5 mm / 3 mm
    assert sitk.GetArrayViewFromImage(dicom).dtype == np.int16


def test_bad_volumes_are_named_and_skipped_or_stop_the_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    write_crop(tmp_path / "in" / "good.nii.gz", xy=16, slices=6)
    nan = np.asarray(nib.load(tmp_path / "in" / "good.nii.gz").dataobj).astype(np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "in" / "nan.nii.gz")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a volume")
    args = ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert prepare_data.main(args) == 0
    assert [e["image"] for e in json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]] == ["good.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["datalist.json", "good.nii.gz"]
    assert prepare_data.main(args + ["--strict"]) == 1
    assert "broken.nii.gz" in capsys.readouterr().err


def test_lidc_layout_skips_radiographs(tmp_path: Path) -> None:
    hu = np.zeros((4, 16, 16), dtype=np.int16)
    write_dicom_series(tmp_path / "LIDC-IDRI-0001" / "study" / "ct", hu)
    write_dicom_series(tmp_path / "LIDC-IDRI-0001" / "study" / "cr", hu[:1], modality="CR")
    found = prepare_data.find_inputs([tmp_path], "lidc")
    assert [(name, len(files)) for name, files in found] == [("LIDC-IDRI-0001", 4)]
