"""Reconstruction methods as MONAI ``Inferer``s, and :func:`make_inferer`, the one switch of the command line.

Every method follows one call convention (:class:`bundle.recon.method.ReconstructionMethod`):
``inferer(measurements, network, operator, seed=None)`` returns the reconstructed image
``(Z, H, W)`` in normalised attenuation ([0, 1] for the diffusion methods); classical methods
take ``network=None``. Nothing is timed or measured here: a workflow measures the call
(``bundle.workflows.profiling``).

:class:`DiffusionBlendInferer` is wired from objects (a partition schedule, a data-consistency
factory, the noise schedule); :func:`make_inferer` builds it, or a classical inferer, from the
command line's flat settings. Methods (:data:`METHODS`):

- ``dbpp``: DiffusionBlend++, shifted and interleaved partitions alternating (the default).
- ``db``: DiffusionBlend, shifted adjacent partitions.
- ``fixed``: one fixed adjacent partition (no blending; the ablation).
- ``dds2d``: a 2D (k=1) prior, slice by slice (DDS).
- ``mbir``: a 2D prior with z-TV data consistency (DiffusionMBIR-style).
- ``fbp``, ``sirt``, ``tv``: classical reconstructions (``bundle.recon.classical``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from bundle.precision import inference_weights, resolve_mixed_precision
from bundle.recon import partitions
from bundle.recon.classical import FBPInferer, SIRTInferer, TVInferer
from bundle.recon.data_consistency import ConjugateGradientDC, ZTVDataConsistency
from bundle.recon.method import ReconstructionMethod
from bundle.recon.noise_schedule import NoiseSchedule
from bundle.recon.padding import CroppedDataConsistency, centre_crop, working_shape
from bundle.recon.partitions import Blend, DiffusionBlendPPSchedule, PartitionSchedule, make_schedule
from bundle.recon.sampler import ddim_timesteps, sample
from bundle.recon.support import SupportConstraint, support_setting, visual_hull
from bundle.settings import as_bool, setting_number

__all__ = [
    "METHODS",
    "CLASSICAL_METHODS",
    "DIFFUSION_METHODS",
    "DATA_CONSISTENCY_KINDS",
    "DataConsistencyFactory",
    "DiffusionBlendInferer",
    "accepted_settings",
    "check_settings",
    "diffusion_inferer",
    "make_inferer",
    "method_settings",
    "method_slab_size",
]

#: What each diffusion method fixes: its partition schedule, and for the 2D ones the slab size and data consistency.
DIFFUSION_METHODS: dict[str, dict[str, Any]] = {
    "dbpp": {"schedule": "dbpp"},
    "db": {"schedule": "shifted"},
    "fixed": {"schedule": "fixed"},
    "dds2d": {"schedule": "2d", "slab_size": 1, "data_consistency": "cg"},
    "mbir": {"schedule": "2d", "slab_size": 1, "data_consistency": "ztv"},
}
#: The data-consistency steps of the ``data_consistency`` setting: CG (DDS) or CG with a z-TV ADMM pass.
DATA_CONSISTENCY_KINDS: tuple[str, ...] = ("cg", "ztv")
CLASSICAL_METHODS: dict[str, type[ReconstructionMethod]] = {"fbp": FBPInferer, "sirt": SIRTInferer, "tv": TVInferer}
METHODS: tuple[str, ...] = (*DIFFUSION_METHODS, *CLASSICAL_METHODS)

#: ``factory(operator, measurements) -> data_consistency``, e.g. ``functools.partial(ConjugateGradientDC, iterations=5)``
#: (in a config: ``{"_target_": "bundle.recon.data_consistency.ConjugateGradientDC", "_mode_": "callable", ...}``).
DataConsistencyFactory = Callable[[Any, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


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


def _describe(factory: Callable[..., Any]) -> str:
    """``ConjugateGradientDC(iterations=5, lam=0.0)`` for a partial, else the callable's name."""
    if isinstance(factory, functools.partial):
        args = [repr(a) for a in factory.args] + [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return f"{getattr(factory.func, '__name__', repr(factory.func))}({', '.join(args)})"
    return getattr(factory, "__name__", repr(factory))


class DiffusionBlendInferer(ReconstructionMethod):
    """Reconstruct with a slab diffusion prior: DiffusionBlend(++), DDS-2D or the DiffusionMBIR-style baseline.

    Args:
        schedule: the partition schedule (``bundle.recon.partitions``); its ``slab_size`` is the prior's k.
            ``None``: DiffusionBlend++ with k = 3 and jump separation 3.
        data_consistency: ``factory(operator, y) -> step``; ``None``: 5 CG iterations, plain DDS (``ConjugateGradientDC``).
        noise_schedule: the prior's training schedule (``NoiseSchedule`` or a scheduler with ``alphas_cumprod``),
            defined once in ``configs/inference.json``; ``None``: ``NoiseSchedule()`` (the shipped priors').
        steps: DDIM steps (at most the schedule's T). eta: DDIM stochasticity.
        batch_size: slabs per network call. seed: of the start noise, re-noising and partition offsets.
        mixed_precision: bf16 autocast of the network (``"auto"``, true, false: ``bundle.precision``).
        progress: show a progress bar.
        image_size: smallest in-plane working size (``bundle.recon.padding``); ``None``: the network's divisor only.
        warm_start: share of the DDIM steps skipped by starting from ``warm_start_method``'s reconstruction
            (``None``: SIRT) diffused to the first remaining step (Chung et al., CVPR 2022); 0: the paper's sampler.
        method: the method's name, recorded in the metrics.
        blend: score blending over a partition (``bundle.recon.partitions.blend``; slab-parallel under
            ``torchrun``: ``bundle.workflows.distributed.ShardedBlend``).
        timestep_power: the DDIM time grid's exponent p >= 1 (``sampler.ddim_timesteps``; 1: even, >1: denser near 0).
        support: ``"hull"``: data consistency over the visual hull of the measurements, air outside it
            (``bundle.recon.support``); ``"none"``: every voxel free.
        support_threshold: share of the largest line integral below which a ray counts as empty (``support="hull"``).
    """

    def __init__(
        self,
        schedule: PartitionSchedule | None = None,
        data_consistency: DataConsistencyFactory | None = None,
        noise_schedule: NoiseSchedule | None = None,
        steps: int = 200,
        eta: float = 0.85,
        batch_size: int = 8,
        seed: int = 0,
        mixed_precision: bool | str = "auto",
        progress: bool = False,
        image_size: int | None = None,
        warm_start: float = 0.0,
        warm_start_method: ReconstructionMethod | None = None,
        method: str = "diffusion",
        blend: Blend = partitions.blend,
        timestep_power: float = 1.0,
        support: str = "none",
        support_threshold: float = 0.003,
    ) -> None:
        super().__init__()
        self.schedule = DiffusionBlendPPSchedule(3, 3) if schedule is None else schedule
        if not isinstance(self.schedule, PartitionSchedule):
            raise TypeError(
                "schedule must be a partition schedule (bundle.recon.partitions, e.g. make_schedule('dbpp', 3, 3)), "
                f"got {schedule!r}"
            )
        self.data_consistency = functools.partial(ConjugateGradientDC) if data_consistency is None else data_consistency
        if not callable(self.data_consistency):
            raise TypeError(f"data_consistency must be a factory (operator, measurements) -> step, got {data_consistency!r}")
        self.noise_schedule = noise_schedule if noise_schedule is not None else NoiseSchedule()
        self.alphas_cumprod = _alphas_cumprod(self.noise_schedule)
        # each setting read as a number in its range, or an error naming it (the command line gives strings)
        self.steps = setting_number("steps", steps, 1, integer=True)
        if self.steps > len(self.alphas_cumprod):
            raise ValueError(f"steps must be <= num_train_timesteps ({len(self.alphas_cumprod)}), got {steps}")
        self.eta = setting_number("eta", eta, 0.0, 1.0)
        self.timestep_power = float(setting_number("timestep_power", timestep_power, 1.0))
        self.batch_size = setting_number("batch_size", batch_size, 1, integer=True)
        self.seed = setting_number("seed", seed, 0, integer=True)
        self.mixed_precision = mixed_precision
        resolve_mixed_precision(mixed_precision, "cpu")  # an invalid value fails here, not mid-run
        self.progress = as_bool(progress, "progress")
        self.image_size = int(image_size) if image_size else None
        self.warm_start = float(setting_number("warm_start", warm_start, 0.0, 1.0, open_maximum=True))
        self.warm_start_method = SIRTInferer() if warm_start_method is None else warm_start_method
        if not isinstance(self.warm_start_method, ReconstructionMethod) or self.warm_start_method.slab_size is not None:
            raise ValueError(f"warm_start_method must be a classical method (fbp, sirt, tv), got {warm_start_method!r}")
        self.method = str(method)
        self.slab_size = self.schedule.slab_size
        if not callable(blend):
            raise TypeError(f"blend must be a callable blend(denoiser, x_t, t, partition, batch_size), got {blend!r}")
        self.blend = blend
        self.support, self.support_threshold = support_setting(support, support_threshold)

    @property
    def start_step(self) -> int:
        """Index of the first DDIM step run (0 without a warm start; never the last step's index + 1)."""
        return min(round(self.warm_start * self.steps), self.steps - 1)

    @property
    def nfe(self) -> int:
        """Network evaluations per slab of one reconstruction: the DDIM steps run."""
        return self.steps - self.start_step

    def working_shape(self, operator: Any, network: Any = None) -> tuple[int, int, int]:
        """The operator's domain padded in-plane to the network's ``size_divisor`` and to ``image_size``."""
        domain = tuple(int(s) for s in operator.domain_shape)
        return working_shape(domain, int(getattr(network, "size_divisor", 1)), self.image_size)

    def precision(self, device: torch.device | str) -> str:
        """``"bf16"`` where this inferer autocasts the network on ``device``, else ``"fp32"``."""
        return "bf16" if resolve_mixed_precision(self.mixed_precision, device) else "fp32"

    def start_volume(
        self,
        padded: tuple[int, int, int],
        crop: tuple[slice, slice, slice],
        operator: Any,
        measurements: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """``x_T``: standard normal noise, or the warm start diffused to the first step's noise level.

        The warm start is ``warm_start_method``'s reconstruction clipped to [0, 1] in the working
        volume (air outside the crop), mixed with noise as the forward process does:
        ``sqrt(a_t) (2 x - 1) + sqrt(1 - a_t) z``.
        """
        noise = torch.randn(padded, generator=generator, device=measurements.device)
        if self.start_step == 0:
            return noise
        image = torch.zeros(padded, device=measurements.device)
        image[crop] = self.warm_start_method(measurements, None, operator).to(image).clamp(0, 1)
        t = int(ddim_timesteps(self.steps, len(self.alphas_cumprod), self.timestep_power)[self.start_step])
        a_t = float(self.alphas_cumprod[t])
        return noise.mul_((1 - a_t) ** 0.5).add_(image.mul_(2).sub_(1), alpha=a_t**0.5)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], operator: Any, seed: int | None = None
    ) -> torch.Tensor:
        """Reconstruct ``(Z, H, W)`` in [0, 1] from ``inputs`` (``y``) through ``operator`` with the denoiser ``network``.

        ``seed`` overrides the constructor's. The network runs on :meth:`working_shape`; data
        consistency and the result are on the operator's domain (``bundle.recon.padding``).

        Raises:
            ValueError: the network's slab size is not the method's, or the sinogram does not fit the operator.
        """
        _check_inputs(inputs, network, operator, self.slab_size)
        generator = torch.Generator(device=inputs.device).manual_seed(self.seed if seed is None else int(seed))
        domain = tuple(int(s) for s in operator.domain_shape)
        padded = self.working_shape(operator, network)
        crop = centre_crop(domain, padded)
        if self.support == "hull":
            hull = visual_hull(operator, inputs, self.support_threshold)
            data_consistency = SupportConstraint(self.data_consistency, operator, inputs.float(), hull)
        else:
            data_consistency = self.data_consistency(operator, inputs.float())
        if padded != domain:
            data_consistency = CroppedDataConsistency(data_consistency, crop)
        was_training = getattr(network, "training", False)
        if hasattr(network, "eval"):
            network.eval()
        bf16 = self.precision(inputs.device) == "bf16"
        try:
            recon = sample(
                inference_weights(network, bf16),
                self.start_volume(padded, crop, operator, inputs.float(), generator),
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
                blend=self.blend,
                timestep_power=self.timestep_power,
            )
        finally:
            if was_training and hasattr(network, "train"):
                network.train()
        return recon[crop].contiguous() if padded != domain else recon

    def __repr__(self) -> str:
        shared = "" if self.blend is partitions.blend else f", blend={self.blend!r}"  # the default is left out
        return (
            f"DiffusionBlendInferer(method={self.method!r}, schedule={self.schedule!r}, "
            f"data_consistency={_describe(self.data_consistency)}, steps={self.steps}, eta={self.eta}, "
            f"timestep_power={self.timestep_power}, "
            f"support={self.support!r}, support_threshold={self.support_threshold}, "
            f"warm_start={self.warm_start}, seed={self.seed}, noise_schedule={self.noise_schedule!r}{shared})"
        )


