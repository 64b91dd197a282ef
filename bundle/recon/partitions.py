"""Partitions of the Z axis into slabs, schedules of partitions, and score blending.

A *slab* is ``k`` slices taken ``separation`` slices apart: ``{i, i+s, ..., i+(k-1)s}``.
A *partition* is plain data: the slabs that together cover every slice of a volume, all at
one separation. A *schedule* yields one partition per sampling step; moving the slab borders
from step to step is what blends the scores of neighbouring slabs (DiffusionBlend, Song et
al., NeurIPS 2024, Sec. 3.2). :func:`blend` runs the denoiser over a partition.

Any depth works: where the regular tiling does not fit, the last (or first) slabs overlap
their neighbours and :func:`blend` averages the overlapping predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "Partition",
    "tile",
    "PartitionSchedule",
    "FixedSchedule",
    "ShiftedSchedule",
    "InterleavedSchedule",
    "DiffusionBlendPPSchedule",
    "SliceSchedule",
    "make_schedule",
    "blend",
    "SCHEDULES",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``blend(denoiser, x_t, t, partition, batch_size) -> eps`` (:func:`blend`, or a slab-parallel one).
Blend = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Partition:
    """Slabs covering the Z axis, all at one separation.

    Attributes:
        slabs: long tensor ``(n_slabs, k)``; row ``j`` holds the slice indices of slab ``j``
            in increasing order, ``slabs[j, m] = start_j + m * separation``.
        separation: the distance between consecutive slices of a slab (1 = adjacent).
    """

    slabs: torch.Tensor
    separation: int

    @property
    def slab_size(self) -> int:
        """k, the number of slices per slab."""
        return int(self.slabs.shape[1])

    def __len__(self) -> int:
        return int(self.slabs.shape[0])

    def coverage(self, depth: int) -> torch.Tensor:
        """How many slabs contain each of the ``depth`` slices (long tensor ``(depth,)``)."""
        return torch.bincount(self.slabs.flatten(), minlength=depth)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The slabs in groups of at most ``batch_size`` rows."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        yield from torch.split(self.slabs, batch_size)


def tile(depth: int, slab_size: int, separation: int = 1, offset: int = 0) -> Partition:
    """Cover ``depth`` slices with slabs of ``slab_size`` slices at ``separation``.

    Slices are grouped into blocks of ``slab_size * separation`` consecutive slices; a block
    starting at ``b`` holds the ``separation`` interleaved slabs ``{b+r, b+r+s, ...}``,
    ``r = 0..s-1``, which cover it exactly. Blocks start at ``offset + j*k*s``; a block at 0
    and one ending at the last slice are added where the grid leaves slices uncovered, so
    those blocks overlap their neighbours. With ``separation=1`` this is the adjacent tiling.

    If the volume is too shallow for the separation (``depth < k*s``), the separation is
    reduced to ``depth // k`` (the largest that still fits), so a shallow volume degrades to
    adjacent slabs instead of failing.

    Args:
        depth: Z, the number of slices.
        slab_size: k, slices per slab.
        separation: s, the distance between slices of a slab.
        offset: where the regular block grid starts; taken modulo ``k*s``.

    Raises:
        ValueError: ``depth < slab_size`` (no slab fits) or non-positive sizes.
    """
    if slab_size < 1 or separation < 1:
        raise ValueError(f"slab_size and separation must be >= 1, got {slab_size} and {separation}")
    if depth < slab_size:
        raise ValueError(f"a volume of {depth} slices is too shallow for slabs of {slab_size} slices")
    separation = min(separation, depth // slab_size)
    block = slab_size * separation
    offset = offset % block
    starts = set(range(offset, depth - block + 1, block)) | {0, depth - block}
    steps = torch.arange(slab_size) * separation
    slabs = [b + r + steps for b in sorted(starts) for r in range(separation)]
    return Partition(slabs=torch.stack(slabs).long(), separation=separation)


class PartitionSchedule:
    """A schedule of partitions: ``schedule(step, depth, generator) -> Partition``.

    Args:
        slab_size: k, slices per slab (the denoiser's ``slab_size``).
    """

    def __init__(self, slab_size: int) -> None:
        if slab_size < 1:
            raise ValueError(f"slab_size must be >= 1, got {slab_size}")
        self.slab_size = int(slab_size)

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        raise NotImplementedError

    def _random_offset(self, period: int, generator: torch.Generator | None) -> int:
        if period <= 1:
            return 0
        device = generator.device if generator is not None else None
        return int(torch.randint(period, (1,), generator=generator, device=device).item())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class FixedSchedule(PartitionSchedule):
    """The same adjacent partition at every step (DiffusionBlend without blending; the ablation)."""

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        return tile(depth, self.slab_size, 1, 0)


class ShiftedSchedule(PartitionSchedule):
    """Adjacent slabs (separation 1) with a random offset at every step, so slab borders move."""

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        return tile(depth, self.slab_size, 1, self._random_offset(self.slab_size, generator))


class InterleavedSchedule(PartitionSchedule):
    """Jump slabs ``{i, i+s, ..., i+(k-1)s}`` with ``s = separation > 1`` covering every slice.

    Args:
        slab_size: k, slices per slab.
        separation: s, the jump between slices of a slab (one of the prior's separations).
        random_offset: move the block grid by a random offset each step.
    """

    def __init__(self, slab_size: int, separation: int = 3, random_offset: bool = True) -> None:
        super().__init__(slab_size)
        if separation < 2:
            raise ValueError(f"interleaved slabs need separation >= 2, got {separation}")
        self.separation = int(separation)
        self.random_offset = bool(random_offset)

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        period = self.slab_size * self.separation
        offset = self._random_offset(period, generator) if self.random_offset else 0
        return tile(depth, self.slab_size, self.separation, offset)


class DiffusionBlendPPSchedule(PartitionSchedule):
    """DiffusionBlend++: shifted adjacent slabs on even steps, interleaved jump slabs on odd steps.

    Args:
        slab_size: k, slices per slab.
        separation: s of the interleaved steps.
        random_offset: random block offset on the interleaved steps too.
    """

    def __init__(self, slab_size: int, separation: int = 3, random_offset: bool = True) -> None:
        super().__init__(slab_size)
        self.shifted = ShiftedSchedule(slab_size)
        self.interleaved = InterleavedSchedule(slab_size, separation, random_offset)

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        return (self.shifted if step % 2 == 0 else self.interleaved)(step, depth, generator)

    def __repr__(self) -> str:
        return (
            f"DiffusionBlendPPSchedule(slab_size={self.slab_size}, separation={self.interleaved.separation}, "
            f"random_offset={self.interleaved.random_offset})"
        )


class SliceSchedule(PartitionSchedule):
    """Every slice on its own (a k=1 prior: the DDS-2D and DiffusionMBIR baselines)."""

    def __init__(self, slab_size: int = 1) -> None:
        if slab_size != 1:
            raise ValueError(f"the 2D schedule needs a slab_size=1 prior, got {slab_size}")
        super().__init__(1)

    def __call__(self, step: int, depth: int, generator: torch.Generator | None = None) -> Partition:
        return tile(depth, 1, 1, 0)


SCHEDULES: dict[str, type[PartitionSchedule]] = {
    "fixed": FixedSchedule,
    "shifted": ShiftedSchedule,
    "interleaved": InterleavedSchedule,
    "dbpp": DiffusionBlendPPSchedule,
    "2d": SliceSchedule,
}


def make_schedule(name: str, slab_size: int, separation: int = 3) -> PartitionSchedule:
    """Build the schedule called ``name`` (one of :data:`SCHEDULES`).

    Raises:
        ValueError: an unknown name.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown partition schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if name in ("interleaved", "dbpp"):
        return SCHEDULES[name](slab_size, separation)
    return SCHEDULES[name](slab_size)


def blend(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    partition: Partition,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Score blending: the denoiser's prediction for the whole volume from its predictions on slabs.

    Every slab of ``partition`` goes through ``denoiser(x (B,k,H,W), t (B,), separation (B,))``
    in batches of ``batch_size`` slabs, gathered one batch at a time so that memory beyond the
    volume does not grow with depth. The ``k`` outputs of each slab are scattered back to
    their slices; where slabs overlap, the predictions are averaged.

    Slab-parallel (``bundle.workflows.distributed``): every process cuts the partition into the
    same batches and runs those with ``i % world == rank``; ``reduce`` (an all-reduce sum) adds the
    other processes' sums before the average, so every process gets the whole blend.

    Args:
        denoiser: the denoiser contract (``bundle.networks.SlabDenoiser`` or any callable).
        x_t: the noisy volume ``(Z, H, W)``.
        t: the (integer) diffusion time, a Python int or a 0-d tensor.
        partition: slabs covering all Z slices.
        batch_size: slabs per denoiser call.
        shard: ``(rank, world)``: the share of the batches this process runs; ``(0, 1)``: all of them.
        reduce: maps this process's sum of slab predictions ``(Z, H, W)`` to the sum over all
            processes; needed when ``world > 1``.

    Returns:
        The blended prediction ``(Z, H, W)`` in ``x_t``'s dtype.

    Raises:
        ValueError: the partition leaves a slice uncovered or indexes past the volume, or a
            shard of several processes has no ``reduce``.
    """
    if x_t.ndim != 3:
        raise ValueError(f"expected a volume (Z, H, W), got shape {tuple(x_t.shape)}")
    rank, world = shard
    if not 0 <= rank < world or (world > 1 and reduce is None):
        raise ValueError(f"shard (rank, world) = {shard} needs 0 <= rank < world, and a reduce when world > 1")
    depth = x_t.shape[0]
    if len(partition) and int(partition.slabs.max()) >= depth:
        raise ValueError(f"the partition indexes slice {int(partition.slabs.max())} of a {depth}-slice volume")
    count = partition.coverage(depth)
    if bool((count == 0).any()):
        raise ValueError(f"the partition leaves slices {torch.nonzero(count == 0).flatten().tolist()} uncovered")
    out = torch.zeros_like(x_t)
    t = torch.as_tensor(t, device=x_t.device).long().reshape(())
    for i, slabs in enumerate(partition.batches(batch_size)):
        if i % world != rank:
            continue  # another process's batch
        b, k = slabs.shape
        index = slabs.flatten().to(x_t.device)
        x = x_t.index_select(0, index).reshape(b, k, *x_t.shape[1:])
        sep = torch.full((b,), partition.separation, dtype=torch.long, device=x_t.device)
        eps = denoiser(x, t.expand(b), sep)
        out.index_add_(0, index, eps.reshape(b * k, *x_t.shape[1:]).to(out.dtype))
    if reduce is not None:
        out = reduce(out)
    return out.div_(count.to(device=out.device, dtype=out.dtype).reshape(-1, 1, 1))
