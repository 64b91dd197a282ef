"""The prepared GPU run of issue 17: CUDA projectors, a cone-beam reconstruction, bf16 reconstruction timing, training speed.

On the device machine (one H200), from the development machine's session:

    bash scripts/gpu_check.sh --prepare      # here, once: the device's missing wheels and libraries into .whl/
    # then the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)

``bash scripts/gpu_check.sh`` installs the carried wheels when the device's python lacks them
(``scripts/gpu_check.sh`` says why a stand-in cuFFT is among them) and runs ``python
scripts/gpu_check.py --out "$OUT"`` on the GPU torch sees, with bf16 autocast
(``mixed_precision: true``) and 64 slabs per network call unless told otherwise. The run stays
under ``--max-seconds`` (400 s by default: with the start-up and one part overrunning its
budget, under 8 minutes), and its six files come back from ``$OUT``. Exit status 0: every part
and case ran; 1: some did not (the JSON says which and why).

The CPU dry run, which ``tests/test_gpu_check.py`` runs in CI:

    .venv/bin/python scripts/gpu_check.py --device cpu --out /tmp/gpu_check

runs the same code on tiny sizes (32 x 32 x Z, Z in (4, 8), 2 and 4 NFE, 2 training
iterations) in fp32 (``--mixed-precision auto`` takes bf16 where the CPU has it natively); the
cases that need ASTRA's 3D CUDA projectors are recorded as ``skipped: no CUDA device`` (without
a GPU those calls kill the process), and the cone-beam part runs its simulation and
reconstructions on a fan-beam stand-in (ASTRA's 2D CPU projector).

Parts, cheapest first, each with its own time budget, its own JSON file under ``--out`` and
its own exception handling (and, on CUDA, its own process, so that a crash inside ASTRA loses
only that part); ``summary.json`` is rewritten after every part and ``gpu_check.log`` holds
the log:

- ``operators.json``: the dot-product test ``|<Ax, y> - <x, A^T y>|`` of ``astra-cuda``
  (``parallel3d`` and ``cone``) and ``astra-matrix``, normalised as the package's
  ``adjoint_error`` does (by ``||A|| ||x|| ||y||``, the number ``tests/test_operators.py``
  bounds) and by ``||Ax|| ||y||``, on the geometries of ``tests/test_operators.py`` and at a
  realistic size; and the agreement of ``astra-cuda`` with the CPU matrix operator on a
  parallel-beam case (relative error of ``A x`` and ``A^T y``).
- ``cone.json``: a cone-beam simulation of the sample and its reconstruction with SIRT, CGLS
  and DiffusionBlend++ (the shipped prior), with PSNR.
- ``training.json``: optimiser iterations per second of the shipped network at 256 x 256
  (batch 16, bf16 autocast, AdamW), and in fp32 when time is left.
- ``amp.json``: DiffusionBlend++ reconstruction time and CUDA peak memory
  (``torch.cuda.max_memory_allocated``) under bf16 autocast at 256 x 256 x Z, Z in
  (64, 256, 500), at 50 and 200 NFE, cheapest first (a run predicted not to fit the part's
  budget is skipped and says so), and one fp32 run for the speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")

PARTS: tuple[str, ...] = ("operators", "cone", "training", "amp")
#: Seconds each part may take at most (less when the whole run has less left).
BUDGETS: dict[str, float] = {"operators": 60.0, "cone": 60.0, "training": 60.0, "amp": 220.0}
#: Seconds a part's process may overrun its budget (one step that started in time) before it is killed.
GRACE = 30.0
NO_CUDA = {"status": "skipped", "reason": "no CUDA device"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU's (issue 17) or the CPU dry run's."""

    operator_shape: tuple[int, int, int]  # the realistic dot-product case (Z, H, W)
    operator_views: int
    agreement_shape: tuple[int, int, int]  # astra-cuda against astra-matrix, parallel beam
    cone_depth: int  # slices of the resampled sample in the cone-beam part
    cone_size: int
    cone_views: int
    sirt_iterations: int
    cgls_iterations: int
    cone_nfe: int
    amp_size: int
    amp_depths: tuple[int, ...]
    amp_nfe: tuple[int, ...]
    amp_views: int
    train_size: int
    train_batch: int
    train_iterations: int


