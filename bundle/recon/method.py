"""The one call convention of every reconstruction method, diffusion or classical.

``method(measurements, network, operator, seed=None) -> (Z, H, W)``: the measurements ``y`` of
the operator's range shape, the denoiser (``None`` for a method without a prior), the projector
``A`` and the seed of the method's randomness (ignored by deterministic methods). What a workflow
needs to know of a method is an attribute or method of it, the same for every method.
"""

from __future__ import annotations

import abc

import torch
from monai.inferers import Inferer

__all__ = ["ReconstructionMethod"]


class ReconstructionMethod(Inferer):
    """A reconstruction method as a MONAI ``Inferer``.

    Attributes:
        method: the method's name (``bundle.recon.inferers.METHODS``), recorded in the metrics.
        slab_size: k of the prior the method needs; ``None``: it needs no network.
        batch_size: slabs per network call (1 without a network).
    """

    method: str = ""
    slab_size: int | None = None
    batch_size: int = 1

    @property
    def nfe(self) -> int:
        """Network evaluations per slab of one reconstruction (0 without a network)."""
        return 0

    def working_shape(self, operator: object, network: object = None) -> tuple[int, ...]:
        """The shape of the volume the method works on: the operator's domain unless the method pads it."""
        return tuple(int(s) for s in operator.domain_shape)  # type: ignore[attr-defined]

    def precision(self, device: torch.device | str) -> str:
        """The floating-point precision of the network on ``device``: ``"fp32"`` or ``"bf16"``."""
        return "fp32"

    @abc.abstractmethod
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: object, operator: object, seed: int | None = None
    ) -> torch.Tensor:
        """Reconstruct ``(Z, H, W)`` from ``inputs`` measured through ``operator``."""
