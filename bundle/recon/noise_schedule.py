"""The noise schedule of the prior: the DDPM forward process it was trained with, as a value object.

The bundle defines it once, in ``configs/inference.json`` ``noise_schedule``; training
(``configs/train.json``, ``%`` of that entry), the training validation and inference all use
that one object. The betas are MONAI's (``monai.networks.schedulers.DDPMScheduler``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler
from monai.networks.schedulers.scheduler import NoiseSchedules

__all__ = ["NoiseSchedule"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM noise schedule (Ho et al., NeurIPS 2020) with epsilon prediction: T steps and a beta schedule.

    The defaults are MONAI's ``DDPMScheduler`` defaults, which are the shipped priors' schedule.

    Args:
        num_train_timesteps: T, the number of forward-process steps.
        schedule: MONAI's name of the beta schedule (``"linear_beta"``, ``"scaled_linear_beta"``,
            ``"sigmoid_beta"``, ``"cosine"``).
        beta_start: the first beta (beta schedules only).
        beta_end: the last beta (beta schedules only).
    """

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if int(self.num_train_timesteps) < 1:
            raise ValueError(f"noise_schedule: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.schedule not in NoiseSchedules.names:
            raise ValueError(f"noise_schedule: schedule must be one of {list(NoiseSchedules.names)}, got {self.schedule!r}")

    def scheduler(self) -> DDPMScheduler:
        """MONAI's scheduler of this schedule (training adds noise with it)."""
        if self.schedule == "cosine":
            return DDPMScheduler(num_train_timesteps=int(self.num_train_timesteps), schedule=self.schedule)
        return DDPMScheduler(
            num_train_timesteps=int(self.num_train_timesteps),
            schedule=self.schedule,
            beta_start=float(self.beta_start),
            beta_end=float(self.beta_end),
        )

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The cumulative products of ``1 - beta``, ``(T,)`` float32 (what the sampler reads)."""
        return self.scheduler().alphas_cumprod
