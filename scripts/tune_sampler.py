"""One-factor-at-a-time study of the sampler's settings, against FBP and a TV sweep, on the volumes of a datalist.

Reads a list of a datalist (``validation`` by default), preprocesses each volume exactly as
``configs/train.json`` does, simulates a noiseless sparse-view scan and reconstructs it with
``fbp``, ``tv`` (a sweep of its weight) and each diffusion method at the base settings (those
of ``configs/inference.json``), then once for every value of every ``--vary`` setting with the
others at their base. ``--samples`` adds the posterior mean of N samples at the base settings.
Prints one JSON line per run (PSNR / SSIM in 3D and per orientation, seconds, network
evaluations) and, with ``--out``, writes them as a CSV.

Choose defaults on ``--list validation`` (or training volumes) only. ``--list test`` is for
diagnosis, to find out what limits a method on the held-out volume; a setting picked there
is tuned on the test set and its result is no longer a held-out figure.

Usage:
    python scripts/tune_sampler.py --vary eta=0,0.5,1 --vary steps=20,100
    python scripts/tune_sampler.py --set data_consistency=ztv --vary tv_lambda=2e-4,1e-3
    python scripts/tune_sampler.py --list test --max-slices 32 --vary cg_iterations=2,10 \\
        --vary warm_start=0.4,0.6 --samples 4 --out eval/diagnosis.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from bundle.workflows.data import load_datalist
from bundle.physics.geometry import sparse_view
from bundle.metrics import reconstruction_metrics
from bundle.networks import load_weights
from bundle.physics.operators import make_operator
from bundle.recon.inferers import make_inferer
from bundle.recon.posterior import draw_samples
from bundle.workflows.profiling import Profile
from bundle.transforms.layout import to_zhw

ROOT = Path(__file__).resolve().parents[1]
BASE_KEYS = (
    "steps", "eta", "timestep_power", "data_consistency", "cg_iterations", "cg_lambda", "admm_iterations", "tv_rho",
    "tv_lambda", "support", "support_threshold", "warm_start", "warm_start_method", "batch_size",
)


def parse_vary(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["eta=0,0.5"]`` -> ``[("eta", [0, 0.5])]`` (values parsed as JSON where they are, else strings)."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--vary expects KEY=V1,V2,..., got {item!r}")
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(json.loads(value))
            except json.JSONDecodeError:
                parsed.append(value)
        out.append((key, parsed))
    return out


def central(x: torch.Tensor, max_slices: int | None) -> torch.Tensor:
    """The central ``max_slices`` slices of ``(Z, H, W)`` (all of them when ``None`` or more than Z)."""
    if not max_slices or x.shape[0] <= max_slices:
        return x
    start = (x.shape[0] - max_slices) // 2
    return x[start : start + max_slices].contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt")
    p.add_argument("--datalist", type=Path, default=ROOT / "configs" / "datalist_shared_ct.json")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "ct")
    p.add_argument("--list", default="validation", help="which list of the datalist to use")
    p.add_argument("--max-slices", type=int, default=None, help="keep the central N slices of each volume")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["dbpp"], choices=["dbpp", "db", "fixed"])
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a setting and the values to try")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V", help="change a base setting (the config's otherwise)")
    p.add_argument("--samples", type=int, nargs="*", default=[], help="posterior means of N samples at the base settings")
    p.add_argument("--tv", type=float, nargs="*", default=[1e-4, 5e-4, 2e-3], help="TV weights to sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the rows to this CSV")
    args = p.parse_args()

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "train.json")])
    parser.update({"bundle_root": str(ROOT)})
    preprocessing = parser.get_parsed_content("preprocessing")
    spacing = parser.get_parsed_content("spacing")
    base = {key: parser.get_parsed_content(key) for key in BASE_KEYS}
    network = load_weights(parser.get_parsed_content("network_def"), args.ckpt).eval()
    varied, overrides = parse_vary(args.vary), parse_vary(args.set)
    for flag, items in (("--vary", varied), ("--set", overrides)):
        unknown = [key for key, _ in items if key not in BASE_KEYS]
        if unknown:
            raise SystemExit(f"{flag} {unknown}: not a sampler setting; choose from {list(BASE_KEYS)}")
    if any(len(values) != 1 for _, values in overrides):
        raise SystemExit(f"--set expects one value per setting, got {dict(overrides)}")
    changed_base = {key: values[0] for key, values in overrides}
    base.update(changed_base)
    base_label = f"base {json.dumps(changed_base)}" if changed_base else "base"

    runs: list[tuple[str, dict[str, Any], int]] = [("fbp", {}, 1)] + [("tv", {"lam": lam}, 1) for lam in args.tv]
    for method in args.methods:
        runs.append((method, dict(base), 1))
        runs += [(method, {**base, key: value}, 1) for key, values in varied for value in values]
        runs += [(method, dict(base), n) for n in args.samples]

    rows = []
    for item in load_datalist(args.datalist, args.list, args.data_root):
        x = central(to_zhw(torch.as_tensor(preprocessing(dict(item))["image"])).float(), args.max_slices)
        operator = make_operator(sparse_view(args.views, x.shape, tuple(spacing)[::-1]))
        y = operator(x)
        for method, settings, samples in runs:
            inferer = make_inferer(method, seed=args.seed, **settings)
            prior = network if inferer.slab_size is not None else None
            with Profile(y.device) as profile:
                posterior = draw_samples(inferer, y, prior, operator, range(args.seed, args.seed + samples))
            recon, seconds, nfe = posterior.mean, profile.seconds, posterior.nfe
            classical = method in ("fbp", "tv")
            changed = settings if classical else {k: v for k, v in settings.items() if base.get(k) != v}
            row = {"volume": Path(item["image"]).name, "slices": x.shape[0], "method": method, "samples": samples}
            row["settings"] = json.dumps(changed) if changed else ("base" if classical else base_label)
            row.update({k: round(v, 4) for k, v in reconstruction_metrics(recon, x).items()})
            row.update({"seconds": round(seconds, 2), "nfe": nfe})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out and rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
