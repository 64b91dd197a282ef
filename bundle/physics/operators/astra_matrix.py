"""ASTRA's 2D CPU projector exported once as a sparse matrix and applied with torch sparse matmul.

The slice projector of a parallel- or fan-beam :mod:`bundle.physics.geometry` is exported with
``astra.projector.matrix`` / ``astra.matrix.get`` (scipy CSR, rows ``n_views * det_count`` in
view-major order, columns ``H * W`` row-major), converted to torch sparse CSR tensors (the
matrix and its explicit transpose), and applied to all ``Z`` slices at once as one sparse
matmul on ``(H * W, Z)`` (the forward matrix's pixel columns are stored in 8x8-tile order
for memory locality, :func:`tiled_forward_matrix`). The adjoint is the transposed matrix, so ``A.T`` is the exact
adjoint of ``A`` up to floating-point summation order. Matrices are cached per geometry
(LRU), and moved lazily to the device and dtype of the input (CPU or CUDA).

Only ASTRA's CPU code is called here, so this backend is safe on machines without a GPU.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import numpy as np
import torch

from bundle.physics.geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry
from bundle.physics.operators.base import LinearOperator

__all__ = ["AstraMatrixOperator", "astra_geometries", "PROJECTORS", "slice_matrix", "tiled_forward_matrix", "tile_order"]

#: ASTRA 2D CPU projector kinds allowed per beam; the first is the default.
PROJECTORS: dict[str, tuple[str, ...]] = {
    "parallel": ("linear", "strip", "line"),
    "fan": ("line_fanflat", "strip_fanflat"),
}


def astra_geometries(geometry: Geometry) -> tuple[dict, dict]:
    """ASTRA 2D ``(vol_geom, proj_geom)`` of one slice, in mm, volume centred on the axis."""
    import astra

    if not isinstance(geometry, (ParallelBeamGeometry, FanBeamGeometry)):
        raise ValueError(f"astra-matrix needs a parallel or fan slice-stack geometry, got {type(geometry).__name__}")
    _, h, w = geometry.vol_shape
    _, dy, dx = geometry.voxel_size
    if not math.isclose(dx, dy, rel_tol=1e-6):
        raise ValueError(f"astra-matrix needs square pixels in plane, got dy={dy} mm, dx={dx} mm")
    vol_geom = astra.create_vol_geom(h, w, -0.5 * w * dx, 0.5 * w * dx, -0.5 * h * dy, 0.5 * h * dy)
    angles = np.asarray(geometry.angles, dtype=np.float64)
    if isinstance(geometry, ParallelBeamGeometry):
        proj_geom = astra.create_proj_geom("parallel", geometry.det_spacing, geometry.det_count, angles)
    else:
        proj_geom = astra.create_proj_geom(
            "fanflat", geometry.det_spacing, geometry.det_count, angles, geometry.source_origin, geometry.origin_det
        )
    return vol_geom, proj_geom


def _check_projector(geometry: Geometry, projector: Optional[str]) -> str:
    beam = "parallel" if isinstance(geometry, ParallelBeamGeometry) else "fan"
    allowed = PROJECTORS[beam]
    if projector is None:
        return allowed[0]
    if projector not in allowed:
        raise ValueError(f"projector {projector!r} is not a 2D CPU projector for {beam} beam; use one of {allowed}")
    return projector


@functools.lru_cache(maxsize=8)
def slice_matrix(geometry: Geometry, projector: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ASTRA's slice projection matrix and its transpose as CPU float32 torch sparse CSR (LRU cached)."""
    import astra

    vol_geom, proj_geom = astra_geometries(geometry)
    pid = astra.create_projector(projector, proj_geom, vol_geom)
    try:
        mid = astra.projector.matrix(pid)
        try:
            mat = astra.matrix.get(mid).tocsr().astype(np.float32)
        finally:
            astra.matrix.delete(mid)
    finally:
        astra.projector.delete(pid)
    mat.sort_indices()
    mat_t = mat.T.tocsr()
    mat_t.sort_indices()
    return _to_torch(mat), _to_torch(mat_t)


#: Side of the square pixel tiles of the forward matrix's column order (see :func:`tiled_forward_matrix`).
TILE: int = 8


