"""N reconstructions with consecutive seeds: the posterior mean, the per-voxel standard deviation and the counts.

A pure function of a method, the measurements, the network and the operator: no timing, no
memory measurement, no I/O (a workflow measures the call, ``bundle.workflows.profiling``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from bundle.recon.method import ReconstructionMethod

__all__ = ["Posterior", "draw_samples"]


@dataclasses.dataclass(frozen=True)
class Posterior:
    """The result of :func:`draw_samples`.

    Attributes:
        mean: the mean of the samples ``(Z, H, W)`` (the reconstruction itself for one sample).
        std: the per-voxel (population) standard deviation, ``None`` for one sample.
        samples: how many reconstructions were drawn.
        nfe: network evaluations per slab over all samples.
    """

    mean: torch.Tensor
    std: torch.Tensor | None
    samples: int
    nfe: int


def draw_samples(
    method: ReconstructionMethod,
    measurements: torch.Tensor,
    network: object,
    operator: object,
    seeds: Sequence[int],
) -> Posterior:
    """Reconstruct once per seed and summarise: the mean, the std over samples (more than one), the counts.

    The samples are kept on the CPU in float32 while they are drawn.

    Args:
        method: the reconstruction method (``bundle.recon.inferers.make_inferer``).
        measurements: ``y`` on the operator's device.
        network: the denoiser (``None`` for a method without a prior).
        operator: the projector ``A``.
        seeds: one seed per sample (``seed, seed + 1, ...``).

    Raises:
        ValueError: no seeds.
    """
    if len(seeds) < 1:
        raise ValueError("draw_samples needs at least one seed")
    stack = torch.stack([method(measurements, network, operator, seed=int(s)).float().cpu() for s in seeds])
    std = stack.std(0, unbiased=False) if len(seeds) > 1 else None
    return Posterior(stack.mean(0), std, len(seeds), len(seeds) * method.nfe)
