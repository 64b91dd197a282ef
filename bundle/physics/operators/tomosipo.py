"""tomosipo projectors (``ts.operator``) on CUDA tensors; used only when tomosipo is importable.

tomosipo projects with ASTRA's CUDA code, so this backend also needs ``astra.use_cuda()``.
Not installed in the project's default environment (optional dependency ``[tomosipo]``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from bundle.physics.geometry import ConeBeamGeometry, Geometry, ParallelBeamGeometry
from bundle.physics.operators.astra_cuda import cuda_available
from bundle.physics.operators.base import LinearOperator

__all__ = ["TomosipoOperator", "tomosipo_available"]


def tomosipo_available() -> bool:
    """True when tomosipo is importable and ASTRA can use CUDA."""
    return importlib.util.find_spec("tomosipo") is not None and cuda_available()


class TomosipoOperator(LinearOperator):
    """A tomosipo operator wrapped as a :class:`LinearOperator` (same shapes as ASTRA 3D).

    Args:
        geometry: a :class:`ParallelBeamGeometry` (as a 3D parallel beam) or :class:`ConeBeamGeometry`.
        device: a CUDA device; default the current one.
        check_finite: reject inputs containing NaN or Inf.
    """

    def __init__(self, geometry: Geometry, device: torch.device | str | None = None, check_finite: bool = True) -> None:
        if not isinstance(geometry, (ParallelBeamGeometry, ConeBeamGeometry)):
            raise ValueError(f"tomosipo backend supports parallel and cone geometries, got {type(geometry).__name__}")
        if not tomosipo_available():
            raise ValueError("backend 'tomosipo' is unavailable: tomosipo is not importable or ASTRA cannot use CUDA")
        import tomosipo as ts
        import tomosipo.torch_support  # noqa: F401  (registers torch tensors with tomosipo)

        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        super().__init__(geometry.vol_shape, geometry.sino_shape, dev, check_finite)
        self.geometry = geometry
        z, h, w = geometry.vol_shape
        dz, dy, dx = geometry.voxel_size
        vg = ts.volume(shape=(z, h, w), size=(z * dz, h * dy, w * dx))
        angles = np.asarray(geometry.angles)
        if isinstance(geometry, ParallelBeamGeometry):
            pg = ts.parallel(angles=angles, shape=(z, geometry.det_count), size=(z * dz, geometry.det_count * geometry.det_spacing))
        else:
            rows, cols = geometry.det_shape
            rs, cs = geometry.det_spacing
            pg = ts.cone(
                angles=angles,
                shape=(rows, cols),
                size=(rows * rs, cols * cs),
                src_orig_dist=geometry.source_origin,
                src_det_dist=geometry.source_origin + geometry.origin_det,
            )
        self._op = ts.operator(vg, pg)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x.to(torch.float32)).to(x.dtype)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._op.T(y.to(torch.float32)).to(y.dtype)