GPU_PLAN = Plan(
    operator_shape=(64, 256, 256), operator_views=90, agreement_shape=(16, 128, 128),
    cone_depth=40, cone_size=128, cone_views=60, sirt_iterations=100, cgls_iterations=30, cone_nfe=50,
    amp_size=256, amp_depths=(64, 256, 500), amp_nfe=(50, 200), amp_views=8,
    train_size=256, train_batch=16, train_iterations=100,
)  # fmt: skip
CPU_PLAN = Plan(
    operator_shape=(4, 32, 32), operator_views=8, agreement_shape=(4, 32, 32),
    cone_depth=4, cone_size=32, cone_views=8, sirt_iterations=10, cgls_iterations=5, cone_nfe=2,
    amp_size=32, amp_depths=(4, 8), amp_nfe=(2, 4), amp_views=8,
    train_size=32, train_batch=2, train_iterations=2,
)  # fmt: skip


@dataclasses.dataclass
class Context:
    """What every part gets: the device, the sizes, the settings and the part's deadline."""

    device: Any  # torch.device
    plan: Plan
    ckpt: Path
    batch_size: int
    mixed_precision: str
    deadline: float  # time.monotonic() by which the part should be done
    path: Path | None = None  # where the part's record is saved after every case
    record: dict = dataclasses.field(default_factory=dict)  # the part's record, filled in as its cases finish

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds left of the part's budget."""
        return self.deadline - time.monotonic()

    def save(self) -> None:
        """Write the record so far: a part killed midway keeps the cases it finished."""
        if self.path is not None:
            write_json(self.path, self.record)


# ----------------------------------------------------------------------------------------------
# Shared pieces: JSON, cases, timing, the phantom, the prior, the one call of an inferer.


def plain(value: Any) -> Any:
    """``value`` as strict JSON: tuples as lists, tensors and numpy numbers as Python numbers, NaN/Inf as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": visible, and strict JSON
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(value), indent=1))
    os.replace(tmp, path)


def attempt(results: dict, name: str, ctx: Context, fn: Callable[[], dict]) -> None:
    """``results[name] = fn()`` with its seconds; or the error it raised; or a note that the part's budget is spent."""
    if ctx.left() <= 0:
        results[name] = {"status": "skipped", "reason": "the part's time budget is spent"}
        return
    log.info("%s ...", name)
    start = time.monotonic()
    try:
        results[name] = {"status": "ok", **fn(), "case_seconds": time.monotonic() - start}
    except Exception as err:  # one case failing must not lose the others
        log.exception("%s failed", name)
        results[name] = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    ctx.save()


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def milliseconds(fn: Callable[[], Any], device: Any, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms (after one untimed call), synchronising CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=1)
def _sample() -> Any:
    """The shipped sample ``(Z, H, W)`` in normalised attenuation, padded with air to 128 x 128 in-plane (3 mm voxels)."""
    import nibabel as nib
    import numpy as np
    import torch

    from bundle.physics.simulation import hu_to_normalized
    from bundle.transforms.layout import to_zhw

    hu = np.asarray(nib.load(ROOT / "sample" / "sample_ct.nii.gz").dataobj, dtype=np.float32)
    x = hu_to_normalized(to_zhw(torch.from_numpy(hu)[None]).float()).clamp(0, 1)
    size = max(128, x.shape[1], x.shape[2])
    out = torch.zeros(x.shape[0], size, size)
    top, left = (size - x.shape[1]) // 2, (size - x.shape[2]) // 2
    out[:, top : top + x.shape[1], left : left + x.shape[2]] = x
    return out


def phantom(depth: int, size: int, device: Any) -> tuple[Any, tuple[float, float, float]]:
    """The sample resampled (trilinear) to ``(depth, size, size)`` over the same extent, and its voxel size in mm."""
    import torch

    x = _sample()
    z, h, w = x.shape
    out = torch.nn.functional.interpolate(x[None, None], size=(depth, size, size), mode="trilinear", align_corners=False)
    voxel = (3.0 * z / depth, 3.0 * h / size, 3.0 * w / size)
    return out[0, 0].clamp(0, 1).contiguous().to(device), voxel


def shipped_network(device: Any, ckpt: Path | None) -> Any:
    """The prior as ``configs/inference.json`` defines it (``network_def``, parsed by MONAI), with the weights of ``ckpt``."""
    from monai.bundle import ConfigParser

    from bundle.networks import load_weights

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def", instantiate=True)
    if ckpt is not None:
        load_weights(network, ckpt)
    return network.to(device)


