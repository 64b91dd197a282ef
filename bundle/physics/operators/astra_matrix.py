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

__all__ = [
    "AstraMatrixOperator",
    "astra_geometries",
    "fan_backprojection_matrix",
    "PROJECTORS",
    "slice_matrix",
    "tiled_forward_matrix",
    "tile_order",
]

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


@functools.lru_cache(maxsize=4)
def fan_backprojection_matrix(geometry: FanBeamGeometry, projector: str) -> torch.Tensor:
    """``M^T`` of the fan-beam slice matrix with the distance weight of fan-beam FBP folded in (CSR, float64).

    Entry ``(pixel j, ray i)`` becomes ``M_ij cos(gamma_i) ds / (area U_b(j))``, where
    ``U_b(j)`` is pixel ``j``'s distance from the source along the central ray of view ``b``
    over the source-axis distance, ``gamma_i`` the ray's fan angle and ``ds`` the detector
    bin at the axis: then ``M^T`` sums ``U^-2 Q`` over the views, as the equispaced fan-beam
    FBP formula needs (Kak and Slaney 1988, section 3.4.2).
    """
    import astra

    _, mt = slice_matrix(geometry, projector)
    _, h, w = geometry.vol_shape
    _, dy, dx = geometry.voxel_size
    d_src = geometry.source_origin
    mag = (geometry.source_origin + geometry.origin_det) / d_src
    ds = geometry.det_spacing / mag
    n_det = geometry.det_count
    # ASTRA's source position and detector centre per view
    _, proj_geom = astra_geometries(geometry)
    vec = astra.geom_2vec(proj_geom)["Vectors"]  # (srcX, srcY, dX, dY, uX, uY)
    src = vec[:, 0:2]
    axis = vec[:, 2:4] - src
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    # pixel centres: columns along +x, rows along -y (row 0 at the top, ASTRA's image order)
    xs = (np.arange(w) - (w - 1) / 2) * dx
    ys = -(np.arange(h) - (h - 1) / 2) * dy
    px = np.broadcast_to(xs[None, :], (h, w)).reshape(-1)
    py = np.broadcast_to(ys[:, None], (h, w)).reshape(-1)
    u = ((px[None, :] - src[:, 0:1]) * axis[:, 0:1] + (py[None, :] - src[:, 1:2]) * axis[:, 1:2]) / d_src
    s = (np.arange(n_det) - (n_det - 1) / 2) * ds
    cos_gamma = d_src / np.sqrt(d_src**2 + s**2)
    crow = mt.crow_indices().long()
    col = mt.col_indices().long().numpy()
    row = torch.repeat_interleave(torch.arange(mt.shape[0]), crow[1:] - crow[:-1]).numpy()
    view, bin_ = col // n_det, col % n_det
    vals = mt.values().double().numpy() * cos_gamma[bin_] * ds / (dx * dy * u[view, row])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(
            crow, torch.from_numpy(col), torch.from_numpy(vals), size=mt.shape, check_invariants=False
        )


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

    def fan_backprojection(self, q: torch.Tensor) -> torch.Tensor:
        """The distance-weighted back-projection of fan-beam FBP: ``sum_b U^-2 Q_b`` per pixel (:func:`fan_backprojection_matrix`).

        Args:
            q: the weighted, filtered sinogram of ``range_shape`` (float64 keeps the weights' precision).

        Raises:
            ValueError: the operator's geometry is not a fan-beam slice stack.
        """
        if not isinstance(self.geometry, FanBeamGeometry):
            raise ValueError(f"the fan-beam back-projection needs a fan-beam geometry, got {type(self.geometry).__name__}")
        weighted = fan_backprojection_matrix(self.geometry, self.projector).to(q.device)
        z, v, d = self.range_shape
        return torch.sparse.mm(weighted, q.reshape(z, v * d).T.contiguous()).T.reshape(self.domain_shape)

    def __repr__(self) -> str:
        return f"AstraMatrixOperator({self.geometry!r}, projector={self.projector!r}, device={str(self.device)!r})"
