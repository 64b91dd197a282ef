"""The processes of a ``torchrun`` launch as one value object: rank, world size, gathering, CPU threads.

``Ranks.current()`` reads ``torch.distributed`` when a process group is initialised (a config's
``initialize`` does it, e.g. ``configs/multi_gpu_evaluate.json``) and is the one process
``Ranks(0, 1)`` otherwise, so a workflow written against it runs the same with and without
``torchrun``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

__all__ = ["Ranks", "cpu_threads_per_rank"]


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one launch.

    Args:
        rank: this process's index, ``0 <= rank < world``.
        world: the number of processes.
    """

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}")

    @classmethod
    def current(cls) -> Ranks:
        """The initialised process group's rank and size; ``Ranks(0, 1)`` without one."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes what all ranks share."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a list shared out round-robin is this rank's (``index % world == rank``)."""
        return index % self.world == self.rank

    def gather(self, item: Any) -> list[Any]:
        """Every rank's ``item`` (picklable), in rank order, on every rank; a barrier. ``[item]`` for one process."""
        if self.world == 1:
            return [item]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, item)
        return gathered


def cpu_threads_per_rank(environ: dict[str, str] | None = None) -> int:
    """This machine's CPU cores shared evenly by the ranks on it (``LOCAL_WORLD_SIZE``, set by ``torchrun``), at least 1."""
    environ = os.environ if environ is None else environ
    local_world = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local_world)