def reconstruct(method: str, settings: dict, sinogram: Any, network: Any, operator: Any, seed: int = 0) -> tuple[Any, dict]:
    """Reconstruct with ``make_inferer(method, **settings)``: the one place that calls an inferer.

    Returns the volume and the call's figures, measured by the bundle's own
    ``bundle.workflows.profiling.Profile`` around the call: seconds, the network's calls and
    share of the time, and the peak memory (on CUDA ``torch.cuda.max_memory_allocated`` during
    the call, the peak reset just before; on CPU the resident set's peak during the call).
    """
    import torch

    from bundle.recon.inferers import make_inferer
    from bundle.workflows.profiling import CountedNetwork, Profile

    inferer = make_inferer(method, **settings)
    counted = CountedNetwork(network) if network is not None else None
    with torch.no_grad(), Profile(sinogram.device, counted) as profile:
        volume = inferer(sinogram, counted, operator=operator, seed=seed)
        synchronize(sinogram.device)
    figures = profile.stats()
    figures["wall_seconds"] = figures["seconds"]
    if sinogram.device.type == "cuda":
        figures["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(sinogram.device) / 2**20
    return volume, figures


# ----------------------------------------------------------------------------------------------
# (a) operators


def dot_test(operator: Any, seed: int = 1) -> dict:
    """The dot-product test: the package's ``adjoint_error`` (``/(||A|| ||x|| ||y||)``) and ``/(||Ax|| ||y||)``, same x, y."""
    import torch

    from bundle.physics.operators import adjoint_error

    gen = torch.Generator().manual_seed(seed)  # x, then y, drawn as adjoint_error draws them
    x = torch.rand(operator.domain_shape, generator=gen, dtype=torch.float64).to(operator.device, torch.float32)
    y = torch.rand(operator.range_shape, generator=gen, dtype=torch.float64).to(operator.device, torch.float32)
    with torch.no_grad():
        ax, aty = operator(x).double(), operator.T(y).double()
    lhs, rhs = float((ax * y.double()).sum()), float((x.double() * aty).sum())
    return {
        "adjoint_error": adjoint_error(operator, torch.Generator().manual_seed(seed)),
        "adjoint_error_ax_y": abs(lhs - rhs) / (float(ax.norm()) * float(y.double().norm())),
        "norm": operator.norm(),
        "forward_ms": milliseconds(lambda: operator(x), operator.device),
        "adjoint_ms": milliseconds(lambda: operator.T(y), operator.device),
    }


def adjoint_case(geometry: Any, backend: str, device: Any) -> dict:
    from bundle.physics.operators import make_operator

    operator = make_operator(geometry, backend=backend, device=device)
    return {"backend": backend, "beam": geometry.kind, "vol_shape": geometry.vol_shape, "sino_shape": geometry.sino_shape,
            "n_views": geometry.n_views, **dot_test(operator)}  # fmt: skip


def relative_error(got: Any, reference: Any) -> dict:
    """``||got - ref|| / ||ref||`` and the least-squares scale ``<got, ref> / <ref, ref>`` (1 when the units agree)."""
    got, reference = got.double().cpu(), reference.double().cpu()
    return {
        "relative_error": float((got - reference).norm() / reference.norm()),
        "scale": float((got * reference).sum() / (reference * reference).sum()),
    }


def agreement_case(shape: tuple[int, int, int], views: int, device: Any) -> dict:
    """``astra-cuda`` (``parallel3d``) and ``astra-matrix`` on the GPU against the CPU matrix operator: ``A x`` and ``A^T y``."""
    import torch

    from bundle.physics.geometry import sparse_view
    from bundle.physics.operators import make_operator

    voxel = (2.0, 0.75, 0.75)  # non-unit and anisotropic, so that a unit mismatch between backends shows
    geometry = sparse_view(views, shape, voxel)
    cpu = make_operator(geometry, backend="astra-matrix")
    gen = torch.Generator().manual_seed(0)
    inputs = {"random": torch.rand(geometry.vol_shape, generator=gen), "phantom": phantom(shape[0], shape[1], torch.device("cpu"))[0]}
    y = torch.rand(geometry.sino_shape, generator=gen)
    out: dict = {"vol_shape": shape, "voxel_size": voxel, "n_views": views, "reference": "astra-matrix on CPU"}
    for backend in ("astra-cuda", "astra-matrix"):
        op = make_operator(geometry, backend=backend, device=device)
        for name, x in inputs.items():
            out[f"{backend} A x ({name})"] = relative_error(op(x.to(device)), cpu(x))
        out[f"{backend} A^T y (random)"] = relative_error(op.T(y.to(device)), cpu.T(y))
    return out


def part_operators(ctx: Context) -> None:
    """(a) Dot-product tests of the CUDA projectors (and the matrix one), and their agreement with the CPU matrix operator."""
    from bundle.physics.geometry import limited_angle, sparse_view
    from bundle.physics.operators.astra_cuda import cuda_available

    ctx.record["astra_cuda"] = cuda_available()  # ASTRA built with CUDA, and both it and torch see a GPU
    results: dict = ctx.record.setdefault("cases", {})
    # 1. the geometries of tests/test_operators.py (SHAPE, VOXEL; seed 1), so its tolerance can be set from these
    shape, voxel = (3, 24, 20), (2.0, 0.75, 0.75)
    for beam in ("parallel", "fan", "cone"):
        for factory in ("sparse", "limited"):
            geometry = sparse_view(7, shape, voxel, beam=beam) if factory == "sparse" else limited_angle(90, 15, shape, voxel, beam=beam)
            for backend in ("astra-matrix", "astra-cuda"):
                if (backend == "astra-matrix" and beam == "cone") or (backend == "astra-cuda" and beam == "fan"):
                    continue  # not a backend of this beam
                name = f"test-{beam}-{factory}-{backend}"
                if backend == "astra-cuda" and not ctx.cuda:
                    results[name] = dict(NO_CUDA)
                    continue
                device = ctx.device if backend == "astra-cuda" else None
                attempt(results, name, ctx, lambda g=geometry, b=backend, d=device: adjoint_case(g, b, d))
    # 2. a realistic size
    plan = ctx.plan
    for beam in ("parallel", "cone"):
        name = f"{beam}-{'x'.join(map(str, plan.operator_shape))}-astra-cuda"
        if not ctx.cuda:
            results[name] = dict(NO_CUDA)
            continue
        geometry = sparse_view(plan.operator_views, plan.operator_shape, (1.0, 1.0, 1.0), beam=beam)
        attempt(results, name, ctx, lambda g=geometry: adjoint_case(g, "astra-cuda", ctx.device))
    name = f"parallel-{'x'.join(map(str, plan.operator_shape))}-astra-matrix"
    geometry = sparse_view(plan.operator_views, plan.operator_shape, (1.0, 1.0, 1.0))
    attempt(results, name, ctx, lambda: adjoint_case(geometry, "astra-matrix", ctx.device))
    # 3. astra-cuda parallel3d against the CPU matrix operator
    if ctx.cuda:
        attempt(results, "agreement", ctx, lambda: agreement_case(plan.agreement_shape, plan.operator_views, ctx.device))
    else:
        results["agreement"] = dict(NO_CUDA)


# ----------------------------------------------------------------------------------------------
# (b) cone beam


def psnr_case(method: str, recon: Any, truth: Any, figures: dict) -> dict:
    from bundle.metrics import psnr

    return {"method": method, "psnr": psnr(recon.float(), truth), **figures}


def part_cone(ctx: Context) -> None:
    """(b) A cone-beam scan of the sample, simulated and reconstructed (SIRT, CGLS, DiffusionBlend++); a fan-beam stand-in on CPU."""
    import torch

    from bundle.physics.geometry import from_dict, sparse_view
    from bundle.physics.operators import available_backends, make_operator
    from bundle.physics.simulation import simulate_sinogram
    from bundle.recon.classical import cgls

    plan = ctx.plan
    x, voxel = phantom(plan.cone_depth, plan.cone_size, ctx.device)
    cone = sparse_view(plan.cone_views, tuple(x.shape), voxel, beam="cone")
    record = ctx.record
    record["geometry"] = {
        "beam": cone.kind, "vol_shape": cone.vol_shape, "voxel_size": cone.voxel_size, "n_views": cone.n_views,
        "det_shape": cone.det_shape, "det_spacing": cone.det_spacing, "source_origin": cone.source_origin,
        "origin_det": cone.origin_det, "sino_shape": cone.sino_shape,
        "round_trip": from_dict(json.loads(json.dumps(cone.to_dict()))) == cone,
        "available_backends": available_backends(cone),
    }  # fmt: skip
    if ctx.cuda:
        geometry = cone
    else:
        # the guard: without a GPU, building a cone operator is a clear error, never an ASTRA 3D call
        try:
            make_operator(cone)
            record["guard"] = "no error: a cone operator was built without CUDA"
        except ValueError as err:
            record["guard"] = f"ValueError: {err}"
        record["cone_reconstruction"] = dict(NO_CUDA)
        geometry = sparse_view(plan.cone_views, tuple(x.shape), voxel, beam="fan")
        record["stand_in"] = "fan beam (astra-matrix, CPU): the cone part's simulation and reconstruction code without ASTRA 3D"
    operator = make_operator(geometry, device=ctx.device)
    record["operator"] = repr(operator).split("(")[0]
    record["reconstructed_beam"] = geometry.kind
    y = simulate_sinogram(x, operator, photons=1e5, generator=torch.Generator(ctx.device).manual_seed(0))
    record["photons"] = 1e5
    operator.norm()
    results: dict = record.setdefault("cases", {})

    def sirt() -> dict:
        recon, figures = reconstruct("sirt", {"n_iter": plan.sirt_iterations}, y, None, operator)
        return {"iterations": plan.sirt_iterations, **psnr_case("sirt", recon, x, figures)}

    def cgls_case() -> dict:
        start = time.perf_counter()
        recon = cgls(y, operator, plan.cgls_iterations)
        synchronize(ctx.device)
        return {"iterations": plan.cgls_iterations, **psnr_case("cgls", recon, x, {"wall_seconds": time.perf_counter() - start})}

    def dbpp() -> dict:
        network = shipped_network(ctx.device, ctx.ckpt)
        settings = {"steps": plan.cone_nfe, "seed": 0, "batch_size": ctx.batch_size, "mixed_precision": ctx.mixed_precision,
                    "separation": max(network.separations)}  # fmt: skip
        recon, figures = reconstruct("dbpp", settings, y, network, operator)
        return {"nfe": plan.cone_nfe, **psnr_case("dbpp", recon, x, figures)}

    attempt(results, "sirt", ctx, sirt)
    attempt(results, "cgls", ctx, cgls_case)
    attempt(results, "dbpp", ctx, dbpp)


# ----------------------------------------------------------------------------------------------
# (c) bf16 reconstruction timing


def amp_run(ctx: Context, network: Any, depth: int, nfe: int, mixed_precision: Any) -> dict:
    """One seeded DiffusionBlend++ reconstruction of the resampled sample, ``(depth, amp_size, amp_size)``, from ``amp_views`` parallel views."""
    from bundle.physics.geometry import sparse_view
    from bundle.physics.operators import make_operator
    from bundle.physics.simulation import simulate_sinogram
    from bundle.precision import resolve_mixed_precision

    plan = ctx.plan
    x, voxel = phantom(depth, plan.amp_size, ctx.device)
    operator = make_operator(sparse_view(plan.amp_views, tuple(x.shape), voxel), device=ctx.device)
    y = simulate_sinogram(x, operator)
    operator.norm()  # cached outside the timed run
    settings = {"steps": nfe, "seed": 0, "batch_size": ctx.batch_size, "mixed_precision": mixed_precision,
                "separation": max(network.separations)}  # fmt: skip
    recon, figures = reconstruct("dbpp", settings, y, network, operator)
    seconds = figures.pop("wall_seconds")
    return {
        "depth": depth, "size": plan.amp_size, "nfe": nfe, "views": plan.amp_views, "batch_size": ctx.batch_size,
        "mixed_precision": mixed_precision, "precision": "bf16" if resolve_mixed_precision(mixed_precision, ctx.device) else "fp32",
        "operator": repr(operator).split("(")[0], "seconds": seconds, "seconds_per_nfe": seconds / nfe,
        "slices_per_second": depth * nfe / seconds,
        "psnr_sanity": psnr_case("dbpp", recon, x, {})["psnr"],  # the sample stretched to this grid: a sanity check only
        **figures,
    }  # fmt: skip


def predict_seconds(done: list[tuple[int, float]], work: int) -> float:
    """Seconds a run of ``work`` slices x steps should take: linear through the two largest runs done (0 before any)."""
    if not done:
        return 0.0
    (w1, t1), (w2, t2) = sorted(done)[-2:] if len(done) > 1 else ((0, 0.0), done[0])
    rate = (t2 - t1) / (w2 - w1) if w2 > w1 and t2 > t1 else t2 / w2
    return t2 + rate * (work - w2)


def part_amp(ctx: Context) -> None:
    """(c) bf16 DiffusionBlend++ reconstruction time and peak memory over the (Z, NFE) grid, cheapest first, within the budget."""
    from bundle.precision import resolve_mixed_precision

    plan = ctx.plan
    if not ctx.ckpt.is_file():
        raise FileNotFoundError(f"--ckpt {ctx.ckpt}: no such file (the shipped prior is models/model.pt)")
    network = shipped_network(ctx.device, ctx.ckpt)
    network.eval()
    record = ctx.record
    record.update(ckpt=str(ctx.ckpt), mixed_precision=ctx.mixed_precision)
    start = time.monotonic()
    amp_run(ctx, network, min(plan.amp_depths), 1, ctx.mixed_precision)  # warm-up: kernels, allocator, the slice matrix
    record["warmup_seconds"] = time.monotonic() - start
    runs: dict = record.setdefault("runs", {})
    done: list[tuple[int, float]] = []  # (slices x steps, seconds) of the runs so far, phantom and operator included
    grid = sorted(((d, n) for d in plan.amp_depths for n in plan.amp_nfe), key=lambda dn: (dn[0] * dn[1], dn[0]))
    for depth, nfe in grid:
        name = f"Z{depth}-nfe{nfe}"
        predicted = predict_seconds(done, depth * nfe)
        if predicted > ctx.left():
            runs[name] = {"status": "skipped", "reason": f"predicted {predicted:.0f} s, the part has {ctx.left():.0f} s left"}
            continue
        attempt(runs, name, ctx, lambda d=depth, n=nfe: amp_run(ctx, network, d, n, ctx.mixed_precision))
        if runs[name]["status"] == "ok":
            done.append((depth * nfe, runs[name]["case_seconds"]))
    if not resolve_mixed_precision(ctx.mixed_precision, ctx.device):
        return  # the runs are fp32 already
    # the fp32 reference of the cheapest run, for the speed-up of autocast
    depth, nfe = grid[0]
    name = f"Z{depth}-nfe{nfe}-fp32"
    if 4 * predict_seconds(done, depth * nfe) > ctx.left():
        runs[name] = {"status": "skipped", "reason": "not enough of the part's budget left"}
    else:
        attempt(runs, name, ctx, lambda: amp_run(ctx, network, depth, nfe, False))
        first = runs.get(f"Z{depth}-nfe{nfe}", {})
        if runs[name]["status"] == "ok" and first.get("status") == "ok":
            record["bf16_speedup"] = runs[name]["seconds"] / first["seconds"]


# ----------------------------------------------------------------------------------------------
# (d) training speed


def train_run(ctx: Context, mixed_precision: Any, iterations: int) -> dict:
    """Timed optimiser steps of the shipped architecture on random slabs (forward, eps MSE, backward, AdamW)."""
    import torch

    from bundle.recon.noise_schedule import NoiseSchedule
    from bundle.workflows.training import SlabDiffusionInferer

    plan, device = ctx.plan, ctx.device
    network = shipped_network(device, None)  # the speed does not depend on the weights
    network.train()
    schedule = NoiseSchedule()
    inferer = SlabDiffusionInferer(schedule.scheduler(), mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)
    separations = torch.tensor(network.separations, device=device)
    shape = (plan.train_batch, network.slab_size, plan.train_size, plan.train_size)

    def step() -> float:
        x = torch.rand(shape, generator=gen, device=device).mul_(2).sub_(1)
        noise = torch.randn(shape, generator=gen, device=device)
        t = torch.randint(0, schedule.num_train_timesteps, (plan.train_batch,), generator=gen, device=device)
        s = separations[torch.randint(0, len(separations), (plan.train_batch,), generator=gen, device=device)]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(inferer(x, network, noise, t, s), noise)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2 if device.type == "cuda" else 1):  # warm-up
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    done = 0
    while done < iterations and (done == 0 or ctx.left() > 5):  # keep 5 s of the budget for the rest
        loss = step()
        done += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    out = {
        "mixed_precision": mixed_precision, "size": plan.train_size, "batch": plan.train_batch, "iterations": done,
        "seconds": seconds, "iterations_per_second": done / seconds, "slabs_per_second": done * plan.train_batch / seconds,
        "last_loss": float(loss.detach()),
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def part_training(ctx: Context) -> None:
    """(d) Training iterations per second at ``train_size``, under the run's mixed precision, then in fp32 with the time left."""
    from bundle.precision import resolve_mixed_precision

    record = ctx.record
    record["mixed_precision"] = ctx.mixed_precision
    runs: dict = record.setdefault("runs", {})
    if not resolve_mixed_precision(ctx.mixed_precision, ctx.device):
        attempt(runs, "fp32", ctx, lambda: train_run(ctx, False, ctx.plan.train_iterations))
        return
    attempt(runs, "bf16", ctx, lambda: train_run(ctx, True, ctx.plan.train_iterations))
    attempt(runs, "fp32", ctx, lambda: train_run(ctx, False, max(2, ctx.plan.train_iterations // 2)))
    if runs["bf16"]["status"] == "ok" and runs["fp32"]["status"] == "ok":
        record["bf16_speedup"] = runs["bf16"]["iterations_per_second"] / runs["fp32"]["iterations_per_second"]


PART_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "operators": part_operators, "cone": part_cone, "training": part_training, "amp": part_amp,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The run: environment, parts (in this process or one process each), summary.


def environment(device: Any) -> dict:
    """Where the figures come from (without touching ASTRA: ``operators.json`` says whether it can use CUDA)."""
    import torch

    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "device": str(device), "threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    for package in ("monai", "astra-toolbox", "pytorch-ignite", "nibabel", "numpy"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def case_errors(record: dict) -> list[str]:
    """Names of the cases (at any depth) whose status is ``error``."""
    out = []
    for key, value in record.items():
        if isinstance(value, dict):
            if value.get("status") == "error":
                out.append(key)
            out += case_errors(value)
    return out


def run_part(name: str, ctx: Context, out: Path) -> dict:
    """Run one part in this process, catching its exception; write ``<name>.json`` (after every case too); return the record."""
    import torch

    start = time.monotonic()
    ctx.path = out / f"{name}.json"
    record = ctx.record
    record.update(part=name, device=str(ctx.device), budget_seconds=ctx.left(), status="running")
    ctx.save()
    log.info("part %s: budget %.0f s", name, ctx.left())
    try:
        PART_FUNCTIONS[name](ctx)
        record["status"] = "ok"
    except Exception as err:
        log.exception("part %s failed", name)
        record.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = time.monotonic() - start
    record["case_errors"] = case_errors(record)
    ctx.save()
    log.info("part %s: %s in %.1f s", name, record["status"], record["seconds"])
    if ctx.cuda:
        torch.cuda.empty_cache()
    return record


def run_part_process(name: str, args: argparse.Namespace, budget: float, out: Path) -> dict:
    """Run one part in a child process killed after ``budget + GRACE`` seconds; a crash or kill is recorded, not fatal."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-budget", f"{budget:.1f}",
           "--device", args.device, "--out", str(out), "--ckpt", str(args.ckpt), "--mixed-precision", args.mixed_precision,
           "--batch-size", str(args.batch_size), "--plan", args.plan]  # fmt: skip
    start = time.monotonic()
    path = out / f"{name}.json"
    path.unlink(missing_ok=True)
    try:
        rc = subprocess.run(cmd, timeout=budget + GRACE).returncode
        problem = None if rc == 0 else (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}")
    except subprocess.TimeoutExpired:
        problem = f"killed after {budget + GRACE:.0f} s (budget {budget:.0f} s + {GRACE:.0f} s grace)"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {"part": name}
    if problem or record.get("status") in (None, "running"):  # what it finished stays
        record.update(status="crashed", error=problem or "the part's process ended without finishing its record",
                      seconds=time.monotonic() - start)  # fmt: skip
        record["case_errors"] = case_errors(record)
        write_json(path, record)
        log.error("part %s: %s", name, record["error"])
    return record


def figures(records: dict[str, dict]) -> dict:
    """The numbers the model card needs, from the parts' records."""

    def ok(d: Any) -> bool:
        return isinstance(d, dict) and d.get("status") == "ok"

    out: dict = {}
    cases = records.get("operators", {}).get("cases", {})
    out["adjoint_error"] = {k: v["adjoint_error"] for k, v in cases.items() if ok(v) and "adjoint_error" in v}
    out["adjoint_error_ax_y"] = {k: v["adjoint_error_ax_y"] for k, v in cases.items() if ok(v) and "adjoint_error_ax_y" in v}
    if ok(cases.get("agreement")):
        out["agreement_relative_error"] = {k: v["relative_error"] for k, v in cases["agreement"].items() if isinstance(v, dict)}
    cone = records.get("cone", {})
    out["cone_psnr"] = {k: v["psnr"] for k, v in cone.get("cases", {}).items() if ok(v)}
    if "reconstructed_beam" in cone:
        out["cone_psnr_beam"] = cone["reconstructed_beam"]
    runs = records.get("amp", {}).get("runs", {})
    out["amp"] = [{k: v.get(k) for k in ("depth", "nfe", "precision", "seconds", "peak_memory_mb")} | {"run": name}
                  for name, v in runs.items() if ok(v)]  # fmt: skip
    if "bf16_speedup" in records.get("amp", {}):
        out["amp_bf16_speedup"] = records["amp"]["bf16_speedup"]
    train = records.get("training", {})
    out["train_iterations_per_second"] = {k: v["iterations_per_second"] for k, v in train.get("runs", {}).items() if ok(v)}
    if "bf16_speedup" in train:
        out["train_bf16_speedup"] = train["bf16_speedup"]
    return out


def setup_logging(out: Path) -> None:
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(out / "gpu_check.log", mode="a")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s", handlers=handlers, force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees one)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="output folder (default: $OUT)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (always in the order cheapest first)")
    parser.add_argument("--ckpt", type=Path, default=ROOT / "models" / "model.pt", help="weights of the shipped prior")
    parser.add_argument("--max-seconds", type=float, default=400.0, help="the whole run's time budget")
    parser.add_argument("--plan", choices=("auto", "gpu", "cpu"), default="auto", help="sizes: the GPU's or the CPU dry run's (auto: by device)")
    parser.add_argument("--batch-size", type=int, default=None, help="slabs per network call in reconstructions (default 64 on CUDA, 8 on CPU)")
    parser.add_argument("--mixed-precision", default=None, help="the mixed_precision setting (default: true on CUDA, false on CPU)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto", help="one process per part (auto: on CUDA)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu for the dry run)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.plan = args.plan if args.plan != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    args.mixed_precision = args.mixed_precision or ("true" if device.type == "cuda" else "false")
    plan = GPU_PLAN if args.plan == "gpu" else CPU_PLAN

    def context(budget: float) -> Context:
        return Context(device, plan, args.ckpt, args.batch_size, args.mixed_precision, time.monotonic() + budget)

    if args.child:  # one part, in its own process (run_part_process)
        run_part(args.child, context(args.child_budget or BUDGETS[args.child]), out)
        return 0  # the record, error or not, is in the JSON

    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda")
    summary: dict = {
        "script": "scripts/gpu_check.py", "command": sys.argv, "device": str(device), "plan": args.plan,
        "sizes": dataclasses.asdict(plan), "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
        "max_seconds": args.max_seconds, "isolate": isolate,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device), "complete": False, "parts": {},
    }  # fmt: skip
    records: dict[str, dict] = {}
    lock = threading.Lock()

    def write_summary(note: str | None = None) -> None:
        with lock:
            summary["seconds"] = time.monotonic() - started
            summary["figures"] = figures(records)
            if note:
                summary["note"] = note
            write_json(out / "summary.json", summary)

    def watchdog() -> None:  # in-process parts cannot be killed one by one: end the run, keeping what is written
        log.error("the run passed --max-seconds %.0f + %.0f s grace: stopping", args.max_seconds, GRACE)
        write_summary(f"stopped by the watchdog after {args.max_seconds + GRACE:.0f} s")
        os._exit(3)

    timer = threading.Timer(args.max_seconds + GRACE, watchdog)
    timer.daemon = True
    timer.start()
    write_summary()
    for name in [p for p in PARTS if p in args.parts]:
        budget = min(BUDGETS[name], args.max_seconds - (time.monotonic() - started))
        if budget < 5:
            record = {"part": name, "status": "skipped", "reason": "no time left of --max-seconds", "case_errors": []}
            write_json(out / f"{name}.json", record)
        elif isolate:
            record = run_part_process(name, args, budget, out)
        else:
            record = run_part(name, context(budget), out)
        records[name] = record
        summary["parts"][name] = {k: record.get(k) for k in ("status", "seconds", "error", "reason", "case_errors") if record.get(k) is not None}
        summary["parts"][name]["file"] = f"{name}.json"
        write_summary()
    timer.cancel()
    summary["complete"] = True
    write_summary()
    log.info("done in %.1f s: %s", summary["seconds"], json.dumps(plain(summary["parts"])))
    return 0 if all(r.get("status") == "ok" and not r.get("case_errors") for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
