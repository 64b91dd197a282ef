"""Publish trained weights as the bundle's prior: check that they fit the inference network, then write them.

    python scripts/publish_weights.py runs/train/model.pt                          # -> models/model.pt
    python scripts/publish_weights.py runs/train_2d/model.pt --slab_size 1         # -> models/model_2d.pt
    python scripts/publish_weights.py runs/train/checkpoints/checkpoint_latest.pt --to runs/candidate.pt

Training writes its EMA weights inside its output folder (``train.json``'s ``model_path``,
``@output_dir/model.pt``) and never touches ``models/``; this is the one explicit step that does.
``SRC`` is a plain state dict (``model.pt``, ``model_best.pt``) or a training checkpoint, of which
the EMA weights are taken. The weights are loaded with ``weights_only=True`` into the network that
``configs/inference.json`` builds for the slab size (``network_def``, or ``network_def_2d`` for
slab size 1), so weights for another network are refused before anything is written; the output
is written atomically (a temporary file renamed into place) and its sha256 and size are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.io import file_sha256  # noqa: E402
from bundle.networks import load_weights  # noqa: E402

INFERENCE_CONFIG = ROOT / "configs" / "inference.json"


def inference_config() -> ConfigParser:
    """``configs/inference.json`` with the repository as its bundle root."""
    config = ConfigParser()
    config.read_config(str(INFERENCE_CONFIG))
    config["bundle_root"] = str(ROOT)
    return config


def inference_network(config: ConfigParser, slab_size: int) -> torch.nn.Module:
    """The network inference builds for ``slab_size``: ``network_def_2d`` for 1, else ``network_def``."""
    if slab_size == 1:
        return config.get_parsed_content("network_def_2d", instantiate=True)
    if slab_size != config["slab_size"]:
        config["slab_size"] = slab_size
    return config.get_parsed_content("network_def", instantiate=True)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a plain state dict, or the EMA weights of a training checkpoint.

    Raises:
        ValueError: the file does not exist or does not load with ``weights_only=True``.
    """
    if not path.is_file():
        raise ValueError(f"SRC {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, a pickle with objects
        raise ValueError(
            f"SRC {path} does not load with weights_only=True ({type(err).__name__}): "
            "a truncated file, not a PyTorch file, or a pickle of objects other than tensors"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]  # a training checkpoint: inference uses the EMA weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SRC {path} is neither a plain state dict of tensors nor a training checkpoint")
    return state


def publish(source: Path, target: Path, slab_size: int) -> Path:
    """Write ``source``'s weights to ``target`` once they load into the inference network for ``slab_size``.

    The weights go to a temporary file beside ``target``, which must load with
    ``bundle.networks.load_weights`` (strict, ``weights_only=True``) before it is renamed into
    place; on a mismatch it is removed and ``target`` stays as it was.

    Raises:
        ValueError: ``source`` does not load, or its weights do not fit the network (the message
            names the file and the first mismatching tensors).
    """
    network = inference_network(inference_config(), slab_size)
    state = {k: v.detach().clone() for k, v in read_weights(source).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        torch.save(state, tmp)
        load_weights(network, tmp)
    except ValueError as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"SRC {str(err).replace(str(tmp), str(source))}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, metavar="SRC",
                        help="trained weights (model.pt, model_best.pt or a training checkpoint)")
    parser.add_argument("--to", type=Path, default=None,
                        help="output file (default: inference.json's ckpt_path, or ckpt_path_2d for --slab_size 1)")
    parser.add_argument("--slab_size", type=int, default=None,
                        help="the prior's slab size (default: inference.json's slab_size)")
    args = parser.parse_args(argv)

    config = inference_config()
    slab_size = int(config["slab_size"]) if args.slab_size is None else args.slab_size
    if slab_size < 1:
        parser.error(f"--slab_size {slab_size}: must be at least 1")
    target = args.to or Path(config.get_parsed_content("ckpt_path_2d" if slab_size == 1 else "ckpt_path"))
    try:
        publish(args.source, target, slab_size)
    except ValueError as err:
        parser.error(str(err))
    print(f"{args.source} -> {target} (slab_size={slab_size}): sha256 {file_sha256(target)}, {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
