"""Pieces of the MONAI training workflow of the slab prior that MONAI does not provide as is."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.inferers import DiffusionInferer
from torch import nn

from bundle.precision import autocast, resolve_mixed_precision
from bundle.settings import setting_number

__all__ = [
    "ResumeCheckpointLoader",
    "SafeCheckpointSaver",
    "SaveWeights",
    "SlabDiffusionInferer",
    "StopAfterIterations",
    "attach_handlers",
    "latest_checkpoint",
    "save_state_dict",
]

logger = logging.getLogger(__name__)


def latest_checkpoint(folder: str | Path) -> str | None:
    """The newest ``*.pt`` training checkpoint in ``folder`` that loads, or ``None`` when there is none.

    Training resumes from it, whether the last run completed (``checkpoint_latest.pt``) or
    was killed after one of its periodic saves. MONAI writes checkpoints in place, so a run
    killed while saving leaves a truncated file: a newer file that does not load is named in a
    warning and skipped, and the run resumes from the newest intact checkpoint at its iteration.

    Raises:
        ValueError: ``folder`` holds checkpoints but none of them loads (starting afresh would
            silently throw the training away; move them aside to do that on purpose).
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.pt"), key=lambda f: f.stat().st_mtime_ns, reverse=True) if folder.is_dir() else []
    for file in files:
        problem = _checkpoint_problem(file)
        if problem is None:
            return str(file)
        logger.warning(f"skipping the training checkpoint {file}: {problem}")
    if files:
        raise ValueError(f"ckpt_dir {folder}: none of its {len(files)} checkpoint(s) loads (see the warnings above)")
    return None


