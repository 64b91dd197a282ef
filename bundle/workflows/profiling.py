"""The cost of a reconstruction, measured around the call: seconds, network calls and time, peak memory.

The algorithms in ``bundle.recon`` neither time nor measure themselves; a workflow wraps the
network in a :class:`CountedNetwork` and the call in a :class:`Profile`::

    network = CountedNetwork(prior)
    with Profile(device, network) as profile:
        posterior = draw_samples(method, y, network, operator, seeds)
    metrics.update(profile.stats())
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CountedNetwork", "PeakMemory", "Profile"]


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; elsewhere the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on a CUDA device, sampled process RSS on CPU.

    Attributes (after the block): ``baseline_bytes`` (before), ``peak_bytes`` (the highest
    seen), ``increase_bytes`` (peak - baseline), ``kind`` (``"cuda_allocated"`` or ``"cpu_rss"``).

    Args:
        device: the device the work runs on.
        interval: seconds between RSS samples on CPU.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self.baseline_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = self.peak_bytes = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


class CountedNetwork:
    """A network that counts its calls, the slabs it sees and the seconds it takes (CUDA synchronised).

    It passes everything else through to the network (``slab_size``, ``size_divisor``,
    ``eval()``, ...), so a method cannot tell it from the network itself.

    Args:
        network: the denoiser ``network(x_t, t, separation) -> eps``.
    """

    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        self.network = network
        self.calls = 0
        self.slabs = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, separation: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.network(x, t, separation)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.slabs += x.shape[0]
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "network":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.network, name)


class Profile:
    """Seconds and peak memory of a block, and the calls of its :class:`CountedNetwork` (if any).

    Args:
        device: where the block computes.
        network: the counted network the block uses (``None`` for a method without one).
    """

    def __init__(self, device: torch.device | str | None, network: CountedNetwork | None = None) -> None:
        self.memory = PeakMemory(device)
        self.network = network
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Profile:
        self.memory.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.memory.__exit__(*exc)

    def stats(self) -> dict[str, Any]:
        """``seconds``, the network's ``network_calls`` / ``slab_evaluations`` / ``network_seconds`` / ``network_share`` and the peak memory."""
        calls, slabs, network_seconds = (
            (self.network.calls, self.network.slabs, self.network.seconds) if self.network is not None else (0, 0, 0.0)
        )
        return {
            "seconds": self.seconds,
            "network_calls": calls,
            "slab_evaluations": slabs,
            "network_seconds": network_seconds,
            "network_share": network_seconds / self.seconds if self.seconds > 0 else 0.0,
            "peak_memory_mb": self.memory.peak_bytes / 2**20,
            "peak_memory_increase_mb": self.memory.increase_bytes / 2**20,
            "memory_kind": self.memory.kind,
        }