def tile_order(h: int, w: int, tile: int = TILE) -> np.ndarray:
    """Row-major pixel indices of an ``h x w`` image listed tile by tile (``tile x tile`` tiles, row-major inside)."""
    r, c = np.mgrid[:h, :w]
    tiles_per_row = -(-w // tile)
    key = ((r // tile) * tiles_per_row + c // tile) * tile * tile + (r % tile) * tile + c % tile
    return np.argsort(key.reshape(-1), kind="stable")


@functools.lru_cache(maxsize=8)
def tiled_forward_matrix(geometry: Geometry, projector: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice matrix with its pixel columns in tile order, and that order (LRU cached).

    A ray's pixels are then close in memory at every angle, which roughly halves the cost of
    the forward sparse matmul (it gathers rows of the ``(H * W, Z)`` volume); the product is
    the same because the volume's rows are permuted the same way.
    """
    m, _ = slice_matrix(geometry, projector)
    _, h, w = geometry.vol_shape
    order = tile_order(h, w)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    col = torch.from_numpy(inverse)[m.col_indices().long()]
    # re-sort each row's columns (CSR invariant), keeping the values with them
    crow = m.crow_indices().long()
    row = torch.repeat_interleave(torch.arange(m.shape[0]), crow[1:] - crow[:-1])
    idx = torch.argsort(row * m.shape[1] + col)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        tiled = torch.sparse_csr_tensor(
            m.crow_indices(), col[idx].to(m.col_indices().dtype), m.values()[idx], size=m.shape, check_invariants=False
        )
    return tiled, torch.from_numpy(order)


def _to_torch(m: "object") -> torch.Tensor:
    index_dtype = torch.int32 if m.nnz < 2**31 - 1 else torch.int64  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)).to(index_dtype),  # type: ignore[attr-defined]
            torch.from_numpy(m.indices.astype(np.int64)).to(index_dtype),  # type: ignore[attr-defined]
            torch.from_numpy(m.data),  # type: ignore[attr-defined]
            size=m.shape,  # type: ignore[attr-defined]
            check_invariants=False,
        )


class AstraMatrixOperator(LinearOperator):
    """Slice-stack projector from ASTRA's 2D CPU projector matrix, applied as a torch sparse matmul.

    Args:
        geometry: a :class:`ParallelBeamGeometry` or :class:`FanBeamGeometry`.
        projector: ASTRA projector kind (:data:`PROJECTORS`); default ``linear`` (parallel) or
            ``line_fanflat`` (fan).
        device: device of inputs and outputs (CPU or CUDA); default CPU.
        check_finite: reject inputs containing NaN or Inf.
    """

    def __init__(
        self,
        geometry: Geometry,
        projector: Optional[str] = None,
        device: torch.device | str | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(geometry, (ParallelBeamGeometry, FanBeamGeometry)):
            raise ValueError(f"astra-matrix needs a parallel or fan slice-stack geometry, got {type(geometry).__name__}")
        self.projector = _check_projector(geometry, projector)
        astra_geometries(geometry)  # validates (square pixels) before any matrix is built
        super().__init__(geometry.vol_shape, geometry.sino_shape, device, check_finite)
        self.geometry = geometry
        self._mats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _device_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (self.device, dtype)
        if key not in self._mats:
            tiled, order = tiled_forward_matrix(self.geometry, self.projector)
            _, mt = slice_matrix(self.geometry, self.projector)
            self._mats[key] = (
                tiled.to(dtype=dtype).to(self.device),
                order.to(self.device),
                mt.to(dtype=dtype).to(self.device),
            )
        return self._mats[key]

    def matrices(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice matrix ``M`` (natural pixel order) and ``M^T`` as sparse CSR on the operator's device."""
        m, mt = slice_matrix(self.geometry, self.projector)
        return m.to(dtype=dtype).to(self.device), self._device_matrices(dtype)[2]

    def to(self, device: torch.device | str) -> "AstraMatrixOperator":
        """The same operator on another device."""
        if torch.device(device) == self.device:
            return self
        return AstraMatrixOperator(self.geometry, self.projector, device, self.check_finite)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        z, h, w = self.domain_shape
        tiled, order, _ = self._device_matrices(x.dtype)
        out = torch.sparse.mm(tiled, x.reshape(z, h * w).index_select(1, order).T)
        return out.T.reshape(self.range_shape).contiguous()

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z, v, d = self.range_shape
        _, _, mt = self._device_matrices(y.dtype)
        out = torch.sparse.mm(mt, y.reshape(z, v * d).T)
        return out.T.reshape(self.domain_shape).contiguous()

    def __repr__(self) -> str:
        return f"AstraMatrixOperator({self.geometry!r}, projector={self.projector!r}, device={str(self.device)!r})"
