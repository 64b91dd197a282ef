"""Benchmark bf16 against fp32: a seeded reconstruction of the sample and training iterations, in one process.

    python scripts/benchmark_precision.py                       # both parts, JSON lines on stdout
    python scripts/benchmark_precision.py --part sampler --depth 12 --steps 10
    python scripts/benchmark_precision.py --part training --iterations 5 --batch-size 8

The sampler part reconstructs the central ``--depth`` slices of ``sample/sample_ct.nii.gz``
(3 mm, 128 x 128 after padding) from 8 simulated parallel-beam views with ``dbpp`` and the
shipped prior, ``--repeats`` times (median) in fp32 and under bf16 autocast (with the weights held in bf16, as the
bundle samples: ``bundle.precision.inference_weights``), with the same seed, and prints
``{"fp32_seconds", "bf16_seconds", "speedup", "psnr_fp32", "psnr_bf16", ...}``. The training
part times ``--iterations`` optimiser steps of the shipped network (batch of 128 x 128 slabs,
forward, MSE loss, backward, AdamW) in each precision and prints ``{"train_fp32_seconds",
"train_bf16_seconds", "train_speedup"}`` per iteration. A warm-up run of each precision comes
first. The sampler's defaults (``SAMPLER_DEPTH`` slices, ``SAMPLER_STEPS`` steps) are the model
card's measurement: at fewer slices or steps the fixed per-step costs outside the network weigh
more, and one rounding difference moves a 4-step result by a tenth of a dB. Both lines also say
whether the CPU has native bf16 (``bundle.precision``): where it does not, PyTorch emulates
bf16 and the "speed-up" is far below 1, which is why the bundle's ``mixed_precision: auto``
keeps fp32 there. Time it alone: other processes on the cores change
both numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.physics.geometry import sparse_view  # noqa: E402
from bundle.metrics import psnr  # noqa: E402
from bundle.networks import SlabDenoiser, for_inference, load_weights  # noqa: E402
from bundle.physics.operators import make_operator  # noqa: E402
from bundle.physics.simulation import hu_to_normalized, simulate_sinogram  # noqa: E402
from bundle.precision import cpu_bf16_flags, native_bf16  # noqa: E402
from bundle.recon.inferers import make_inferer  # noqa: E402
from bundle.workflows.training import SlabDiffusionInferer  # noqa: E402
from bundle.transforms.layout import to_zhw  # noqa: E402

SAMPLER_DEPTH = 12  # slices of the sample: the model card's measurement
SAMPLER_STEPS = 10  # DDIM steps of each timed reconstruction


def shipped_network(device: torch.device, ckpt: Path) -> SlabDenoiser:
    """The shipped architecture (``configs/inference.json::network_def``) with the weights of ``ckpt`` when present."""
    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    config["bundle_root"] = str(ROOT)
    network = config.get_parsed_content("network_def", instantiate=True)
    if ckpt.is_file():
        load_weights(network, ckpt)
    return network.to(device)


def sample_volume(depth: int, size: int = 128) -> torch.Tensor:
    """The central ``depth`` slices of the shipped sample in normalised attenuation, padded in-plane with air to ``size``."""
    hu = np.asarray(nib.load(ROOT / "sample" / "sample_ct.nii.gz").dataobj, dtype=np.float32)
    x = to_zhw(torch.from_numpy(hu)[None]).float()
    z0 = max(0, (x.shape[0] - depth) // 2)
    x = hu_to_normalized(x[z0 : z0 + depth]).clamp(0, 1)
    out = torch.zeros(x.shape[0], size, size)
    h, w = min(size, x.shape[1]), min(size, x.shape[2])
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = x[:, :h, :w]
    return out


def machine(device: torch.device) -> dict:
    """Where the numbers come from: device, threads, and whether it computes bf16 natively."""
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(device),
        "cpu_bf16_flags": list(cpu_bf16_flags()) if device.type == "cpu" else None,
    }


def sampler_part(network: SlabDenoiser, device: torch.device, depth: int, steps: int, batch_size: int, repeats: int = 3) -> dict:
    x = sample_volume(depth).to(device)
    operator = make_operator(sparse_view(8, tuple(x.shape), (3.0, 3.0, 3.0)), device=device)
    y = simulate_sinogram(x, operator)
    operator.norm()
    # as the bundle samples: channels-last weights (and a bf16 copy of them when bf16 is on); a copy,
    # so that the training part times the network as training holds it
    network = for_inference(copy.deepcopy(network), device)
    result: dict = {"depth": depth, "steps": steps, "batch_size": batch_size, "repeats": repeats}
    precisions = (("fp32", False), ("bf16", True))
    for _, bf16 in precisions:  # warm-up of each precision
        make_inferer("dbpp", steps=1, seed=0, batch_size=batch_size, mixed_precision=bf16)(y, network, operator)
    times: dict[str, list[float]] = {name: [] for name, _ in precisions}
    for _ in range(repeats):  # interleaved, so that a drift of the machine affects both alike
        for name, bf16 in precisions:
            inferer = make_inferer("dbpp", steps=steps, seed=0, batch_size=batch_size, mixed_precision=bf16)
            start = time.perf_counter()
            recon = inferer(y, network, operator)
            times[name].append(time.perf_counter() - start)
            result[f"psnr_{name}"] = psnr(recon, x)  # the same seed: the same result every repeat
    for name, _ in precisions:
        result[f"{name}_seconds"] = statistics.median(times[name])
    result["speedup"] = result["fp32_seconds"] / result["bf16_seconds"]
    result["psnr_difference_db"] = result["psnr_bf16"] - result["psnr_fp32"]
    return result


def training_part(network: SlabDenoiser, device: torch.device, iterations: int, batch_size: int) -> dict:
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    network.train()
    result: dict = {"iterations": iterations, "train_batch_size": batch_size}

    def step(inferer: SlabDiffusionInferer) -> None:
        x = torch.rand(batch_size, 3, 128, 128, generator=generator).mul_(2).sub_(1).to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        s = torch.randint(1, 4, (batch_size,), generator=generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(inferer(x, network, noise, t, s), noise)
        loss.backward()
        optimizer.step()

    for name, bf16 in (("fp32", False), ("bf16", True)):
        inferer = SlabDiffusionInferer(scheduler, mixed_precision=bf16)
        step(inferer)  # warm-up
        start = time.perf_counter()
        for _ in range(iterations):
            step(inferer)
        result[f"train_{name}_seconds"] = (time.perf_counter() - start) / iterations
    result["train_speedup"] = result["train_fp32_seconds"] / result["train_bf16_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sampler", "training", "both"), default="both")
    parser.add_argument("--depth", type=int, default=SAMPLER_DEPTH, help="slices of the sample to reconstruct")
    parser.add_argument("--steps", type=int, default=SAMPLER_STEPS, help="DDIM steps of each reconstruction")
    parser.add_argument("--batch-size", type=int, default=16, help="slabs per network call (sampler) / per step (training: --train-batch-size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed reconstructions per precision (sampler; the median is printed)")
    parser.add_argument("--iterations", type=int, default=2, help="timed training iterations per precision")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt")
    args = parser.parse_args()
    device = torch.device(args.device)
    network = shipped_network(device, args.ckpt)
    common = machine(device)
    if args.part in ("sampler", "both"):
        print(json.dumps({**common, **sampler_part(network, device, args.depth, args.steps, args.batch_size, args.repeats)}), flush=True)
    if args.part in ("training", "both"):
        print(json.dumps({**common, **training_part(network, device, args.iterations, args.train_batch_size)}), flush=True)


if __name__ == "__main__":
    main()
