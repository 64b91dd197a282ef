"""What makes a network evaluation cheaper on this machine: memory format, torch.compile, threads.

    python scripts/benchmark_step.py                       # JSON lines on stdout, the last a summary
    python scripts/benchmark_step.py --variants baseline channels_last --repeats 5

Times the sampler's unit of work, one batch of ``--batch-size`` slabs of 128 x 128 through the
shipped network (``scripts/benchmark_precision.py::shipped_network``) without gradients, in the
precision ``mixed_precision: auto`` picks here, for each variant against the network in PyTorch's
default memory layout (``baseline``), all in one process and interleaved (``--repeats`` rounds of every variant, the
median kept) so that a change of load on the cores affects them alike:

- ``channels_last``: the network as the bundle runs it, its weights in ``torch.channels_last``
  memory format (:func:`bundle.networks.for_inference`), the input as the sampler gives it;
- ``compile``: ``torch.compile(network)`` (inductor; its compile time is reported apart);
- ``threads_1``: the baseline with one thread (``torch.set_num_threads(1)``), reported per
  thread-second, so that it says whether two processes of one thread would beat one of two.

Each line gives the variant's ``seconds`` per batch, ``ratio`` (baseline seconds / variant
seconds: above 1 is faster) and ``max_abs_difference`` of its eps from the baseline's. Time it
alone: other processes on the cores change every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_precision import machine, shipped_network  # noqa: E402
from bundle.networks import for_inference  # noqa: E402
from bundle.precision import autocast, resolve_mixed_precision  # noqa: E402

VARIANTS = ("baseline", "channels_last", "compile", "threads_1")


def timed(call: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def make_calls(variants: list[str], network: torch.nn.Module, bf16: bool, batch: tuple) -> tuple[dict, dict]:
    """One no-argument call per variant, and the seconds each spent being set up (compiling)."""
    x, t, s = batch
    device = x.device
    setup: dict[str, float] = {}

    def run(net: torch.nn.Module, inp: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.no_grad(), autocast(device, bf16):
                return net(inp, t, s).float()

        return call

    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in variants:
        if name in ("baseline", "threads_1"):
            calls[name] = run(network, x)
        elif name == "channels_last":
            calls[name] = run(for_inference(copy.deepcopy(network), device), x)
        elif name == "compile":
            compiled = torch.compile(network)
            setup[name], _ = timed(run(compiled, x))  # the first call compiles
            calls[name] = run(compiled, x)
    return calls, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every variant; the median is kept")
    parser.add_argument("--mixed_precision", default="auto", help="auto / true / false, as the bundle's setting")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt")
    args = parser.parse_args()
    device = torch.device("cpu")
    bf16 = resolve_mixed_precision(args.mixed_precision, device)
    network = shipped_network(device, args.ckpt).eval()
    generator = torch.Generator().manual_seed(0)
    b = args.batch_size
    batch = (torch.randn(b, 3, 128, 128, generator=generator), torch.randint(0, 1000, (b,), generator=generator),
             torch.randint(1, 4, (b,), generator=generator))
    variants = ["baseline"] + [v for v in args.variants if v != "baseline"]
    calls, setup = make_calls(variants, network, bf16, batch)
    threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats + 1):  # the first round warms every variant up
        for name in variants:
            torch.set_num_threads(1 if name == "threads_1" else threads)
            elapsed, outputs[name] = timed(calls[name])
            seconds[name].append(elapsed)
    torch.set_num_threads(threads)
    base = statistics.median(seconds["baseline"][1:])
    summary = {**machine(device), "bf16": bf16, "batch_size": b, "repeats": args.repeats, "baseline_seconds": base}
    for name in variants:
        median = statistics.median(seconds[name][1:])
        thread_seconds = median * (1 if name == "threads_1" else threads)
        line = {
            "variant": name,
            "seconds": median,
            "ratio": base / median,
            "thread_seconds": thread_seconds,
            "ratio_per_thread": base * threads / thread_seconds,
            "max_abs_difference": float((outputs[name] - outputs["baseline"]).abs().max()),
        }
        if name in setup:
            line["setup_seconds"] = setup[name]
        print(json.dumps(line), flush=True)
        summary[f"{name}_ratio"] = line["ratio"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
