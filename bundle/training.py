"""Pieces of the MONAI training workflow of the slab prior that MONAI does not provide as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import DiffusionInferer
from torch import nn

from bundle.precision import autocast, resolve_mixed_precision

__all__ = [
    "SaveWeights",
    "SlabDiffusionInferer",
    "StopAfterIterations",
    "attach_handlers",
    "latest_checkpoint",
    "save_state_dict",
]


def latest_checkpoint(folder: str | Path) -> str | None:
    """The most recently written ``*.pt`` checkpoint in ``folder``, or ``None`` when there is none.

    Training resumes from it, whether the last run completed (``checkpoint_latest.pt``) or
    was killed after one of its periodic saves. Half-written files never match: ignite writes
    checkpoints to a temporary name and renames them.
    """
    files = sorted(Path(folder).glob("*.pt"), key=lambda f: f.stat().st_mtime) if Path(folder).is_dir() else []
    return str(files[-1]) if files else None


def attach_handlers(engine: Engine, handlers: list) -> Engine:
    """Attach ``handlers`` to ``engine`` in order (``None`` entries, e.g. disabled ones, are skipped).

    A handler with an ``attach`` method attaches itself (MONAI handlers, ignite's
    ``EMAHandler``); a plain callable such as ignite's ``TerminateOnNan`` runs after every
    iteration.

    The trainer is built first and its handlers attached afterwards, because the checkpoint
    handlers save and restore the trainer itself (which would otherwise be a circular reference).
    """
    for handler in handlers:
        if handler is None:
            continue
        if hasattr(handler, "attach"):
            handler.attach(engine)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, handler)
    return engine


class SlabDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` for the slab denoiser: the condition is the separation label.

    ``DiffusionPrepareBatch(condition_name="separation")`` hands the label over as
    ``condition``; MONAI's inferer would pass it as cross-attention context, ours passes it to
    the denoiser contract ``denoiser(x_t, t, separation)``.

    Args:
        scheduler: the noise schedule of the forward process.
        mixed_precision: bf16 autocast of the network's forward pass (``"auto"``, true or false,
            ``bundle.precision``); the prediction is returned in fp32, so the loss and the
            gradients' accumulation stay fp32 (bf16 needs no gradient scaler).
    """

    def __init__(self, scheduler: Any, mixed_precision: bool | str = "auto") -> None:
        super().__init__(scheduler)
        self.mixed_precision = mixed_precision
        resolve_mixed_precision(mixed_precision, "cpu")  # an invalid value fails at start-up

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        with autocast(inputs.device, resolve_mixed_precision(self.mixed_precision, inputs.device)):
            prediction = diffusion_model(noisy, timesteps, condition)
        return prediction.float()


class StopAfterIterations:
    """Stop the engine once ``iterations`` iterations are done (0: never), as an interruption would.

    The run ends through ignite's ``terminate``, so the final checkpoint is written and a later
    run resumes from it; used to split a long run into sessions and to test resumption.
    """

    def __init__(self, iterations: int = 0) -> None:
        self.iterations = int(iterations)

    def attach(self, engine: Engine) -> None:
        if self.iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iterations), lambda e: e.terminate())


class SaveWeights:
    """Write a network's weights as a plain state dict, atomically, every ``interval`` iterations and at the end.

    Used to publish ``models/model.pt`` (the EMA weights) while training runs, so that a long
    run can be stopped at any time and the latest weights are usable and resumable.

    Args:
        network: the module whose ``state_dict`` is written (e.g. the EMA model).
        path: the output file.
        interval: iterations between writes (0: only at the end).
    """

    def __init__(self, network: nn.Module, path: str | Path, interval: int = 0) -> None:
        self.network = network
        self.path = Path(path)
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration > 0 and _rank() == 0:
            save_state_dict(self.network, self.path)


def save_state_dict(network: nn.Module, path: str | Path) -> Path:
    """Write ``network``'s weights (unwrapped from DDP) as a plain state dict, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in _unwrap(network).state_dict().items()}, tmp)
    tmp.replace(path)
    return path


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
