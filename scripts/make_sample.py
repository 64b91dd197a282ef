"""Make the project's sample CT volume from the example CT inside the `totalsegmentator` source package.

The source is ``tests/reference_files/example_ct.nii.gz`` of the totalsegmentator 2.18.0
sdist on PyPI (Apache-2.0; see docs/data_license.txt): an abdomen-pelvis CT on a 3 mm
isotropic grid, 122 x 101 x 112 voxels. The sample keeps the in-plane field of view and the
3 mm grid, takes a contiguous block of axial slices, clips to [-1024, 3071] HU and stores
int16, so it stays well under 3 MB and reconstructs in minutes on a laptop CPU.

Usage:
    python scripts/make_sample.py                       # downloads the sdist with pip
    python scripts/make_sample.py --sdist totalsegmentator-2.18.0.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

MEMBER = "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz"


def fetch_sdist(dest: Path) -> Path:
    """Download the totalsegmentator 2.18.0 source distribution with pip (no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-q", "-d", str(dest), "totalsegmentator==2.18.0"]
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob("totalsegmentator-2.18.0*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip did not produce the totalsegmentator sdist in {dest}")
    return found[0]


def make_sample(sdist: Path, out: Path, z_start: int, n_slices: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extract(MEMBER, tmp, filter="data")
        src = nib.load(Path(tmp) / MEMBER)
        hu = np.asarray(src.dataobj, dtype=np.float32)
        if not 0 <= z_start < z_start + n_slices <= hu.shape[2]:
            raise ValueError(f"slices {z_start}..{z_start + n_slices} outside the source's {hu.shape[2]} slices")
        block = np.clip(hu[:, :, z_start:z_start + n_slices], -1024, 3071).astype(np.int16)
        affine = src.affine.copy()
        affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, z_start]) + src.affine[:3, 3]
    img = nib.Nifti1Image(block, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".part.nii.gz")
    nib.save(img, tmp_out)
    tmp_out.replace(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", type=Path, help="totalsegmentator-2.18.0.tar.gz (downloaded with pip if omitted)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample" / "sample_ct.nii.gz")
    p.add_argument("--z-start", type=int, default=40, help="first axial slice taken from the source")
    p.add_argument("--slices", type=int, default=40, help="number of axial slices")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch_sdist(Path(tmp))
        out = make_sample(sdist, args.out, args.z_start, args.slices)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest})")


if __name__ == "__main__":
    main()
