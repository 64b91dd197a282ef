"""The training's validation the MONAI way: an evaluator that reconstructs each validation volume from its simulated sinogram.

``configs/train.json`` attaches MONAI's ``ValidationHandler`` to the trainer; it runs a
:class:`ReconstructionEvaluator` over the validation volumes, whose sinograms ``SimulateSinogramd``
simulates. Each iteration builds the volume's operator (:class:`SinogramPrepareBatch`) and
reconstructs it with the evaluator's inferer (score blending at a few steps with the EMA
weights). PSNR and SSIM are ``bundle.metrics``' own, each wrapped as a :class:`VolumeMetric`;
:class:`SaveBestWeights` writes ``model_best.pt``. The evaluator's best PSNR is its checkpointed
state, so a resumed run keeps ``model_best.pt`` until a model beats every one before the
interruption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator
from monai.engines.utils import PrepareBatch
from torch import nn

from bundle.physics.operators import make_operator
from bundle.transforms.layout import to_zhw
from bundle.workflows.training import SaveWeights

__all__ = ["ReconstructionEvaluator", "SaveBestWeights", "SinogramPrepareBatch", "VolumeMetric"]

logger = logging.getLogger(__name__)


class SinogramPrepareBatch(PrepareBatch):
    """The evaluator's ``prepare_batch`` for one item of ``SimulateSinogramd``: sinogram, ground truth and operator.

    Returns ``(sinogram, volume, (operator,), {})``, so that the evaluator calls
    ``inferer(sinogram, network, operator)`` (the inferers' call convention) and scores the
    result against ``volume``, a ``(Z, H, W)`` tensor.

    Args:
        image_key: the ground-truth volume, channel-first ``(1, X, Y, Z)``.
        sinogram_key: its sinogram.
        geometry_key: the sinogram's geometry (``bundle.physics.geometry``).
        backend: projector backend of the operator (``bundle.physics.operators.make_operator``).
    """

    def __init__(
        self, image_key: str = "image", sinogram_key: str = "sinogram", geometry_key: str = "geometry", backend: str = "auto"
    ) -> None:
        self.image_key, self.sinogram_key, self.geometry_key = image_key, sinogram_key, geometry_key
        self.backend = backend

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        image = torch.as_tensor(batchdata[self.image_key])
        if image.ndim != 4:
            raise ValueError(
                f"SinogramPrepareBatch: {self.image_key!r} has shape {tuple(image.shape)}, expected one channel-first volume "
                "(1, X, Y, Z); the validation DataLoader must not batch its items (batch_size null)"
            )
        volume = to_zhw(image).to(device=device, dtype=torch.float32, non_blocking=non_blocking)
        sinogram = torch.as_tensor(batchdata[self.sinogram_key]).to(device=device, non_blocking=non_blocking)
        operator = make_operator(batchdata[self.geometry_key], backend=self.backend, device=device)
        return sinogram, volume, (operator,), {}


class VolumeMetric(Metric):
    """One of ``bundle.metrics``' volume measures (``psnr``, ``ssim``) as an ignite metric: its mean over the volumes.

    It reads ``pred`` and ``label`` from the evaluator's output, one ``(Z, H, W)`` volume each
    per iteration. The values stay on this process (no all-reduce), so the validation may run
    on rank 0 alone in a multi-GPU training.

    Args:
        measure: ``measure(pred, target) -> float``, e.g. ``bundle.metrics.psnr``.
    """

    required_output_keys = ("pred", "label")

    def __init__(self, measure: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
        self.measure = measure
        super().__init__()

    def reset(self) -> None:
        self._values: list[float] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        pred, target = output
        self._values.append(float(self.measure(pred, target)))

    def compute(self) -> float:
        if not self._values:
            raise RuntimeError("VolumeMetric: no volume was scored")
        return sum(self._values) / len(self._values)


class ReconstructionEvaluator(SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` for reconstructions, one volume an iteration, whose best key metric is checkpointed.

    Defaults: ``prepare_batch`` is :class:`SinogramPrepareBatch` and ``decollate`` is off (an
    iteration's output is one volume, not a batch). ``state_dict`` / ``load_state_dict`` carry
    MONAI's ``best_metric`` and ``best_metric_epoch``, so that ``train.json`` checkpoints them with
    the training; the rest of an evaluator's state is set afresh by every run. A checkpoint of
    the earlier ``SparseViewValidation`` handler (``{"best": psnr}``) loads too. Arguments are
    MONAI's.
    """

    def __init__(self, *args: Any, prepare_batch: Callable | None = None, decollate: bool = False, **kwargs: Any) -> None:
        prepare_batch = SinogramPrepareBatch() if prepare_batch is None else prepare_batch
        super().__init__(*args, prepare_batch=prepare_batch, decollate=decollate, **kwargs)
        if self.state.epoch_length == 0:
            logger.warning("validation is off: the datalist has no validation volumes")

    def state_dict(self) -> dict[str, float | int]:
        """The best key metric so far and its (training) epoch; ``-1``, ``-1`` before the first validation."""
        return {"best_metric": float(self.state.best_metric), "best_metric_epoch": int(self.state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the best key metric from a checkpoint written by ``state_dict`` (or by ``SparseViewValidation``)."""
        if "best" in state_dict and "best_metric" not in state_dict:  # {"best": psnr}, -inf before any validation
            best = float(state_dict["best"])
            state_dict = {"best_metric": best, "best_metric_epoch": 0} if best > float("-inf") else self.state_dict()
        self.state.best_metric = float(state_dict["best_metric"])
        self.state.best_metric_epoch = int(state_dict["best_metric_epoch"])


class SaveBestWeights(SaveWeights):
    """Write the network's weights (as ``SaveWeights`` does: a plain state dict, atomically) when the key metric improves.

    Attached to an evaluator: after a validation whose key metric beat MONAI's
    ``state.best_metric`` (the evaluator updates it first), the weights are written. The best
    metric is the evaluator's checkpointed state (:class:`ReconstructionEvaluator`), so a resumed
    run writes only a model better than every one before. MONAI's
    ``CheckpointSaver(save_key_metric=True)`` tracks the best in a list of its own that starts
    empty in a resumed run, unless that list is stored inside the weights file.

    Args:
        network: the module whose weights are written (e.g. the EMA model).
        path: the output file (``model_best.pt``).
    """

    def __init__(self, network: nn.Module, path: str | Path) -> None:
        super().__init__(network, path, interval=0)
        self._best_before: tuple[float, int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._remember_best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save_if_better)

    def _remember_best(self, engine: Engine) -> None:
        self._best_before = (engine.state.best_metric, engine.state.best_metric_epoch)

    def _save_if_better(self, engine: Engine) -> None:
        if (engine.state.best_metric, engine.state.best_metric_epoch) != self._best_before:
            self(engine)
