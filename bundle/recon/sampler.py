"""The DiffusionBlend(++) sampler: DDIM with score blending and data consistency (DDS-style)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bundle.precision import autocast as bf16_autocast
from bundle.recon import partitions
from bundle.recon.partitions import Blend, Denoiser, PartitionSchedule

__all__ = ["ddim_timesteps", "sample"]

DataConsistency = Callable[[torch.Tensor], torch.Tensor]


def ddim_timesteps(num_steps: int, num_train_timesteps: int, power: float = 1.0) -> torch.Tensor:
    """``num_steps`` integer times from ``T-1`` down to 0 (long tensor, strictly decreasing).

    ``t_i = (T-1) (1 - i/(N-1))^power``, ``power >= 1``: 1 spreads them evenly (the paper's
    sampler); above 1 they crowd towards t = 0, where the last steps still sharpen the image (2 is a
    quadratic sequence like DDIM's, Song et al., ICLR 2021). Where rounding would repeat a time,
    the later-in-sampling ones step up by one, so the times stay distinct and within [0, T-1].
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if not power >= 1:  # below 1 the times would crowd at T-1, where distinct ones may not fit
        raise ValueError(f"timestep_power must be >= 1, got {power}")
    if num_steps == 1:
        return torch.tensor([num_train_timesteps - 1])
    grid = torch.linspace(num_train_timesteps - 1, 0, num_steps)
    if power != 1:
        grid = (num_train_timesteps - 1) * (grid.double() / (num_train_timesteps - 1)) ** power
    times = grid.round().long()
    # distinct times: t_i = max over j >= i of (t_j + j - i), a suffix maximum of t - rank
    rank = torch.arange(num_steps - 1, -1, -1)
    return (times - rank).flip(0).cummax(0).values.flip(0) + rank


# One function on purpose, longer than the package's ~50 lines: its numbered steps are the algorithm.
@torch.no_grad()
def sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    schedule: PartitionSchedule,
    data_consistency: DataConsistency | None,
    alphas_cumprod: torch.Tensor,
    num_steps: int = 200,
    eta: float = 0.85,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
    mixed_precision: bool = False,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    blend: Blend = partitions.blend,
    timestep_power: float = 1.0,
) -> torch.Tensor:
    """Reconstruct a volume with DiffusionBlend(++) (Song et al., NeurIPS 2024, Algorithm 1, DDS-style).

    The model works on ``2 * image - 1`` in [-1, 1]; data consistency works on the image in
    [0, 1], where ``y = A x`` holds. Each DDIM step ``t -> t_prev``:

    1. blended eps over the partition of this step,
    2. Tweedie estimate x0 clipped to [-1, 1],
    3. data consistency on the [0, 1] image,
    4. DDIM re-noise with ``eta``: ``x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) (eta z + sqrt(1-eta^2) eps)``.

    Args:
        denoiser: ``denoiser(x_t (B,k,H,W), t (B,), separation (B,)) -> eps``.
        x_T: the start ``(Z, H, W)``, usually standard normal noise.
        schedule: yields the partition of each step.
        data_consistency: maps the [0, 1] image estimate to a measurement-consistent one;
            ``None`` skips it (unconditional sampling).
        alphas_cumprod: the training schedule's cumulative alphas ``(T,)`` (the ``alphas_cumprod`` of
            the noise scheduler, ``configs/inference.json`` ``noise_schedule``).
        num_steps: DDIM steps (network evaluations per slab).
        eta: stochasticity of the re-noising (0 = deterministic DDIM).
        batch_size: slabs per denoiser call.
        generator: source of the noise and of the random partition offsets.
        mixed_precision: run the denoiser under bf16 autocast (``bundle.precision``); everything
            else, including the returned eps, stays fp32.
        progress: show a tqdm progress bar.
        on_step: optional observer ``on_step(step, x0)`` (e.g. for figures); it cannot change the result.
        start_step: index of the first DDIM step; ``x_T`` is then the volume at that step's
            noise level (a warm start, see ``DiffusionBlendInferer.start_volume``); 0 starts from pure noise.
        blend: score blending, ``blend(denoiser, x_t, t, partition, batch_size) -> eps``
            (``bundle.recon.partitions.blend``; or one that shares the slabs among processes).
        timestep_power: how the DDIM times are spread (:func:`ddim_timesteps`; 1 = evenly).

    Returns:
        The final estimate x0 after data consistency as the image ``(Z, H, W)``, clipped to the
        prior's range [0, 1] (attenuation is not negative).
    """
    if x_T.ndim != 3:
        raise ValueError(f"expected a start volume (Z, H, W), got shape {tuple(x_T.shape)}")
    alphas_cumprod = alphas_cumprod.to(device=x_T.device, dtype=torch.float64)
    timesteps = ddim_timesteps(num_steps, len(alphas_cumprod), timestep_power).tolist()
    if not 0 <= start_step < len(timesteps):
        raise ValueError(f"start_step must be in [0, {len(timesteps) - 1}], got {start_step}")
    steps = range(start_step, len(timesteps))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="DiffusionBlend", unit="step")

    x_t = x_T.float()
    image = (x_t.clamp(-1, 1) + 1) / 2
    for step in steps:
        t = timesteps[step]
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[timesteps[step + 1]]) if step + 1 < len(timesteps) else 1.0

        # 1. blended eps: the denoiser on every slab of this step's partition, averaged where slabs overlap
        partition = schedule(step, x_t.shape[0], generator)
        with bf16_autocast(x_T.device, mixed_precision):
            eps = blend(denoiser, x_t, t, partition, batch_size).float()

        # 2. Tweedie estimate of the clean volume, clipped to the model's range [-1, 1]
        x0 = (x_t - (1 - a_t) ** 0.5 * eps).div_(a_t**0.5).clamp_(-1, 1)

        # 3. data consistency on the [0, 1] image
        image = x0.add_(1).div_(2)  # in place: the volume-sized buffers are what memory scales with
        if data_consistency is not None:
            image = data_consistency(image)
        x0 = image.mul(2).sub_(1)
        if on_step is not None:
            on_step(step, image)

        # 4. DDIM re-noise to t_prev with eta (fresh noise z, the predicted eps for the rest)
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        noise = z.mul_(eta).add_(eps, alpha=(1 - eta**2) ** 0.5)
        del eps
        x_t = x0.mul_(a_prev**0.5).add_(noise, alpha=(1 - a_prev) ** 0.5)
    return image.clamp(0, 1)