def _check_inputs(inputs: torch.Tensor, network: Any, operator: Any, slab_size: int) -> None:
    """Refuse a network of another slab size and a sinogram that does not fit the operator."""
    net_k = getattr(network, "slab_size", None)
    if net_k is not None and int(net_k) != slab_size:
        raise ValueError(f"this method needs a prior of slab_size={slab_size}, but the network has slab_size={net_k}")
    range_shape = tuple(getattr(operator, "range_shape", inputs.shape))
    if tuple(inputs.shape) != range_shape:
        raise ValueError(f"the sinogram has shape {tuple(inputs.shape)}, but the geometry expects {range_shape}")


def _data_consistency(
    kind: str, cg_iterations: Any, cg_lambda: Any, admm_iterations: Any, tv_rho: Any, tv_lambda: Any
) -> DataConsistencyFactory:
    """The data-consistency factory of a diffusion method from the flat settings, each checked and named."""
    if kind not in DATA_CONSISTENCY_KINDS:
        raise ValueError(f"data_consistency must be one of {list(DATA_CONSISTENCY_KINDS)}, got {kind!r}")
    iterations = setting_number("cg_iterations", cg_iterations, 0, integer=True)
    if kind == "ztv":
        return functools.partial(
            ZTVDataConsistency,
            iterations=iterations,
            admm_iterations=setting_number("admm_iterations", admm_iterations, 1, integer=True),
            rho=setting_number("tv_rho", tv_rho, 0.0, open_minimum=True),
            lam=setting_number("tv_lambda", tv_lambda, 0.0),
        )
    return functools.partial(ConjugateGradientDC, iterations=iterations, lam=setting_number("cg_lambda", cg_lambda, 0.0))


