"""Tune the sampler's steps and eta (and the TV weight of the baseline) on the *validation* volumes.

Reads the validation list of a training datalist, preprocesses each volume exactly as
``configs/train.json`` does, simulates a noiseless sparse-view scan and reconstructs it with
``fbp``, ``tv`` (a sweep of its weight) and the blending methods over a grid of (steps, eta).
Prints one JSON line per run (PSNR / SSIM in 3D and per orientation, seconds); the test
volumes are never touched, so choosing defaults from this output does not leak into the
reported results.

Usage:
    python scripts/tune_sampler.py --ckpt models/model.pt --steps 20 50 --eta 0 0.5 0.85
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from bundle.geometry import sparse_view
from bundle.metrics import reconstruction_metrics
from bundle.networks import load_weights
from bundle.operators import make_operator
from bundle.recon.inferers import make_inferer
from bundle.transforms.layout import to_zhw

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt")
    p.add_argument("--datalist", type=Path, default=ROOT / "configs" / "datalist_shared_ct.json")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "ct")
    p.add_argument("--list", default="validation", help="which list of the datalist to use")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["dbpp", "fixed"])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--eta", type=float, nargs="+", default=[0.0, 0.5, 0.85])
    p.add_argument("--tv", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3], help="TV weights to sweep")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT)})
    preprocessing = parser.get_parsed_content("preprocessing")
    spacing = parser.get_parsed_content("spacing")
    network = load_weights(parser.get_parsed_content("network_def"), args.ckpt).eval()

    from bundle.data import load_datalist

    for item in load_datalist(args.datalist, args.list, args.data_root):
        x = to_zhw(torch.as_tensor(preprocessing(dict(item))["image"])).float()
        operator = make_operator(sparse_view(args.views, x.shape, tuple(spacing)[::-1]))
        y = operator(x)
        runs = [("fbp", {})] + [("tv", {"lam": lam}) for lam in args.tv]
        runs += [(m, {"steps": s, "eta": e}) for m in args.methods for s in args.steps for e in args.eta]
        for method, settings in runs:
            inferer = make_inferer(method, seed=args.seed, **settings)
            recon = inferer(y, network, operator)
            row = {"volume": Path(item["image"]).name, "shape": list(x.shape), "method": method, **settings}
            row.update({k: round(v, 4) for k, v in reconstruction_metrics(recon, x).items()})
            row["seconds"] = round(getattr(inferer, "stats", {}).get("seconds", float("nan")), 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
