"""Reconstruction methods as MONAI ``Inferer``s behind one switch: :func:`make_inferer`.

Every inferer is called as ``inferer(measurements, network, operator)`` and returns the
reconstructed image ``(Z, H, W)`` in normalised attenuation ([0, 1] for the diffusion
methods). After a call, ``inferer.stats`` holds the run's cost: seconds, network evaluations
and peak memory.

Methods (``METHODS``):

- ``dbpp``: DiffusionBlend++, shifted and interleaved partitions alternating (the default).
- ``db``: DiffusionBlend, shifted adjacent partitions.
- ``fixed``: one fixed adjacent partition (no blending; the ablation).
- ``dds2d``: a 2D (k=1) prior, slice by slice (DDS).
- ``mbir``: a 2D prior with z-TV data consistency (DiffusionMBIR-style).
- ``fbp``, ``sirt``, ``tv``: classical reconstructions (``bundle.recon.classical``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from bundle.recon.data_consistency import ConjugateGradientDC, ZTVDataConsistency
from bundle.recon.noise_schedule import NoiseSchedule
from bundle.recon.padding import CroppedDataConsistency, centre_crop, working_shape
from bundle.recon.partitions import make_schedule
from bundle.precision import resolve_mixed_precision
from bundle.recon.sampler import ddim_timesteps, sample
from bundle.settings import as_bool, setting_number

__all__ = [
    "METHODS",
    "DIFFUSION_METHODS",
    "DiffusionBlendInferer",
    "PeakMemory",
    "accepted_settings",
    "check_settings",
    "make_inferer",
    "method_settings",
    "method_slab_size",
]

DIFFUSION_METHODS: dict[str, dict[str, Any]] = {
    "dbpp": {"schedule": "dbpp"},
    "db": {"schedule": "shifted"},
    "fixed": {"schedule": "fixed"},
    "dds2d": {"schedule": "2d", "slab_size": 1},
    "mbir": {"schedule": "2d", "slab_size": 1, "data_consistency": "ztv"},
}
CLASSICAL_METHODS: dict[str, str] = {"fbp": "FBPInferer", "sirt": "SIRTInferer", "tv": "TVInferer"}
METHODS: tuple[str, ...] = (*DIFFUSION_METHODS, *CLASSICAL_METHODS)


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; elsewhere the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on a CUDA device, sampled process RSS on CPU.

    Attributes (after the block): ``baseline_bytes`` (before), ``peak_bytes`` (the highest
    seen), ``increase_bytes`` (peak - baseline), ``kind`` (``"cuda_allocated"`` or ``"cpu_rss"``).

    Args:
        device: the device the work runs on.
        interval: seconds between RSS samples on CPU.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self.baseline_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = self.peak_bytes = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


class _CountedDenoiser:
    """Wraps a network into the denoiser contract and counts its calls, slabs and time."""

    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        self.network = network
        self.calls = 0
        self.slabs = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, separation: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.network(x, t, separation)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.slabs += x.shape[0]
        return out


def _alphas_cumprod(noise_schedule: Any) -> torch.Tensor:
    """The cumulative alphas ``(T,)`` of a noise schedule (a copy).

    Raises:
        TypeError: ``noise_schedule`` has no ``alphas_cumprod`` (e.g. a number was given).
    """
    alphas_cumprod = getattr(noise_schedule, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
        raise TypeError(
            "noise_schedule must be a NoiseSchedule or a scheduler with alphas_cumprod "
            f"(configs/inference.json 'noise_schedule'), got {type(noise_schedule).__name__}"
        )
    return alphas_cumprod.detach().clone()


class DiffusionBlendInferer(Inferer):
    """Reconstruct with a slab diffusion prior: DiffusionBlend(++), DDS-2D or the DiffusionMBIR-style baseline.

    Args:
        schedule: partition schedule: ``"dbpp"``, ``"shifted"``, ``"fixed"``, ``"interleaved"``, ``"2d"``.
        slab_size: k of the prior (1 for the 2D baselines).
        separation: s of the interleaved (jump) steps.
        steps: DDIM steps.
        eta: DDIM stochasticity.
        data_consistency: ``"cg"`` (CG on the normal equations, DDS) or ``"ztv"`` (z-TV ADMM).
        cg_iterations: CG iterations per step (per ADMM pass for ``"ztv"``).
        cg_lambda: proximal weight of ``"cg"``, relative to ``||A||^2`` (0: plain DDS).
        admm_iterations: ADMM passes per step for ``"ztv"``.
        tv_rho: ADMM penalty of ``"ztv"``, relative to ``||A||^2``.
        tv_lambda: z-TV weight of ``"ztv"``, relative to ``||A||^2``.
        batch_size: slabs per network call.
        seed: seed of the start noise, the re-noising and the random partition offsets.
        noise_schedule: the prior's training noise schedule (a ``NoiseSchedule``, or any
            scheduler with ``alphas_cumprod`` such as MONAI's ``DDPMScheduler``). The bundle
            defines it once, in ``configs/inference.json`` ``noise_schedule``; ``None`` takes
            ``NoiseSchedule()`` (T = 1000, linear betas 1e-4 .. 0.02: the shipped priors').
        mixed_precision: bf16 autocast of the network: ``"auto"`` (where the device computes
            bf16 natively, ``bundle.precision``), true or false.
        progress: show a progress bar.
        image_size: smallest in-plane size of the working volume (the prior's training size);
            ``None``: only the network's divisor applies. A smaller or non-divisible operator
            domain is padded for the prior and cropped for data consistency and the result
            (``bundle.recon.padding``).
        warm_start: share of the DDIM steps to skip by starting from a classical
            reconstruction diffused to the noise level of the first remaining step instead
            of from pure noise (Chung et al., CVPR 2022, "come closer, diffuse faster"); 0
            (the default) is the paper's sampler. Network evaluations drop to
            ``steps - round(warm_start * steps)``.
        warm_start_method: the classical method of the warm start: ``"fbp"``, ``"sirt"`` or ``"tv"``.
    """

    def __init__(
        self,
        schedule: str = "dbpp",
        slab_size: int = 3,
        separation: int = 3,
        steps: int = 200,
        eta: float = 0.85,
        data_consistency: str = "cg",
        cg_iterations: int = 5,
        cg_lambda: float = 0.0,
        admm_iterations: int = 1,
        tv_rho: float = 1e-3,
        tv_lambda: float = 5e-5,
        batch_size: int = 8,
        seed: int = 0,
        noise_schedule: NoiseSchedule | None = None,
        mixed_precision: bool | str = "auto",
        progress: bool = False,
        image_size: int | None = None,
        warm_start: float = 0.0,
        warm_start_method: str = "sirt",
    ) -> None:
        super().__init__()
        if data_consistency not in ("cg", "ztv"):
            raise ValueError(f"data_consistency must be 'cg' or 'ztv', got {data_consistency!r}")
        warm_start = setting_number("warm_start", warm_start, 0.0, 1.0, open_maximum=True)
        if warm_start_method not in CLASSICAL_METHODS:
            raise ValueError(f"warm_start_method must be one of {list(CLASSICAL_METHODS)}, got {warm_start_method!r}")
        self.schedule = make_schedule(schedule, slab_size, separation)
        self.slab_size = int(slab_size)
        # each setting read as a number in its range, or an error naming it (the command line gives strings)
        self.steps = setting_number("steps", steps, 1, integer=True)
        self.eta = setting_number("eta", eta, 0.0, 1.0)
        self.data_consistency = data_consistency
        self.cg_iterations = setting_number("cg_iterations", cg_iterations, 0, integer=True)
        self.cg_lambda = setting_number("cg_lambda", cg_lambda, 0.0)
        self.admm_iterations = setting_number("admm_iterations", admm_iterations, 1, integer=True)
        self.tv_rho = setting_number("tv_rho", tv_rho, 0.0, open_minimum=True)
        self.tv_lambda = setting_number("tv_lambda", tv_lambda, 0.0)
        self.batch_size = setting_number("batch_size", batch_size, 1, integer=True)
        self.seed = setting_number("seed", seed, 0, integer=True)
        self.noise_schedule = noise_schedule if noise_schedule is not None else NoiseSchedule()
        self.alphas_cumprod = _alphas_cumprod(self.noise_schedule)
        self.mixed_precision = mixed_precision
        resolve_mixed_precision(mixed_precision, "cpu")  # an invalid value fails here, not mid-run
        self.progress = as_bool(progress, "progress")
        self.image_size = int(image_size) if image_size else None
        self.warm_start = float(warm_start)
        self.warm_start_method = warm_start_method
        self.stats: dict[str, Any] = {}

    @property
    def start_step(self) -> int:
        """Index of the first DDIM step run (0 without a warm start; never the last step's index + 1)."""
        return min(round(self.warm_start * self.steps), self.steps - 1)

    def start_volume(
        self,
        padded: tuple[int, int, int],
        crop: tuple[slice, slice, slice],
        operator: Any,
        measurements: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """``x_T``: standard normal noise, or the warm start diffused to the first step's noise level.

        The warm start reconstructs the operator's domain with ``warm_start_method``, clips it
        to the prior's range [0, 1], places it in the working volume (air, 0, outside the
        crop) and mixes it with noise as the forward process does:
        ``sqrt(a_t) (2 x - 1) + sqrt(1 - a_t) z``.
        """
        noise = torch.randn(padded, generator=generator, device=measurements.device)
        if self.start_step == 0:
            return noise
        classical = make_inferer(self.warm_start_method)
        image = torch.zeros(padded, device=measurements.device)
        image[crop] = classical(measurements, None, operator).to(image).clamp(0, 1)
        t = int(ddim_timesteps(self.steps, len(self.alphas_cumprod))[self.start_step])
        a_t = float(self.alphas_cumprod[t])
        return noise.mul_((1 - a_t) ** 0.5).add_(image.mul_(2).sub_(1), alpha=a_t**0.5)

    def make_data_consistency(self, operator: Any, measurements: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The data-consistency callable of this inferer for ``y = measurements``."""
        if self.data_consistency == "ztv":
            return ZTVDataConsistency(
                operator, measurements, self.cg_iterations, self.admm_iterations, self.tv_rho, self.tv_lambda
            )
        return ConjugateGradientDC(operator, measurements, self.cg_iterations, self.cg_lambda)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], operator: Any, seed: int | None = None
    ) -> torch.Tensor:
        """Reconstruct ``(Z, H, W)`` in [0, 1] from the sinogram ``inputs`` measured through ``operator``.

        Args:
            inputs: the measurements ``y`` (the operator's range shape).
            network: the denoiser ``network(x_t, t, separation) -> eps`` with ``slab_size`` channels.
            operator: the projector ``A`` (``bundle.physics.operators``).
            seed: overrides the constructor's seed (e.g. for several samples).

        The network runs on the operator's domain padded in-plane to a multiple of its
        ``size_divisor`` (and to at least ``image_size``); data consistency and the returned
        volume are on the domain itself.

        Raises:
            ValueError: the network's slab size differs from the method's, or the sinogram
                does not fit the operator.
        """
        net_k = getattr(network, "slab_size", None)
        if net_k is not None and int(net_k) != self.slab_size:
            raise ValueError(
                f"this method needs a prior of slab_size={self.slab_size}, but the network has slab_size={net_k}"
            )
        range_shape = tuple(getattr(operator, "range_shape", inputs.shape))
        if tuple(inputs.shape) != range_shape:
            raise ValueError(f"the sinogram has shape {tuple(inputs.shape)}, but the geometry expects {range_shape}")
        device = inputs.device
        generator = torch.Generator(device=device).manual_seed(self.seed if seed is None else int(seed))
        denoiser = _CountedDenoiser(network)
        was_training = getattr(network, "training", False)
        if hasattr(network, "eval"):
            network.eval()
        domain = tuple(int(s) for s in operator.domain_shape)
        padded = working_shape(domain, int(getattr(network, "size_divisor", 1)), self.image_size)
        data_consistency: Callable[[torch.Tensor], torch.Tensor] = self.make_data_consistency(operator, inputs.float())
        crop = centre_crop(domain, padded)
        bf16 = resolve_mixed_precision(self.mixed_precision, device)
        if padded != domain:
            data_consistency = CroppedDataConsistency(data_consistency, crop)
        start = time.perf_counter()
        try:
            with PeakMemory(device) as memory:
                x_T = self.start_volume(padded, crop, operator, inputs.float(), generator)
                recon = sample(
                    denoiser,
                    x_T,
                    self.schedule,
                    data_consistency,
                    self.alphas_cumprod,
                    num_steps=self.steps,
                    eta=self.eta,
                    batch_size=self.batch_size,
                    generator=generator,
                    mixed_precision=bf16,
                    progress=self.progress,
                    start_step=self.start_step,
                )
                if padded != domain:
                    recon = recon[crop].contiguous()
        finally:
            if was_training and hasattr(network, "train"):
                network.train()
        seconds = time.perf_counter() - start
        self.stats = {
            "seconds": seconds,
            "nfe": self.steps - self.start_step,
            "network_calls": denoiser.calls,
            "slab_evaluations": denoiser.slabs,
            "network_seconds": denoiser.seconds,
            "network_share": denoiser.seconds / seconds if seconds > 0 else 0.0,
            "peak_memory_mb": memory.peak_bytes / 2**20,
            "peak_memory_increase_mb": memory.increase_bytes / 2**20,
            "memory_kind": memory.kind,
            "working_shape": padded,
            "precision": "bf16" if bf16 else "fp32",
        }
        return recon

    def __repr__(self) -> str:
        return (
            f"DiffusionBlendInferer(schedule={self.schedule!r}, steps={self.steps}, eta={self.eta}, "
            f"data_consistency={self.data_consistency!r}, cg_iterations={self.cg_iterations}, "
            f"warm_start={self.warm_start}, seed={self.seed}, noise_schedule={self.noise_schedule!r})"
        )


class _TimedClassical(Inferer):
    """Adds ``stats`` (seconds, peak memory, no network evaluations) to a classical inferer."""

    slab_size = None

    def __init__(self, inner: Inferer) -> None:
        super().__init__()
        self.inner = inner
        self.stats: dict[str, Any] = {}

    def __call__(self, inputs: torch.Tensor, network: Any = None, operator: Any = None, seed: int | None = None) -> torch.Tensor:  # type: ignore[override]
        start = time.perf_counter()
        with PeakMemory(inputs.device) as memory:
            recon = self.inner(inputs, operator)
        seconds = time.perf_counter() - start
        self.stats = {
            "seconds": seconds,
            "nfe": 0,
            "network_calls": 0,
            "slab_evaluations": 0,
            "network_seconds": 0.0,
            "network_share": 0.0,
            "peak_memory_mb": memory.peak_bytes / 2**20,
            "peak_memory_increase_mb": memory.increase_bytes / 2**20,
            "memory_kind": memory.kind,
        }
        return recon

    def __repr__(self) -> str:
        return repr(self.inner)


def _accepted(cls: Callable[..., Any], settings: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(settings)
    return {k: v for k, v in settings.items() if k in params}


def method_slab_size(method: str, slab_size: int = 3) -> int | None:
    """The prior's slab size a method needs: ``slab_size`` for blending methods, 1 for 2D ones, None for classical."""
    if method not in METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; choose one of {list(METHODS)}")
    if method in CLASSICAL_METHODS:
        return None
    return int(DIFFUSION_METHODS[method].get("slab_size", slab_size))


def _method_class(method: str) -> Callable[..., Any]:
    """The class that reconstructs with ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; choose one of {list(METHODS)}")
    if method in DIFFUSION_METHODS:
        return DiffusionBlendInferer
    from bundle.recon import classical

    return getattr(classical, CLASSICAL_METHODS[method])


def accepted_settings() -> frozenset[str] | None:
    """The setting names that some method takes (``None``: a method takes any keyword)."""
    names: set[str] = set()
    for method in METHODS:
        params = inspect.signature(_method_class(method)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        names.update(params)
    return frozenset(names)


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse a setting that no method takes (a typo such as ``cg_lamda`` would otherwise do nothing).

    Raises:
        ValueError: naming the setting and the closest accepted name.
    """
    accepted = accepted_settings()
    if accepted is None:
        return
    for name in settings:
        if name not in accepted:
            close = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are {sorted(accepted)}"
            raise ValueError(f"unknown reconstruction setting {name!r}: no method takes it ({hint})")


def method_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The part of ``settings`` that ``method`` takes (with the method's own fixed settings for diffusion methods).

    Raises:
        ValueError: an unknown method, or a setting that no method takes (:func:`check_settings`).
    """
    check_settings(settings)
    return _accepted(_method_class(method), {**settings, **DIFFUSION_METHODS.get(method, {})})


def make_inferer(method: str = "dbpp", **settings: Any) -> Inferer:
    """The inferer of ``method`` (one of :data:`METHODS`), configured by ``settings``.

    A setting that another method takes but this one does not is ignored
    (:func:`method_settings`), so one set of settings (steps, seed, ...) can drive every
    method; the method fixes its own schedule and slab size. A setting that no method takes
    is an error.

    Raises:
        ValueError: an unknown method, or a setting that no method takes.
    """
    inferer: Inferer = _method_class(method)(**method_settings(method, settings))
    if method in CLASSICAL_METHODS:
        inferer = _TimedClassical(inferer)
    inferer.method = method  # type: ignore[attr-defined]
    return inferer