def diffusion_inferer(
    method: str = "dbpp",
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
    blend: Blend = partitions.blend,
    timestep_power: float = 1.0,
    support: str = "none",
    support_threshold: float = 0.003,
) -> DiffusionBlendInferer:
    """The diffusion method ``method`` (of :data:`DIFFUSION_METHODS`) from the command line's flat settings.

    The method fixes its partition schedule (and for ``dds2d`` / ``mbir`` the slab size 1 and the
    data consistency); ``data_consistency`` chooses the step of the others (``cg``, or ``ztv``: CG with
    one z-TV ADMM pass, as in the research code's DiffusionBlend), ``cg_*`` set CG, ``admm_iterations``
    and ``tv_*`` the z-TV step. The other settings are :class:`DiffusionBlendInferer`'s (``blend``: how the slabs'
    predictions are computed, not a setting of the result).
    """
    fixed = DIFFUSION_METHODS[method]
    schedule = make_schedule(fixed["schedule"], int(fixed.get("slab_size", slab_size)), int(separation))
    kind = fixed.get("data_consistency", data_consistency)
    step = _data_consistency(kind, cg_iterations, cg_lambda, admm_iterations, tv_rho, tv_lambda)
    if warm_start_method not in CLASSICAL_METHODS:
        raise ValueError(f"warm_start_method must be one of {list(CLASSICAL_METHODS)}, got {warm_start_method!r}")
    return DiffusionBlendInferer(
        schedule, step, noise_schedule, steps, eta, batch_size, seed, mixed_precision, progress,
        image_size, warm_start, CLASSICAL_METHODS[warm_start_method](), method=method, blend=blend,
        timestep_power=timestep_power, support=support, support_threshold=support_threshold,
    )


