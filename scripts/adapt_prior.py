"""Start a prior for fewer slices (e.g. the 2D prior, k=1), or a deeper one, from a trained slab prior.

    python scripts/adapt_prior.py models/model.pt --slab_size 1 --separations 1 --out runs/train_2d/init.pt
    python -m monai.bundle run training --config_file configs/train.json --slab_size 1 --separations "[1]" \
        --init_from runs/train_2d/init.pt --output_dir runs/train_2d
    python scripts/publish_weights.py runs/train_2d/model.pt --slab_size 1     # -> models/model_2d.pt, an explicit step

A deeper prior with the same function (``--num_res_blocks``, new residual blocks that start as
the identity: ``bundle.networks.deepen_state_dict``), to add capacity without starting over:

    python scripts/adapt_prior.py models/model.pt --slab_size 3 --separations 1 2 3 --num_res_blocks 2 --out runs/deep/init.pt
    python -m monai.bundle run training --config_file configs/train.json --num_res_blocks 2 \
        --init_from runs/deep/init.pt --output_dir runs/deep

The network sizes come from ``configs/inference.json``'s ``network_def``; only the slab size, the
separation set and the residual blocks per level change (see ``bundle.networks.adapt_slab_state_dict``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.networks import adapt_slab_state_dict, deepen_state_dict, load_weights  # noqa: E402
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
    parser.add_argument(
        "--num_res_blocks", type=int, default=None, help="residual blocks per level of the target (default: the source's)"
    )
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
        if args.num_res_blocks not in (None, source_net.num_res_blocks):
            target_net = _network_def(
                slab_size=args.slab_size, separations=args.separations, num_res_blocks=args.num_res_blocks
            )
            state = deepen_state_dict(state, target_net)
    except ValueError as err:
        parser.error(f"{args.source}: {err}")
    target_net.load_state_dict(state)
    save_state_dict(target_net, args.out)
    print(
        f"{args.source} (slab_size={source_net.slab_size}, num_res_blocks={source_net.num_res_blocks}) -> {args.out} "
        f"(slab_size={target_net.slab_size}, num_res_blocks={target_net.num_res_blocks})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
