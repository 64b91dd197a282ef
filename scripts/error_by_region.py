"""Where two or more reconstructions differ: the mean absolute error in HU by region of the reference.

Usage:
    python scripts/error_by_region.py ../shared/data/ct/ts_example_ct_abdomen_pelvis_3mm.nii.gz \
        dbpp=eval/test/ts_example_ct_abdomen_pelvis_3mm/8_views/dbpp/ts_example_ct_abdomen_pelvis_3mm_recon.nii.gz \
        mbir=eval/test/ts_example_ct_abdomen_pelvis_3mm/8_views/mbir/ts_example_ct_abdomen_pelvis_3mm_recon.nii.gz

The reference is the ground truth in HU on the reconstructions' grid (the input volume of
``benchmark.py``, whose reconstructions keep its grid). Both are seen as the benchmark's metrics
see them: normalised attenuation clipped to [0, 1], that is HU clipped to [-1000, 2000]. The body
is where the reference is above ``bundle.metrics.BODY_HU`` (-500 HU), as for ``mae_body_hu``.
Regions: four tissue classes of the reference (air and lung, fat, soft tissue, bone), the
body's outer shell of ``--shell`` voxels and the interior inside it, the air shell of the same
width just outside the body, and ``--bands`` equal bands along the last (slice) axis, body
voxels only. Prints one markdown table, a row per region and a column per reconstruction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.metrics import BODY_HU  # noqa: E402
from bundle.physics.simulation import hu_to_normalized, normalized_to_hu  # noqa: E402

TISSUES = {"air and lung (< -500 HU)": (-np.inf, -500.0), "fat (-500 to -30)": (-500.0, -30.0),
           "soft tissue (-30 to 150)": (-30.0, 150.0), "bone (> 150)": (150.0, np.inf)}


def metric_range(hu: np.ndarray) -> np.ndarray:
    """``hu`` as the metrics see it: normalised attenuation clipped to [0, 1], back in HU."""
    return normalized_to_hu(np.clip(hu_to_normalized(hu), 0.0, 1.0))


def regions(reference: np.ndarray, shell: int = 3, bands: int = 8) -> dict[str, np.ndarray]:
    """Boolean masks of the regions of ``reference`` (HU, in :func:`metric_range`), by name, in the order they are printed."""
    body = reference > BODY_HU
    masks = {name: (reference >= lo) & (reference < hi) for name, (lo, hi) in TISSUES.items()}
    interior = ndimage.binary_erosion(body, iterations=shell)
    masks[f"body edge (outer {shell} voxels)"] = body & ~interior
    masks["body interior"] = interior
    masks[f"air shell ({shell} voxels outside the body)"] = ndimage.binary_dilation(body, iterations=shell) & ~body
    depth = reference.shape[-1]
    for b in range(bands):
        z0, z1 = b * depth // bands, (b + 1) * depth // bands
        band = np.zeros_like(body)
        band[..., z0:z1] = True
        masks[f"body, slices {z0}-{z1 - 1}"] = body & band
    return masks


def region_errors(reference: np.ndarray, recon: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean absolute error in HU of ``recon`` against ``reference`` in each of ``masks`` (NaN where one is empty)."""
    error = np.abs(metric_range(recon) - metric_range(reference))
    return {name: float(error[m].mean()) if m.any() else float("nan") for name, m in masks.items()}


def load_hu(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The volume in ``path`` as float32 HU; ``shape``: the reference's, which it must match.

    Raises:
        SystemExit: the file is missing, unreadable, not 3D, or of another shape than the reference.
    """
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    try:
        volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as err:  # not a NIfTI, truncated
        raise SystemExit(f"{path}: not a readable NIfTI volume ({type(err).__name__}: {err})") from err
    if volume.ndim != 3:
        raise SystemExit(f"{path}: expected a 3D volume, got shape {volume.shape}")
    if shape is not None and volume.shape != shape:
        raise SystemExit(f"{path}: shape {volume.shape} differs from the reference's {shape}; "
                         "compare reconstructions on the reference's grid")
    return volume


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path, help="ground truth NIfTI in HU")
    p.add_argument("recons", nargs="+", metavar="NAME=PATH", help="reconstructions in HU on the reference's grid")
    p.add_argument("--shell", type=int, default=3, help="width in voxels of the body-edge and air shells")
    p.add_argument("--bands", type=int, default=8, help="bands along the slice axis")
    args = p.parse_args(argv)
    if args.shell < 1 or args.bands < 1:
        raise SystemExit(f"--shell and --bands must be >= 1, got {args.shell} and {args.bands}")
    named = []
    for item in args.recons:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{item!r}: give each reconstruction as NAME=PATH")
        named.append((name, Path(path)))
    reference = metric_range(load_hu(args.reference))
    masks = regions(reference, args.shell, args.bands)
    columns = {name: region_errors(reference, load_hu(path, reference.shape), masks) for name, path in named}
    print("| region | voxels | " + " | ".join(f"{name} MAE (HU)" for name in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for region, mask in masks.items():
        print(f"| {region} | {int(mask.sum())} | " + " | ".join(f"{columns[name][region]:.1f}" for name in columns) + " |")


if __name__ == "__main__":
    main()
