"""Partitions cover every slice as specified; blending an identity denoiser returns its input."""

from __future__ import annotations

import pytest
import torch

from bundle.recon.partitions import (
    DiffusionBlendPPSchedule,
    FixedSchedule,
    InterleavedSchedule,
    ShiftedSchedule,
    SliceSchedule,
    blend,
    make_schedule,
    tile,
)

DEPTHS = [3, 4, 7, 9, 10, 17, 18, 40]


def _check_slabs(partition, depth, k, s):
    slabs = partition.slabs
    assert slabs.shape[1] == k
    assert partition.separation == s
    assert int(slabs.min()) >= 0 and int(slabs.max()) < depth
    assert torch.equal(slabs[:, 1:] - slabs[:, :-1], torch.full((len(partition), k - 1), s))
    assert bool((partition.coverage(depth) >= 1).all()), "a slice is not covered"


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_adjacent_tiling_covers_every_slice(depth, k, offset):
    p = tile(depth, k, 1, offset)
    _check_slabs(p, depth, k, 1)


def test_exact_tiling_has_no_overlap():
    p = tile(18, 3, 3, 0)
    assert torch.equal(p.coverage(18), torch.ones(18, dtype=torch.long))
    assert p.slabs[:3].tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert torch.equal(tile(9, 3, 1, 0).slabs, torch.arange(9).reshape(3, 3))


@pytest.mark.parametrize("depth", [9, 10, 17, 40])
@pytest.mark.parametrize("offset", [0, 4, 8])
def test_interleaved_jump_slabs(depth, offset):
    _check_slabs(tile(depth, 3, 3, offset), depth, 3, 3)


@pytest.mark.parametrize("depth,expected", [(3, 1), (5, 1), (6, 2), (8, 2), (9, 3)])
def test_shallow_volume_degrades_separation(depth, expected):
    p = InterleavedSchedule(3, separation=3)(0, depth, torch.Generator().manual_seed(0))
    _check_slabs(p, depth, 3, expected)


def test_too_shallow_raises():
    with pytest.raises(ValueError, match="too shallow"):
        tile(2, 3)


@pytest.mark.parametrize(
    "schedule", [FixedSchedule(3), ShiftedSchedule(3), InterleavedSchedule(3, 3), DiffusionBlendPPSchedule(3, 3), SliceSchedule()]
)
@pytest.mark.parametrize("depth", [10, 17, 40])
def test_schedules_cover_every_step(schedule, depth):
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        p = schedule(step, depth, g)
        _check_slabs(p, depth, schedule.slab_size, p.separation)


def test_dbpp_alternates_and_shifted_moves():
    g = torch.Generator().manual_seed(0)
    sched = DiffusionBlendPPSchedule(3, separation=3)
    seps = [sched(step, 40, g).separation for step in range(4)]
    assert seps == [1, 3, 1, 3]
    shifted = ShiftedSchedule(3)
    firsts = {tuple(shifted(i, 40, g).slabs[1].tolist()) for i in range(20)}
    assert len(firsts) == 3, "the shifted schedule should use every offset"
    fixed = FixedSchedule(3)
    assert torch.equal(fixed(0, 40, g).slabs, fixed(5, 40, g).slabs)


def test_make_schedule():
    assert isinstance(make_schedule("dbpp", 3), DiffusionBlendPPSchedule)
    with pytest.raises(ValueError, match="unknown partition schedule"):
        make_schedule("zigzag", 3)


def _identity(x, t, separation):
    return x.clone()


@pytest.mark.parametrize("depth", [4, 10, 17])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
@pytest.mark.parametrize("separation,offset", [(1, 0), (1, 2), (3, 1)])
def test_blend_identity_returns_input(depth, batch_size, separation, offset):
    x = torch.randn(depth, 5, 6, generator=torch.Generator().manual_seed(0))
    out = blend(_identity, x, 10, tile(depth, 3, separation, offset), batch_size)
    torch.testing.assert_close(out, x)


def test_blend_passes_separation_and_time_and_averages():
    seen = []

    def denoiser(x, t, separation):
        seen.append((x.shape, t.tolist(), separation.tolist()))
        return torch.ones_like(x) * separation.reshape(-1, 1, 1, 1)

    p = tile(10, 3, 3, 0)
    out = blend(denoiser, torch.zeros(10, 2, 2), 7, p, batch_size=2)
    torch.testing.assert_close(out, torch.full((10, 2, 2), 3.0))
    assert all(shape[0] <= 2 and shape[1] == 3 for shape, _, _ in seen)
    assert seen[0][1] == [7, 7] and seen[0][2] == [3, 3]
    # overlap averaging: slabs return their input, which holds slice indices
    def by_slab(x, t, separation):
        return x

    z = torch.arange(10.0).reshape(10, 1, 1).expand(10, 2, 2).contiguous()
    torch.testing.assert_close(blend(by_slab, z, 0, tile(10, 3, 1, 1), 3), z)


def test_blend_rejects_bad_partition():
    p = tile(10, 3)
    with pytest.raises(ValueError, match="indexes slice"):
        blend(_identity, torch.zeros(8, 2, 2), 0, p)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("depth,separation,offset", [(10, 1, 1), (17, 3, 2), (8, 2, 1)])
def test_sharded_blend_runs_the_same_batches_round_robin_and_sums_to_the_whole(world, depth, separation, offset):
    """Process r of n runs batches i % n == r of one process's batches; the reduced sums give the local blend."""
    x = torch.randn(depth, 4, 5, generator=torch.Generator().manual_seed(0))
    partition = tile(depth, 3, separation, offset)
    batches = [b.tolist() for b in partition.batches(2)]
    seen, sums = [], []

    def recording(rank):
        def denoiser(x, t, separation):
            seen.append((rank, x.clone()))
            return 0.5 * x + separation.reshape(-1, 1, 1, 1)
        return denoiser

    for rank in range(world):
        blend(recording(rank), x, 5, partition, 2, shard=(rank, world), reduce=lambda s: sums.append(s.clone()) or s)
    inputs = [x[torch.tensor(b).flatten()].reshape(len(b), 3, 4, 5) for b in batches]  # one process's calls
    assert len(seen) == len(inputs)
    for rank in range(world):  # process r's calls: batches i % world == r, in order, with one process's inputs
        mine = [v for r, v in seen if r == rank]
        assert all(torch.equal(a, b) for a, b in zip(mine, inputs[rank::world])) and len(mine) == len(inputs[rank::world])
    whole = torch.stack(sums).sum(0) / partition.coverage(depth).reshape(-1, 1, 1)
    torch.testing.assert_close(whole, blend(lambda x, t, s: 0.5 * x + s.reshape(-1, 1, 1, 1), x, 5, partition, 2))


def test_sharded_blend_needs_a_reduce_and_a_valid_rank():
    p = tile(10, 3)
    with pytest.raises(ValueError, match="and a reduce when world > 1"):
        blend(_identity, torch.zeros(10, 2, 2), 0, p, shard=(0, 2))  # a partial sum would pass for the whole blend
    with pytest.raises(ValueError, match=r"shard \(rank, world\) = \(2, 2\) needs 0 <= rank < world"):
        blend(_identity, torch.zeros(10, 2, 2), 0, p, shard=(2, 2), reduce=lambda s: s)
