"""Linear CT projectors on torch tensors and :func:`make_operator`, the one way to build them.

Backends: ``astra-matrix`` (ASTRA 2D CPU projector as a torch sparse matrix; parallel and fan
slice stacks; CPU or CUDA tensors; exact adjoint), ``astra-cuda`` (ASTRA 3D on CUDA via
DLPack; parallel and cone; only when ``astra.use_cuda()``), ``tomosipo`` (when importable).
"""

from __future__ import annotations

from typing import Any

import torch

from bundle.physics.geometry import ConeBeamGeometry, FanBeamGeometry, Geometry, ParallelBeamGeometry
from bundle.physics.operators.astra_cuda import AstraCudaOperator, cuda_available
from bundle.physics.operators.astra_matrix import AstraMatrixOperator
from bundle.physics.operators.base import LinearOperator, adjoint_error, check_tensor
from bundle.physics.operators.tomosipo import TomosipoOperator, tomosipo_available

__all__ = [
    "BACKENDS",
    "LinearOperator",
    "AstraMatrixOperator",
    "AstraCudaOperator",
    "TomosipoOperator",
    "adjoint_error",
    "available_backends",
    "check_tensor",
    "make_operator",
]

BACKENDS: tuple[str, ...] = ("astra-matrix", "astra-cuda", "tomosipo")


def available_backends(geometry: Geometry) -> list[str]:
    """Backends that can project ``geometry`` on this machine, best first."""
    out = []
    if isinstance(geometry, ConeBeamGeometry):
        if cuda_available():
            out.append("astra-cuda")
        if tomosipo_available():
            out.append("tomosipo")
        return out
    out.append("astra-matrix")
    if isinstance(geometry, ParallelBeamGeometry):
        if cuda_available():
            out.append("astra-cuda")
        if tomosipo_available():
            out.append("tomosipo")
    return out


def make_operator(
    geometry: Geometry,
    backend: str = "auto",
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> LinearOperator:
    """Build the projector ``A`` of ``geometry``.

    ``auto`` picks ``astra-matrix`` for parallel and fan slice stacks (exact adjoint, CPU or
    CUDA), and ``astra-cuda`` (then ``tomosipo``) for cone beam.

    Args:
        geometry: a :mod:`bundle.physics.geometry` object.
        backend: ``"auto"``, ``"astra-matrix"``, ``"astra-cuda"`` or ``"tomosipo"``.
        device: device of the tensors the operator takes; default CPU (``astra-matrix``) or
            the current CUDA device (``astra-cuda``, ``tomosipo``).
        kwargs: passed to the backend's constructor (e.g. ``projector="strip"`` for astra-matrix).

    Raises:
        ValueError: unknown backend, or one that is unavailable here or for this geometry.
    """
    if not isinstance(geometry, (ParallelBeamGeometry, FanBeamGeometry, ConeBeamGeometry)):
        raise TypeError(f"geometry must be a bundle.physics.geometry object, got {type(geometry).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "auto":
        candidates = available_backends(geometry)
        if not candidates:
            raise ValueError(
                f"no backend available for {geometry.kind} beam here: cone beam needs astra-cuda "
                "(astra.use_cuda() and a CUDA device) or tomosipo"
            )
        backend = candidates[0]
    if backend == "astra-matrix":
        if isinstance(geometry, ConeBeamGeometry):
            raise ValueError("backend 'astra-matrix' supports parallel and fan slice stacks, not cone beam")
        return AstraMatrixOperator(geometry, device=device, **kwargs)
    if backend == "astra-cuda":
        return AstraCudaOperator(geometry, device=device, **kwargs)
    return TomosipoOperator(geometry, device=device, **kwargs)
