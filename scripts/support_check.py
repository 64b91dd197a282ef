"""How safe is the support constraint: what of each volume would the visual hull hold at air.

For each NIfTI volume (HU) and each number of views and ``support_threshold``, simulates a
noiseless parallel-beam scan on the volume's own grid, computes the visual hull
(``bundle.recon.support.visual_hull``) and prints one JSON line: the voxels above -500 HU
(the body, as ``mae_body_hu`` counts it) and above -950 HU that fall outside the hull, and
the share of the air (below -950 HU) that the hull removes. A threshold is safe when the
first count is 0 on every volume.

Usage:
    python scripts/support_check.py ../shared/data/ct/*.nii.gz --thresholds 0.01 0.003 --views 8 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bundle.metrics import BODY_HU
from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.simulation import hu_to_normalized
from bundle.recon.support import visual_hull
from bundle.transforms.layout import to_zhw

AIR_HU = -950.0


def check(hu: np.ndarray, voxel_size: tuple[float, float, float], views: int, threshold: float) -> dict[str, float]:
    """Counts for one volume ``(Z, H, W)`` in HU with voxel size ``(dz, dy, dx)`` mm."""
    x = torch.from_numpy(hu_to_normalized(hu.astype(np.float32)))
    operator = make_operator(sparse_view(views, tuple(x.shape), voxel_size))
    outside = ~visual_hull(operator, operator(x), threshold)
    hu_t = torch.from_numpy(hu)
    air = hu_t < AIR_HU
    return {
        "body_voxels_outside": int((outside & (hu_t > BODY_HU)).sum()),
        "non_air_voxels_outside": int((outside & ~air).sum()),
        "air_removed": round(float((outside & air).sum()) / max(int(air.sum()), 1), 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volumes", type=Path, nargs="+", help="NIfTI volumes in HU")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.003])
    p.add_argument("--views", type=int, nargs="+", default=[8, 4])
    p.add_argument("--max_slices", type=int, default=48, help="the central N slices of each volume (0: all)")
    args = p.parse_args(argv)
    for path in args.volumes:
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
        image = nib.load(str(path))
        hu = to_zhw(np.asarray(image.dataobj, dtype=np.float32)[None])
        if args.max_slices and hu.shape[0] > args.max_slices:
            start = (hu.shape[0] - args.max_slices) // 2
            hu = hu[start : start + args.max_slices]
        hu = np.ascontiguousarray(hu)
        dx, dy, dz = (float(s) for s in image.header.get_zooms()[:3])
        for views in args.views:
            for threshold in args.thresholds:
                row = {"volume": path.name, "shape": list(hu.shape), "views": views, "support_threshold": threshold}
                print(json.dumps({**row, **check(hu, (dz, dy, dx), views, threshold)}), flush=True)


if __name__ == "__main__":
    main()
