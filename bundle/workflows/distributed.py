"""Reconstruction under ``torchrun``: the slabs of one volume, or the inputs of a run, shared among processes.

``configs/multi_gpu_inference.json`` starts the process group (gloo on CPU, nccl on CUDA, one
device per process) and shares the work by its ``parallel`` setting:

- ``slabs``: every process reconstructs every input. At each DDIM step, each process runs its
  share of the partition's batches of slabs and an all-reduce assembles the blended eps on every
  process (:class:`ShardedBlend`). The rest of the step (Tweedie estimate, data consistency,
  re-noising) runs on every process on identical inputs with the same seed, so the processes stay
  in lockstep and each holds the one-process result (up to the order in which overlapping slabs'
  predictions are added).
- ``inputs``: process ``r`` of ``n`` reconstructs the inputs ``i % n == r`` on its own, whole
  (:func:`bundle.workflows.sources.share_inputs`).
- ``auto`` (the default): ``slabs`` for one input, ``inputs`` for several.

Process 0 writes the outputs and ``metrics.json`` (every input's results, in input order). With
the inputs shared, the other processes move their files into process 0's staging folder, so the
run's files are still published as one set; ``output_dir`` must be a folder every process sees.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bundle.recon.partitions import Denoiser, Partition, blend
from bundle.workflows.ranks import Ranks
from bundle.workflows.sources import merge_shares, share_inputs

__all__ = ["PARALLEL", "DistributedRun", "ShardedBlend"]

#: The ways a run shares its work among processes.
PARALLEL = ("auto", "slabs", "inputs")


class ShardedBlend:
    """:func:`bundle.recon.partitions.blend` with each step's batches of slabs shared among the processes.

    Process ``r`` of ``n`` runs the batches ``i % n == r`` (the same batches as one process, so every
    network call sees the inputs it would see in one process); an all-reduce (sum) of the
    predictions before the average gives every process the whole blend. Without a process group,
    or with ``enabled`` false, it is the local blend.

    Attributes:
        enabled: share the slabs (:class:`DistributedRun` turns it off when it shares the inputs).
        calls, reduced_bytes, reduce_seconds: the all-reduces of this process so far: how many, the
            bytes of the tensors reduced, and the seconds spent in them (waiting for the slowest
            process included).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.calls = 0
        self.reduced_bytes = 0
        self.reduce_seconds = 0.0

    def __call__(
        self, denoiser: Denoiser, x_t: torch.Tensor, t: int | torch.Tensor, partition: Partition, batch_size: int = 8
    ) -> torch.Tensor:
        if not self.enabled or not dist.is_initialized():
            return blend(denoiser, x_t, t, partition, batch_size)
        ranks = Ranks.current()
        return blend(denoiser, x_t, t, partition, batch_size, shard=(ranks.rank, ranks.world), reduce=self._all_reduce)

    def _all_reduce(self, total: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if total.is_cuda:
            torch.cuda.synchronize(total.device)
        self.calls += 1
        self.reduced_bytes += total.numel() * total.element_size()
        self.reduce_seconds += time.perf_counter() - start
        return total

    def __repr__(self) -> str:
        return f"ShardedBlend(processes={Ranks.current().world if self.enabled else 1})"


class DistributedRun:
    """How the processes of a reconstruction run share its inputs and which one writes (one process: all, itself).

    :class:`bundle.workflows.inference.Reconstruction` asks it for its share of the inputs
    (:meth:`share`), then for every input's results (:meth:`merge`), and writes the outputs if
    :attr:`writes`.

    Args:
        parallel: ``"slabs"``, ``"inputs"`` or ``"auto"`` (slabs for one input, inputs for several); see the module.
        blend: the inferer's :class:`ShardedBlend`, turned off when the inputs are shared.
    """

    def __init__(self, parallel: str = "auto", blend: ShardedBlend | None = None) -> None:
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL} (configs/multi_gpu_inference.json), got {parallel!r}")
        self.parallel, self.blend = parallel, blend
        self.mode = "slabs"

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs and ``metrics.json`` (process 0)."""
        return Ranks.current().is_main

    def share(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The inputs this process reconstructs: all of them when the slabs are shared, else its share."""
        ranks = Ranks.current()
        rank, world = ranks.rank, ranks.world
        self.mode = self.parallel if self.parallel != "auto" else ("inputs" if len(items) > 1 else "slabs")
        if self.blend is not None:
            self.blend.enabled = self.mode == "slabs"
        return list(items) if self.mode == "slabs" else share_inputs(items, rank, world)

    def merge(self, results: list[dict[str, Any]], stage: Path) -> list[dict[str, Any]]:
        """Every input's results in input order, on every process.

        With the inputs shared, the other processes move the files they staged into process 0's
        ``stage`` before this returns (a collective call: every process calls it).
        """
        ranks = Ranks.current()
        rank, world = ranks.rank, ranks.world
        if world == 1:
            return results
        if self.mode == "inputs":
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (str(stage), results))
            if rank != 0:
                for path in sorted(Path(stage).iterdir()):
                    os.replace(path, Path(gathered[0][0]) / path.name)
            dist.barrier()  # process 0's stage now holds every file
            results = merge_shares([share for _, share in gathered])
        return [{**r, "parallel": self.mode, "processes": world} for r in results]
