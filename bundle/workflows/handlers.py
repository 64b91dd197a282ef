"""Ignite handlers of the training workflow: sparse-view reconstruction as the validation of the prior."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from bundle.physics.geometry import limited_angle, sparse_view
from bundle.metrics import reconstruction_metrics
from bundle.physics.operators import make_operator
from bundle.recon.inferers import DiffusionBlendInferer
from bundle.workflows.training import save_state_dict
from bundle.transforms.layout import to_zhw

__all__ = ["SparseViewValidation"]

logger = logging.getLogger(__name__)


class SparseViewValidation:
    """Every ``interval`` epochs, reconstruct validation volumes from simulated projections with the current prior.

    For each validation volume it simulates a noiseless sparse-view (or limited-angle) sinogram
    with the ASTRA projector, reconstructs it with score blending at a small number of steps
    using ``network`` (typically the EMA weights), and stores the mean PSNR / SSIM (on the
    [0, 1] scale) in ``engine.state.metrics`` under ``metric_name`` and ``"val_ssim"``. When
    ``best_path`` is given, the weights with the best PSNR so far are written there (a plain
    state dict, atomically). The best PSNR is the handler's state (``state_dict`` /
    ``load_state_dict``): checkpointed with the training, a resumed run replaces ``best_path``
    only with a better model than any before the interruption.

    Args:
        network: the denoiser to validate.
        volumes: preprocessed items; ``item[key]`` is a ``(1, X, Y, Z)`` volume in [0, 1].
        inferer: the reconstruction method (a ``DiffusionBlendInferer`` with few steps).
        spacing: the volumes' voxel size (x, y, z) in mm.
        views: projections over 180 degrees (ignored when ``arc_degrees`` is given).
        arc_degrees: a limited-angle arc at 1 degree steps instead of sparse views.
        interval: epochs between validations (0: never).
        metric_name: where the PSNR goes in ``engine.state.metrics``.
        key: the image key of ``volumes``.
        backend: projector backend (``bundle.physics.operators.make_operator``).
        best_path: where the best weights go (``None``: not kept).
    """

    def __init__(
        self,
        network: nn.Module,
        volumes: Sequence[dict],
        inferer: DiffusionBlendInferer,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        views: int = 8,
        arc_degrees: float | None = None,
        interval: int = 1,
        metric_name: str = "val_psnr",
        key: str = "image",
        backend: str = "auto",
        best_path: str | Path | None = None,
    ) -> None:
        self.network = network
        self.volumes = volumes
        self.inferer = inferer
        self.voxel_size = tuple(float(s) for s in spacing)[::-1]
        self.views = int(views)
        self.arc_degrees = arc_degrees
        self.interval = int(interval)
        self.metric_name = metric_name
        self.key = key
        self.backend = backend
        self.best_path = Path(best_path) if best_path else None
        self.best = float("-inf")

    def state_dict(self) -> dict[str, float]:
        """The state to checkpoint: the best PSNR so far (``-inf`` before the first validation)."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore the best PSNR from a checkpoint written by ``state_dict``."""
        self.best = float(state["best"])

    def attach(self, engine: Engine) -> None:
        if self.interval > 0 and len(self.volumes) == 0:
            logger.warning("sparse-view validation is off: the datalist has no validation volumes")
        elif self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _geometry(self, shape: Sequence[int]):
        if self.arc_degrees is not None:
            return limited_angle(self.arc_degrees, 1.0, shape, self.voxel_size)
        return sparse_view(self.views, shape, self.voxel_size)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if len(self.volumes) == 0:
            return
        device = next(self.network.parameters()).device
        scores = []
        for item in self.volumes:
            x = to_zhw(torch.as_tensor(item[self.key])).to(device=device, dtype=torch.float32)
            operator = make_operator(self._geometry(x.shape), backend=self.backend, device=device)
            recon = self.inferer(operator(x), self.network, operator)
            scores.append(reconstruction_metrics(recon, x))
        psnr = sum(s["psnr_3d"] for s in scores) / len(scores)
        ssim = sum(s["ssim_3d"] for s in scores) / len(scores)
        engine.state.metrics[self.metric_name] = psnr
        engine.state.metrics["val_ssim"] = ssim
        logger.info(
            f"epoch {engine.state.epoch}: sparse-view validation ({self.views} views, {self.inferer.steps} steps) "
            f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f} over {len(scores)} volume(s)"
        )
        if psnr > self.best:
            self.best = psnr
            if self.best_path is not None:
                save_state_dict(self.network, self.best_path)
