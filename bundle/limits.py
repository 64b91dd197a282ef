"""A size guard: estimate the peak memory of a reconstruction before anything is allocated, and refuse too large ones.

Every entry point (the CLI reconstruction, the evaluation, MONAI Label, loading a geometry
JSON) calls :func:`check_memory` with :func:`estimate_memory_bytes` before it builds an
operator or allocates a volume, so that a request such as ``views=1e9`` or a 100000 x 100000
grid is refused in milliseconds with the estimate and the limit instead of growing the
process until the kernel kills it.

The limit (:func:`memory_limit_bytes`) is, in order of precedence, the setting
``memory_limit_gb``, the environment variable ``DIFFUSIONBLEND_MEMORY_LIMIT_GB``, or
:data:`DEFAULT_MEMORY_FRACTION` of the machine's total memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "MEMORY_LIMIT_ENV",
    "ResourceLimitError",
    "check_geometry_size",
    "check_memory",
    "estimate_memory_bytes",
    "memory_limit_bytes",
    "total_memory_bytes",
]

#: Share of the machine's total memory one reconstruction may use by default.
DEFAULT_MEMORY_FRACTION: float = 0.5

#: Environment variable overriding the limit (GB, 1 GB = 2**30 bytes).
MEMORY_LIMIT_ENV: str = "DIFFUSIONBLEND_MEMORY_LIMIT_GB"

GB: int = 2**30
FLOAT_BYTES: int = 4

#: Volume-sized float32 buffers alive at the peak, per method (counted in bundle/recon):
#: diffusion (sampler.py, data_consistency.py, partitions.blend): x_t, eps, x0/image, z/noise,
#: the blend accumulator, A^T y, CG's x, r, p, A^T A p and its temporary, the start noise;
#: ``ztv`` adds v, u, D_z x and the system's temporaries; classical.py: fbp the filtered
#: backprojection and its temporaries, sirt x, ones, column sums, their inverse and
#: temporaries, tv the 3-component gradient split (z, u), x, w, v and CG's vectors.
#: The workflow keeps the samples, their stack and the std on top (``samples``).
VOLUME_BUFFERS: dict[str, int] = {
    "dbpp": 12, "db": 12, "fixed": 12, "dds2d": 12, "mbir": 16, "fbp": 4, "sirt": 7, "tv": 20,
}

#: Sinogram-sized float32 buffers: y, A x of the data-consistency step and its residual / the
#: filtered sinogram of fbp, sirt's row sums and residual.
SINOGRAM_BUFFERS: int = 4

#: Nonzeros of ASTRA's slice matrix per (view, detector bin, image row): a ray meets one or two
#: pixels per row with the linear kernel (measured 1.27 at 400 views of 256 x 256; rounded up).
NNZ_PER_RAY_ROW: float = 1.5

#: Bytes per nonzero at the peak of building the projector: the forward matrix, its transpose and
#: the tile-ordered copy (float32 value + int32 column each: 3 x 8 bytes), plus the int64
#: temporaries of the scipy export and the tile reordering (about 40 bytes); measured 73 bytes per
#: nonzero of process peak, against 1.5 x 64 = 96 per ray-row estimated.
BYTES_PER_NNZ: int = 64

#: Activation bytes per in-plane pixel of each slab of one network call (float32, the shipped
#: network's widths 16-32-64-128 with the skip connections kept for the decoder); measured: 16 slabs
#: of 3 x 256 x 256 raised the peak by 1.1 GB including the attention term below.
ACTIVATION_BYTES_PER_PIXEL: int = 1000

#: In-plane downsampling and heads of the shipped network's attention level (the full attention
#: matrix ``heads x tokens^2`` is materialised per slab).
ATTENTION_DOWNSAMPLE: int = 8
ATTENTION_HEADS: int = 4

#: Fixed cost of the process (torch, MONAI, ASTRA, the network's weights).
BASE_BYTES: int = 600 * 2**20


class ResourceLimitError(ValueError):
    """A request whose estimated memory exceeds the configured limit."""


def total_memory_bytes() -> int:
    """The machine's total memory (``/proc/meminfo``, else ``os.sysconf``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _limit_gb(value: Any, name: str) -> float | None:
    """``value`` as a positive number of GB, None when unset; an error naming ``name`` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number of GB > 0 or null, got {value!r}") from err
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a number of GB > 0 or null, got {value!r}")
    return out


def memory_limit_bytes(limit: float | str | None = None) -> int:
    """The memory one reconstruction may use, in bytes.

    Args:
        limit: the setting ``memory_limit_gb`` (GB); None falls back to the environment variable
            ``DIFFUSIONBLEND_MEMORY_LIMIT_GB``, then to :data:`DEFAULT_MEMORY_FRACTION` of the
            machine's total memory.

    Raises:
        ValueError: a limit that is not a positive number, naming the setting or variable.
    """
    gb = _limit_gb(limit, "memory_limit_gb")
    if gb is None:
        gb = _limit_gb(os.environ.get(MEMORY_LIMIT_ENV), MEMORY_LIMIT_ENV)
    if gb is None:
        return int(DEFAULT_MEMORY_FRACTION * total_memory_bytes())
    return int(gb * GB)


def estimate_memory_bytes(
    vol_shape: Sequence[int],
    n_views: int,
    n_det: int,
    method: str,
    batch_size: int = 16,
    slab_size: int = 3,
    samples: int = 1,
    projector_matrix: bool = True,
) -> int:
    """An estimate of the peak memory (bytes) of reconstructing ``vol_shape`` from ``n_views x n_det`` with ``method``.

    The sum of: the volume-sized buffers of the method (:data:`VOLUME_BUFFERS`) and of the
    workflow (``samples`` reconstructions, their stack and std), the sinogram buffers, ASTRA's
    slice matrix (about ``n_views * n_det * H * 1.5`` nonzeros at :data:`BYTES_PER_NNZ`), the
    network's activations for a batch of ``batch_size`` slabs (diffusion methods) and the
    process's fixed cost. Python ints throughout, so absurd sizes cannot overflow.

    Calibration (CPU, process peak RSS from ``resource.getrusage``, one thread): sirt with 400
    views on a 4 x 256 x 256 grid, where the matrix dominates, peaked at 3.6 GB against 3.9 GB
    estimated (47e6 nonzeros, 73 bytes each at the peak); one call of the shipped network
    (``configs/inference.json``) on 16 slabs of 3 x 256 x 256 raised the peak by 1.1 GB against
    1.6 GB estimated, and on 16 slabs of 3 x 128 x 128 by 0.46 GB against 0.27 GB (the first
    call's fixed cost, covered by :data:`BASE_BYTES`, about 0.4 GB for the imports). The
    estimate is meant to be within a factor of about 1.5 of the peak, erring high.

    Args:
        vol_shape: the reconstruction grid ``(Z, H, W)``.
        n_views: projection angles.
        n_det: detector bins per view (columns for cone beam).
        method: a method of ``bundle.recon.inferers.METHODS``.
        batch_size: slabs per network call (diffusion methods).
        slab_size: k of the slab prior (kept for the callers; the network's widths, not k, set
            its activations).
        samples: reconstructions averaged by the workflow.
        projector_matrix: whether the projector is ASTRA's CPU matrix (parallel and fan beam);
            False for the GPU backends (cone beam), which hold no matrix.
    """
    z, h, w = (max(int(s), 1) for s in vol_shape)
    n_views, n_det = max(int(n_views), 1), max(int(n_det), 1)
    volume = z * h * w * FLOAT_BYTES
    total = BASE_BYTES
    total += (VOLUME_BUFFERS.get(method, max(VOLUME_BUFFERS.values())) + 3 * max(int(samples), 1)) * volume
    total += SINOGRAM_BUFFERS * z * n_views * n_det * FLOAT_BYTES
    if projector_matrix:
        total += int(NNZ_PER_RAY_ROW * n_views * n_det * h) * BYTES_PER_NNZ
    if method not in ("fbp", "sirt", "tv"):
        slabs = min(max(int(batch_size), 1), z)  # a batch never holds more slabs than the volume has
        total += slabs * h * w * ACTIVATION_BYTES_PER_PIXEL  # the widths, not k, set the activations
        tokens = (h // ATTENTION_DOWNSAMPLE) * (w // ATTENTION_DOWNSAMPLE)
        total += 2 * slabs * ATTENTION_HEADS * tokens * tokens * FLOAT_BYTES  # scores and softmax
    return int(total)


def check_memory(estimate_bytes: int, what: str, limit_bytes: int | None = None) -> None:
    """Refuse a run whose estimated memory exceeds the limit.

    Args:
        estimate_bytes: :func:`estimate_memory_bytes` of the run.
        what: the request, as the user would recognise it (``"dbpp on 4 x 1024 x 1024 with 8 views"``).
        limit_bytes: the limit; default :func:`memory_limit_bytes`.

    Raises:
        ResourceLimitError: the estimate exceeds the limit; the message gives both and what to change.
    """
    limit = memory_limit_bytes() if limit_bytes is None else int(limit_bytes)
    if estimate_bytes > limit:
        raise ResourceLimitError(
            f"{what} needs an estimated {estimate_bytes / GB:.1f} GB of memory, more than the limit of "
            f"{limit / GB:.1f} GB: use fewer views, a smaller volume (coarser spacing or fewer slices) or a "
            f"smaller batch_size, or raise the limit with the setting memory_limit_gb (or {MEMORY_LIMIT_ENV})"
        )


def _geometry_sizes(geometry: Any) -> tuple[tuple[int, int, int], int, int, bool]:
    """``(vol_shape, n_views, n_det, projector_matrix)`` of a ``bundle.physics.geometry`` object (duck-typed)."""
    vol_shape = tuple(int(s) for s in geometry.vol_shape)
    n_views = len(geometry.angles)
    det_shape = getattr(geometry, "det_shape", None)
    if det_shape is not None:  # cone beam: the GPU backends hold no matrix; det_rows x det_cols per view
        rows, cols = (int(s) for s in det_shape)
        return vol_shape, n_views, max(1, rows * cols // max(vol_shape[0], 1)), False
    return vol_shape, n_views, int(geometry.det_count), True


def check_geometry_size(
    geometry: Any, method: str = "fbp", limit_bytes: int | None = None, what: str | None = None, **settings: Any
) -> int:
    """Refuse a geometry too large to reconstruct, even with the cheapest method, before anything is allocated.

    Args:
        geometry: a ``bundle.physics.geometry`` object.
        method: the method to estimate for (default the cheapest, fbp).
        limit_bytes: the limit; default :func:`memory_limit_bytes`.
        what: how to name the request in the message (default the geometry's sizes).
        settings: ``batch_size``, ``slab_size``, ``samples`` for :func:`estimate_memory_bytes`.

    Returns:
        The estimate in bytes.

    Raises:
        ResourceLimitError: the estimate exceeds the limit.
    """
    vol_shape, n_views, n_det, matrix = _geometry_sizes(geometry)
    estimate = estimate_memory_bytes(vol_shape, n_views, n_det, method, projector_matrix=matrix, **settings)
    z, h, w = vol_shape
    name = what or f"{method} on a {z} x {h} x {w} grid with {n_views} views of {n_det} detector bins"
    check_memory(estimate, name, limit_bytes)
    return estimate
