"""The cost of a reconstruction is measured by the workflow around the call: peak memory, network calls and time."""

from __future__ import annotations

import mmap
import time

import torch

from bundle.networks import SlabDenoiser
from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.recon.inferers import make_inferer
from bundle.recon.posterior import draw_samples
from bundle.workflows.profiling import CountedNetwork, PeakMemory, Profile

TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}


def test_peak_memory_sees_an_allocation():
    """A fresh anonymous mapping, touched page by page, must show in the sampled RSS.

    Not a tensor from the allocator: late in a long test session it can hand back pages that are
    already resident (freed earlier, not yet returned to the system), and RSS would not move.
    """
    size = 64 * 2**20
    with PeakMemory("cpu", interval=0.001) as memory:
        block = mmap.mmap(-1, size)
        torch.frombuffer(block, dtype=torch.uint8).fill_(1)  # every page written, so resident
        time.sleep(0.05)
    block.close()
    assert memory.kind == "cpu_rss" and memory.increase_bytes > size // 2


def test_counted_network_passes_through_and_counts():
    network = SlabDenoiser(slab_size=3, **TINY).train()
    counted = CountedNetwork(network)
    assert counted.slab_size == 3 and counted.size_divisor == network.size_divisor and counted.training
    counted.eval()
    assert not network.training  # eval() reached the network itself
    x = torch.zeros(4, 3, 16, 16)
    out = counted(x, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    assert out.shape == x.shape and (counted.calls, counted.slabs) == (1, 4) and counted.seconds > 0


def test_profile_around_draw_samples():
    """What metrics.json reports of a run: the inferer counts nothing itself, the profile measures the call."""
    geometry = sparse_view(6, (4, 16, 16), (3.0, 3.0, 3.0))
    operator = make_operator(geometry)
    x = torch.zeros(geometry.vol_shape)
    x[:, 4:12, 5:11] = 0.3
    torch.manual_seed(0)
    network = CountedNetwork(SlabDenoiser(slab_size=3, **TINY))
    inferer = make_inferer("fixed", steps=2, batch_size=2)
    with Profile("cpu", network) as profile:
        posterior = draw_samples(inferer, operator(x), network, operator, [0, 1])
    stats = profile.stats()
    assert posterior.nfe == 4 and stats["network_calls"] == network.calls == 2 * 2 * 1  # 2 samples x 2 steps x 1 batch
    assert stats["slab_evaluations"] == 2 * 2 * 2 and 0 < stats["network_share"] <= 1
    assert stats["seconds"] >= stats["network_seconds"] > 0 and stats["peak_memory_mb"] > 0
    with Profile("cpu") as classical:
        draw_samples(make_inferer("fbp"), operator(x), None, operator, [0])
    assert classical.stats()["network_calls"] == 0 and classical.stats()["network_share"] == 0.0
