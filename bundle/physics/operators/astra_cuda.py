"""ASTRA 3D CUDA projectors (``parallel3d``, ``cone``) applied in place on CUDA tensors via DLPack.

Used only when ``astra.use_cuda()`` is True and torch sees a CUDA device: without a GPU,
ASTRA's 3D calls kill the interpreter (SIGFPE), so every ASTRA 3D call in this module sits
behind :func:`cuda_available`.

Adjoint error: ASTRA's GPU forward projector (ray-driven) and backprojector (voxel-driven)
are not an exactly matched pair, so ``A.T`` is only approximately the adjoint of ``A``;
normalised dot-product error ``|<Ax,y> - <x,A^T y>| / (|A| |x| |y|)``: not measured here:
no GPU (the test in ``tests/test_operators.py`` measures it on a machine with one and
accepts at most 5e-2).
"""

from __future__ import annotations

import numpy as np
import torch

from bundle.physics.geometry import ConeBeamGeometry, Geometry, ParallelBeamGeometry
from bundle.physics.operators.base import LinearOperator

__all__ = ["AstraCudaOperator", "cuda_available"]


def cuda_available() -> bool:
    """True when ASTRA was built with CUDA, it sees a GPU, and torch sees one too."""
    try:
        import astra
    except ImportError:
        return False
    return bool(astra.use_cuda()) and torch.cuda.is_available()


def astra_geometries_3d(geometry: Geometry) -> tuple[dict, dict]:
    """ASTRA 3D ``(vol_geom, proj_geom)`` in mm; a parallel slice stack becomes ``parallel3d``."""
    import astra

    z, h, w = geometry.vol_shape
    dz, dy, dx = geometry.voxel_size
    vol_geom = astra.create_vol_geom(
        h, w, z, -0.5 * w * dx, 0.5 * w * dx, -0.5 * h * dy, 0.5 * h * dy, -0.5 * z * dz, 0.5 * z * dz
    )
    angles = np.asarray(geometry.angles, dtype=np.float64)
    if isinstance(geometry, ParallelBeamGeometry):
        proj_geom = astra.create_proj_geom("parallel3d", geometry.det_spacing, dz, z, geometry.det_count, angles)
    elif isinstance(geometry, ConeBeamGeometry):
        rows, cols = geometry.det_shape
        row_sp, col_sp = geometry.det_spacing
        proj_geom = astra.create_proj_geom(
            "cone", col_sp, row_sp, rows, cols, angles, geometry.source_origin, geometry.origin_det
        )
    else:
        raise ValueError(f"astra-cuda supports parallel (as parallel3d) and cone geometries, got {type(geometry).__name__}")
    return vol_geom, proj_geom


class AstraCudaOperator(LinearOperator):
    """ASTRA ``cuda3d`` forward/back projection on CUDA tensors (no host copies).

    Args:
        geometry: a :class:`ParallelBeamGeometry` (projected as ``parallel3d``) or
            :class:`ConeBeamGeometry`.
        device: a CUDA device; default the current one.
        check_finite: reject inputs containing NaN or Inf.

    Raises:
        ValueError: when ASTRA cannot use CUDA here, or for an unsupported geometry.
    """

    def __init__(self, geometry: Geometry, device: torch.device | str | None = None, check_finite: bool = True) -> None:
        if not isinstance(geometry, (ParallelBeamGeometry, ConeBeamGeometry)):
            raise ValueError(f"astra-cuda supports parallel and cone geometries, got {type(geometry).__name__}")
        if not cuda_available():
            raise ValueError("backend 'astra-cuda' is unavailable: astra.use_cuda() is False or torch sees no CUDA device")
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            raise ValueError(f"backend 'astra-cuda' needs a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        super().__init__(geometry.vol_shape, geometry.sino_shape, dev, check_finite)
        self.geometry = geometry
        import astra

        astra.set_gpu_index(dev.index)
        vol_geom, proj_geom = astra_geometries_3d(geometry)
        self._projector_id = astra.create_projector("cuda3d", proj_geom, vol_geom)

    def __del__(self) -> None:
        pid = getattr(self, "_projector_id", None)
        if pid is not None:
            try:
                import astra

                astra.projector3d.delete(pid)
            except Exception:  # interpreter shutdown
                pass

    def to(self, device: torch.device | str) -> "AstraCudaOperator":
        """The same operator on another CUDA device."""
        if torch.device(device) == self.device:
            return self
        return AstraCudaOperator(self.geometry, device, self.check_finite)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        import astra.experimental

        vol = x.to(torch.float32).contiguous()
        out = torch.zeros(self.range_shape, dtype=torch.float32, device=self.device)
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            astra.experimental.direct_FP3D(self._projector_id, vol, out)
        return out.to(x.dtype)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        import astra.experimental

        proj = y.to(torch.float32).contiguous()
        out = torch.zeros(self.domain_shape, dtype=torch.float32, device=self.device)
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            astra.experimental.direct_BP3D(self._projector_id, out, proj)
        return out.to(y.dtype)

    def __repr__(self) -> str:
        return f"AstraCudaOperator({self.geometry!r}, device={str(self.device)!r})"

