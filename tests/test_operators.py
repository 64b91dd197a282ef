"""Projectors: dot-product (adjoint) test per available backend, gradients, agreement with ASTRA, bad input.

Adjoint tolerance: ``astra-matrix`` applies a sparse matrix and its explicit transpose, so
``<Ax, y>`` and ``<x, A^T y>`` are the same sum of products in different orders; in float32
each sum carries a relative rounding error of about ``sqrt(n) * 6e-8`` (n about 1e4 terms per
output here), far below 1e-5, and the products are accumulated in float64. ASTRA's CUDA
pair (``astra-cuda``, ``tomosipo``) is known to be unmatched (ray-driven forward,
voxel-driven back projection); we accept 5e-2 there and only on machines with a GPU.
"""

from __future__ import annotations

import astra
import numpy as np
import pytest
import torch

from bundle.physics.geometry import limited_angle, sparse_view
from bundle.physics.operators import AstraMatrixOperator, available_backends, make_operator
from bundle.physics.operators.astra_matrix import astra_geometries
from bundle.physics.operators.base import adjoint_error

TOL = {"astra-matrix": 1e-5, "astra-cuda": 5e-2, "tomosipo": 5e-2}
SHAPE = (3, 24, 20)
VOXEL = (2.0, 0.75, 0.75)


def _geometries():
    out = []
    for beam in ("parallel", "fan", "cone"):
        for factory in ("sparse", "limited"):
            if factory == "sparse":
                g = sparse_view(7, SHAPE, VOXEL, beam=beam)
            else:
                g = limited_angle(90, 15, SHAPE, VOXEL, beam=beam)
            for backend in available_backends(g):
                for projector in ([None, "strip"] if beam == "parallel" and backend == "astra-matrix" else
                                  [None, "strip_fanflat"] if beam == "fan" else [None]):
                    out.append(pytest.param(g, backend, projector, id=f"{beam}-{factory}-{backend}-{projector}"))
    return out


def _op(g, backend, projector):
    kwargs = {"projector": projector} if projector else {}
    return make_operator(g, backend=backend, **kwargs)


@pytest.mark.parametrize("geometry, backend, projector", _geometries())
def test_adjoint(geometry, backend, projector):
    op = _op(geometry, backend, projector)
    assert op.domain_shape == geometry.vol_shape and op.range_shape == geometry.sino_shape
    err = adjoint_error(op, torch.Generator().manual_seed(1))
    assert err <= TOL[backend], f"{backend}: normalised adjoint error {err:.3e}"
    assert op.T.T is op


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_gradcheck(beam):
    g = sparse_view(3, (2, 6, 6), (1.0, 1.0, 1.0), beam=beam)
    op = make_operator(g)
    x = torch.rand(g.vol_shape, dtype=torch.float64, requires_grad=True)
    y = torch.rand(g.sino_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradcheck(op.T, (y,))


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_grad_is_adjoint(beam):
    g = sparse_view(5, (2, 16, 16), beam=beam)
    op = make_operator(g)
    x = torch.rand(g.vol_shape, requires_grad=True)
    w = torch.rand(g.sino_shape)
    (op(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, op.T(w))


@pytest.mark.parametrize("beam, projector", [("parallel", "linear"), ("parallel", "strip"), ("fan", "line_fanflat")])
def test_matches_astra_create_sino(beam, projector):
    g = sparse_view(9, (3, 20, 20), (1.5, 1.25, 1.25), beam=beam)
    op = AstraMatrixOperator(g, projector=projector)
    x = torch.rand(g.vol_shape, generator=torch.Generator().manual_seed(0))
    y = op(x).numpy()
    vol_geom, proj_geom = astra_geometries(g)
    pid = astra.create_projector(projector, proj_geom, vol_geom)
    try:
        for z in range(g.vol_shape[0]):
            sid, sino = astra.create_sino(x[z].numpy(), pid)
            astra.data2d.delete(sid)
            np.testing.assert_allclose(y[z], sino, rtol=1e-5, atol=1e-5 * np.abs(sino).max())
    finally:
        astra.projector.delete(pid)


def test_norm_cached_and_sane():
    op = make_operator(sparse_view(8, (2, 16, 16)))
    n = op.norm()
    assert n == op.norm() == op.T.norm()
    x = torch.rand(op.domain_shape)
    assert float(op(x).norm()) <= 1.01 * n * float(x.norm())


def test_bad_input():
    op = make_operator(sparse_view(4, (2, 16, 16)))
    with pytest.raises(ValueError, match="shape"):
        op(torch.zeros(2, 16, 15))
    with pytest.raises(TypeError, match="float32 or float64"):
        op(torch.zeros(2, 16, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op(np.zeros((2, 16, 16), dtype=np.float32))
    bad = torch.zeros(2, 16, 16)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        op(bad)
    with pytest.raises(ValueError, match="shape"):
        op.T(torch.zeros(2, 16, 16))


def test_backend_errors():
    g = sparse_view(4, (2, 16, 16))
    with pytest.raises(ValueError, match="unknown backend"):
        make_operator(g, backend="odl")
    with pytest.raises(ValueError, match="projector"):
        make_operator(g, projector="cuda")
    if not astra.use_cuda():
        with pytest.raises(ValueError, match="unavailable"):
            make_operator(g, backend="astra-cuda")
        with pytest.raises(ValueError, match="no backend available"):
            make_operator(sparse_view(4, (2, 16, 16), beam="cone"))
    with pytest.raises(ValueError, match="cone"):
        make_operator(sparse_view(4, (2, 16, 16), beam="cone"), backend="astra-matrix")
    with pytest.raises(ValueError, match="square pixels"):
        make_operator(sparse_view(4, (2, 16, 16), (1.0, 1.0, 0.5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_astra_matrix_on_cuda():
    g = sparse_view(6, (2, 16, 16))
    cpu = make_operator(g)
    gpu = make_operator(g, device=torch.device("cuda"))
    x = torch.rand(g.vol_shape)
    torch.testing.assert_close(gpu(x.to(gpu.device)).cpu(), cpu(x), rtol=1e-5, atol=1e-5)


def test_fan_backprojection_is_the_distance_weighted_adjoint():
    """Far from the source every pixel's distance weight U is 1 and the fan angle 0: the weighted back-projection is ``A.T ds / area``."""
    g = sparse_view(12, (2, 16, 16), (1.0, 1.5, 1.5), beam="fan", source_origin=1e5, origin_det=1e5)
    op = make_operator(g)
    q = torch.rand(op.range_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ds = g.det_spacing / 2.0  # the detector bin at the axis (magnification 2)
    expected = op.T(q.float()).double() * ds / (1.5 * 1.5)
    torch.testing.assert_close(op.fan_backprojection(q), expected, rtol=1e-3, atol=1e-6)
    near = make_operator(sparse_view(12, (2, 16, 16), (1.0, 1.5, 1.5), beam="fan", source_origin=40.0, origin_det=40.0))
    q = torch.rand(near.range_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unweighted = near.T(q.float()).double() * (near.geometry.det_spacing / 2) / 2.25
    assert not torch.allclose(near.fan_backprojection(q), unweighted, rtol=1e-2)  # close to the source the weights matter
    with pytest.raises(ValueError, match="fan-beam geometry"):
        make_operator(sparse_view(4, (2, 16, 16))).fan_backprojection(torch.zeros(2, 4, 23, dtype=torch.float64))