def _checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable training checkpoint, or ``None`` when it is one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, a pickle with objects
        return f"it does not load ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("trainer"), Mapping):
        return "it is not a training checkpoint (no trainer state)"
    return None


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
        min_snr_gamma: min-SNR-gamma loss weighting (Hang et al., ICCV 2023): each sample's
            squared error is weighted by ``min(SNR_t, gamma) / SNR_t`` with
            ``SNR_t = abar_t / (1 - abar_t)``, which lowers the weight of the nearly clean
            timesteps; ``0`` (default) is the plain eps MSE. The trainer's loss is MONAI's
            ``MSELoss(prediction, noise)``, so the weight is applied to the residual: the
            returned prediction is ``noise + sqrt(w_t) (eps_theta - noise)``, whose MSE against
            the noise is the weighted loss exactly (the engine's ``pred`` output is that
            weighted prediction, not the network's eps, when weighting is on).
    """

    def __init__(self, scheduler: Any, mixed_precision: bool | str = "auto", min_snr_gamma: float = 0.0) -> None:
        super().__init__(scheduler)
        self.mixed_precision = mixed_precision
        resolve_mixed_precision(mixed_precision, "cpu")  # an invalid value fails at start-up
        self.min_snr_gamma = float(setting_number("min_snr_gamma", min_snr_gamma, 0.0))  # 0: no weighting

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The per-sample min-SNR-gamma weights ``min(SNR_t, gamma) / SNR_t`` (ones when weighting is off)."""
        if self.min_snr_gamma == 0.0:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        abar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = abar / (1.0 - abar)
        return torch.clamp(snr, max=self.min_snr_gamma) / snr

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
        prediction = prediction.float()
        if self.min_snr_gamma == 0.0:
            return prediction
        scale = self.loss_weights(timesteps).sqrt().view(-1, *([1] * (prediction.ndim - 1)))
        return noise + scale * (prediction - noise)


class StopAfterIterations:
    """Stop the engine once ``iterations`` iterations are done, or ``seconds`` after it started (0: never).

    The run ends through ignite's ``terminate``, as an interruption would, so the final
    checkpoint and weights are written and a later run resumes from them; used to split a long
    run into sessions, to fit a leg into a time slot (a lent GPU's minutes) and to test resumption.
    """

    def __init__(self, iterations: int = 0, seconds: float = 0.0) -> None:
        self.iterations = int(iterations)
        self.seconds = float(setting_number("stop_after_seconds", seconds, 0.0))
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        if self.iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iterations), lambda e: e.terminate())
        if self.seconds > 0:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._check_time)

    def _started(self, engine: Engine) -> None:
        self._start = time.monotonic()

    def _check_time(self, engine: Engine) -> None:
        if time.monotonic() - self._start >= self.seconds:
            logger.info(f"stop_after_seconds {self.seconds:g}: stopping at iteration {engine.state.iteration}")
            engine.terminate()


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for resuming a run: tolerant of entries added later, clear about a mismatch.

    An entry of ``optional`` that the checkpoint lacks (it was written before the entry was
    checkpointed, e.g. the validation's best PSNR) keeps its initial state, with a warning;
    every other entry must be there and match, as in MONAI's loader. A checkpoint that does not
    fit the run (another network, changed settings) fails with an error naming the file.

    Args:
        load_path: the checkpoint to resume from.
        load_dict: the objects to restore, by checkpoint key (``train.json``'s ``checkpoint_dict``).
        optional: keys of ``load_dict`` that older checkpoints may lack.
        map_location: where the tensors are loaded (``torch.load``).
    """

    def __init__(
        self,
        load_path: str | Path,
        load_dict: dict,
        optional: Sequence[str] = (),
        map_location: Any = None,
    ) -> None:
        super().__init__(load_path=str(load_path), load_dict=load_dict, map_location=map_location)
        self.optional = tuple(optional)

    def __call__(self, engine: Engine) -> None:
        try:
            keys = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True).keys()
        except Exception as err:
            raise ValueError(f"resume_from {self.load_path}: not a readable checkpoint ({err})") from err
        absent = [key for key in self.optional if key in self.load_dict and key not in keys]
        if absent:
            logger.warning(f"{self.load_path} predates the checkpointing of {', '.join(absent)}: starting those afresh")
            self.load_dict = {k: v for k, v in self.load_dict.items() if k not in absent}  # a copy: the saver shares it
        try:
            super().__call__(engine)
        except (KeyError, RuntimeError, ValueError) as err:
            reason = " ".join(str(err).split())[:400]
            raise ValueError(
                f"resume_from {self.load_path}: the checkpoint does not fit this run ({type(err).__name__}: {reason}); "
                "use the settings it was written with, or another output_dir to start afresh"
            ) from err


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` that never writes a broken state over a good checkpoint.

    MONAI's saver with ``save_final=True`` also saves when the run raises, so a run that failed
    at start-up (e.g. while loading its checkpoint) overwrote ``checkpoint_latest.pt`` with an
    untrained iteration-0 state. This one writes the final checkpoint only when the run
    completes or is terminated (``StopAfterIterations``); on an exception the checkpoints on disk
    stay as they are (at most ``save_interval`` iterations are lost). No checkpoint, final or
    periodic, is written before the first iteration or while a network's weights are not finite
    (a NaN loss, stopped by ``TerminateOnNan``). Arguments are MONAI's.
    """

    def completed(self, engine: Engine) -> None:
        if self._savable(engine, "final"):
            super().completed(engine)

    def interval_completed(self, engine: Engine) -> None:
        if self._savable(engine, "periodic"):
            super().interval_completed(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        logger.error(
            f"the run failed at iteration {engine.state.iteration}; the checkpoints in {self.save_dir} are kept as they were"
        )
        raise e

    def _savable(self, engine: Engine, kind: str) -> bool:
        if engine.state.iteration == 0:
            return False
        broken = [key for key, obj in self.save_dict.items() if isinstance(obj, nn.Module) and not _finite(obj)]
        if broken:
            logger.warning(
                f"not writing the {kind} checkpoint at iteration {engine.state.iteration}: the weights of "
                f"{', '.join(broken)} are not finite; the checkpoints in {self.save_dir} are kept as they were"
            )
        return not broken


class SaveWeights:
    """Write a network's weights as a plain state dict, atomically, every ``interval`` iterations and at the end.

    Writes ``@output_dir/model.pt`` (the EMA weights) while training runs, so that a long run can
    be stopped at any time and the latest weights are usable; non-finite weights are never
    written. Publishing them to ``models/`` is a separate step (``scripts/publish_weights.py``).

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
        if engine.state.iteration == 0 or _rank() != 0:
            return
        if not _finite(self.network):
            logger.warning(f"not writing {self.path} at iteration {engine.state.iteration}: the weights are not finite")
            return
        save_state_dict(self.network, self.path)


def save_state_dict(network: nn.Module, path: str | Path) -> Path:
    """Write ``network``'s weights (unwrapped from DDP) as a plain state dict, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in _unwrap(network).state_dict().items()}, tmp)
    tmp.replace(path)
    return path


def _finite(network: nn.Module) -> bool:
    """Whether every floating-point tensor of ``network``'s state is finite (no NaN, no Inf)."""
    return all(bool(torch.isfinite(v).all()) for v in network.state_dict().values() if v.is_floating_point())


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
