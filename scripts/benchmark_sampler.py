"""Benchmark the DiffusionBlend++ sampler: share of time inside the network, and peak memory at depths Z and 4Z.

    python scripts/benchmark_sampler.py                  # Z=48 and 192 slices of 128 x 128, 3 steps
    python scripts/benchmark_sampler.py --depth 40 --steps 10 --device cuda
    python scripts/benchmark_sampler.py --precision      # one JSON line: fp32 against bf16 on the sample

With ``--precision`` it runs the precision comparison of ``scripts/benchmark_precision.py``
instead (the same seeded reconstruction of the sample in fp32 and under bf16 autocast; JSON
with ``fp32_seconds``, ``bf16_seconds``, ``speedup``, ``psnr_fp32``, ``psnr_bf16``).

The network is the shipped architecture (``configs/inference.json::network_def``), with the
weights of ``models/model.pt`` when present (timing does not depend on them). The operator is
the default projector of an 8-view parallel-beam scan. Memory is the CUDA allocator's peak on
a GPU, the sampled resident set size on CPU (after returning freed heap memory to the OS), each
measured against a baseline taken in the same process just before the run. The expected growth
from Z to 4Z is a fixed number of volume-sized buffers (x_t, eps, x0, noise, the CG vectors),
so the script prints the growth in units of "volume copies": a constant count, independent of
depth, means that memory grows only by the volume's own size. Network activations are bounded
by the batch of slabs, so Z should be at least ``3 * batch_size`` for both runs to fill their batches.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.physics.geometry import sparse_view  # noqa: E402
from bundle.networks import SlabDenoiser, load_weights  # noqa: E402
from bundle.physics.operators import make_operator  # noqa: E402
from bundle.physics.simulation import simulate_sinogram  # noqa: E402
from bundle.recon.inferers import DiffusionBlendInferer  # noqa: E402
from bundle.workflows.profiling import CountedNetwork, Profile  # noqa: E402


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so that RSS baselines do not hide reused memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _network(device: torch.device, ckpt: Path | None) -> SlabDenoiser:
    config = json.loads((ROOT / "configs" / "inference.json").read_text())["network_def"]
    args = {k: v for k, v in config.items() if not k.startswith("_") and not str(v).startswith("@")}
    network = SlabDenoiser(slab_size=3, separations=(1, 2, 3), **args)
    if ckpt is not None and ckpt.is_file():
        load_weights(network, ckpt)
    return network.to(device).eval()


def measure(depth: int, size: int, steps: int, batch_size: int, device: torch.device, network: SlabDenoiser) -> dict:
    """One reconstruction of a random ``(depth, size, size)`` phantom; its cost (``bundle.workflows.profiling``) plus sizes."""
    geometry = sparse_view(8, (depth, size, size), (3.0, 3.0, 3.0))
    operator = make_operator(geometry, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(geometry.vol_shape, generator=generator, device=device)
    y = simulate_sinogram(x, operator)
    operator.norm()  # cache the norm outside the timed run
    del x
    inferer = DiffusionBlendInferer(steps=steps, batch_size=batch_size, seed=0, progress=False)
    _trim_heap()
    counted = CountedNetwork(network)
    with Profile(device, counted) as profile:
        inferer(y, counted, operator)
    stats = profile.stats()
    stats["volume_mb"] = depth * size * size * 4 / 2**20
    stats["depth"] = depth
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--depth", type=int, help="Z of the first run (at least 3 x batch size, so batches are full); the second uses 4Z. "
        "Default 48, or benchmark_precision.py's SAMPLER_DEPTH with --precision"
    )
    parser.add_argument("--size", type=int, default=128, help="H = W of the slices")
    parser.add_argument("--steps", type=int, help="DDIM steps per run (the share does not depend on it). Default 3, or SAMPLER_STEPS with --precision")
    parser.add_argument("--batch-size", type=int, default=16, help="slabs per network call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt")
    parser.add_argument("--precision", action="store_true", help="compare fp32 and bf16 (JSON line); --depth and --steps default to benchmark_precision.py's")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.precision:
        from benchmark_precision import SAMPLER_DEPTH, SAMPLER_STEPS, machine, sampler_part, shipped_network  # scripts/ is on sys.path

        depth = SAMPLER_DEPTH if args.depth is None else args.depth
        steps = SAMPLER_STEPS if args.steps is None else args.steps
        result = sampler_part(shipped_network(device, args.ckpt), device, depth, steps, args.batch_size)
        print(json.dumps({**machine(device), **result}))
        return
    depth = 48 if args.depth is None else args.depth
    steps = 3 if args.steps is None else args.steps
    network = _network(device, args.ckpt)

    measure(3, args.size, 1, args.batch_size, device, network)  # warm-up: kernels, allocator, thread pools
    runs = [measure(d, args.size, steps, args.batch_size, device, network) for d in (depth, 4 * depth)]

    print(f"device {device}, slices {args.size}x{args.size}, {steps} steps, batch {args.batch_size} slabs, threads {torch.get_num_threads()}")
    print(f"{'Z':>5} {'seconds':>8} {'network %':>9} {'slabs':>6} {'volume MB':>9} {'peak +MB':>9} {'peak +MB / volume':>17}")
    for r in runs:
        print(
            f"{r['depth']:>5} {r['seconds']:>8.2f} {100 * r['network_share']:>8.1f}% {r['slab_evaluations']:>6} "
            f"{r['volume_mb']:>9.2f} {r['peak_memory_increase_mb']:>9.1f} {r['peak_memory_increase_mb'] / r['volume_mb']:>17.1f}"
        )
    small, large = runs
    growth = large["peak_memory_increase_mb"] - small["peak_memory_increase_mb"]
    volume_growth = large["volume_mb"] - small["volume_mb"]
    print(f"memory ({small['memory_kind']}) growth Z -> 4Z: {growth:.1f} MB for {volume_growth:.2f} MB more volume "
          f"= {growth / volume_growth:.1f} volume copies")
    print(f"time ratio 4Z / Z: {large['seconds'] / small['seconds']:.2f} (4.00 = linear in depth)")
    share = sum(r["network_seconds"] for r in runs) / sum(r["seconds"] for r in runs)
    print(f"share of reconstruction time inside the network, both runs: {100 * share:.1f}% (aim >= 85%)")


if __name__ == "__main__":
    main()