def _builder(method: str) -> Callable[..., ReconstructionMethod]:
    """What builds ``method`` from settings: its classical inferer class, or :func:`diffusion_inferer` bound to it."""
    if method not in METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; choose one of {list(METHODS)}")
    if method in CLASSICAL_METHODS:
        return CLASSICAL_METHODS[method]
    return functools.partial(diffusion_inferer, method)


def _accepted(build: Callable[..., Any], settings: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(build).parameters
    return {k: v for k, v in settings.items() if k in params}


def method_slab_size(method: str, slab_size: int = 3) -> int | None:
    """The prior's slab size a method needs: ``slab_size`` for blending methods, 1 for 2D ones, None for classical."""
    _builder(method)  # an unknown method is an error
    if method in CLASSICAL_METHODS:
        return None
    return int(DIFFUSION_METHODS[method].get("slab_size", slab_size))


def accepted_settings() -> frozenset[str]:
    """The setting names that some method takes."""
    return frozenset(name for method in METHODS for name in inspect.signature(_builder(method)).parameters)


def check_settings(settings: dict[str, Any]) -> None:
    """Refuse a setting that no method takes (a typo such as ``cg_lamda`` would otherwise do nothing).

    Raises:
        ValueError: naming the setting and the closest accepted name.
    """
    accepted = accepted_settings()
    for name in settings:
        if name not in accepted:
            close = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are {sorted(accepted)}"
            raise ValueError(f"unknown reconstruction setting {name!r}: no method takes it ({hint})")


def method_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What determines ``method``'s result: the part of ``settings`` it takes, and what the method fixes itself.

    Raises:
        ValueError: an unknown method, or a setting that no method takes (:func:`check_settings`).
    """
    check_settings(settings)
    return {**_accepted(_builder(method), settings), **DIFFUSION_METHODS.get(method, {})}


def make_inferer(method: str = "dbpp", **settings: Any) -> ReconstructionMethod:
    """The inferer of ``method`` (one of :data:`METHODS`), configured by the command line's flat ``settings``.

    A setting that another method takes but this one does not is ignored, so one set of
    settings (steps, seed, ...) can drive every method; the method fixes its own schedule and
    slab size. A setting that no method takes is an error.

    Raises:
        ValueError: an unknown method, or a setting that no method takes.
    """
    build = _builder(method)
    check_settings(settings)
    return build(**_accepted(build, settings))
