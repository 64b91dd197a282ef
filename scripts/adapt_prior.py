"""Start a prior for fewer slices (e.g. the 2D prior, k=1) from a trained slab prior (k=3).

    python scripts/adapt_prior.py models/model.pt --slab_size 1 --separations 1 --out runs/train_2d/init.pt
    python -m monai.bundle run training --config_file configs/train.json --slab_size 1 --separations "[1]" \
        --init_from runs/train_2d/init.pt --output_dir runs/train_2d
    python scripts/publish_weights.py runs/train_2d/model.pt --slab_size 1     # -> models/model_2d.pt, an explicit step

The network sizes come from ``configs/inference.json``'s ``network_def``; only the slab size and
the separation set change (see ``bundle.networks.adapt_slab_state_dict``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.networks import adapt_slab_state_dict, load_weights  # noqa: E402
from bundle.workflows.training import save_state_dict  # noqa: E402


def _network_def(**overrides) -> torch.nn.Module:
    """The network that ``configs/inference.json``'s ``network_def`` builds, with ``overrides``."""
    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    config.update({"bundle_root": str(ROOT), **overrides})
    return config.get_parsed_content("network_def", instantiate=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="weights of the trained slab prior (a plain state dict)")
    parser.add_argument("--slab_size", type=int, default=1)
    parser.add_argument("--separations", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    source_net = _network_def()
    try:
        load_weights(source_net, args.source)  # checks that the source matches the configured slab prior
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    target_net = _network_def(slab_size=args.slab_size, separations=args.separations)
    try:
        state = adapt_slab_state_dict(source_net.state_dict(), target_net)
    except ValueError as err:
        parser.error(f"{args.source}: {err}")
    target_net.load_state_dict(state)
    save_state_dict(target_net, args.out)
    print(f"{args.source} (slab_size={source_net.slab_size}) -> {args.out} (slab_size={target_net.slab_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
