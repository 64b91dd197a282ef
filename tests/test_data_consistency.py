"""Data consistency: CG on the normal equations (DDS) and the z-TV ADMM variant, with a small dense operator."""

from __future__ import annotations

import pytest
import torch

from bundle.physics.operators.base import LinearOperator
from bundle.recon.data_consistency import ConjugateGradientDC, ZTVDataConsistency, z_diff, z_diff_adjoint


class MatrixOperator(LinearOperator):
    """A dense matrix acting slice by slice: ``(Z, H, W) -> (Z, m)``."""

    def __init__(self, matrix: torch.Tensor, slice_shape: tuple[int, int], depth: int) -> None:
        super().__init__((depth, *slice_shape), (depth, matrix.shape[0]))
        self.matrix = matrix

    def _apply(self, x):
        return x.reshape(x.shape[0], -1) @ self.matrix.T.to(x.dtype)

    def _apply_adjoint(self, y):
        return (y @ self.matrix.to(y.dtype)).reshape(y.shape[0], *self.domain_shape[1:])


def _problem(depth=4, rows=10, side=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    op = MatrixOperator(torch.randn(rows, side * side, generator=g, dtype=torch.float64), (side, side), depth)
    x_true = torch.rand(depth, side, side, generator=g, dtype=torch.float64)
    return op, x_true, op(x_true)


def test_ground_truth_is_a_fixed_point():
    op, x_true, y = _problem()
    for dc in (ConjugateGradientDC(op, y, 5), ConjugateGradientDC(op, y, 5, lam=0.1), ZTVDataConsistency(op, y, 5, lam=0.0)):
        torch.testing.assert_close(dc(x_true), x_true)


def test_cg_reduces_the_residual_and_stays_near_start():
    op, x_true, y = _problem()
    x0 = x_true + 0.3 * torch.randn(x_true.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = (op(x0) - y).norm()
    after = (op(ConjugateGradientDC(op, y, 3)(x0)) - y).norm()
    assert after < 0.5 * before
    # the component in the null space of A (16 unknowns, 10 rows per slice) is kept from x0
    full = ConjugateGradientDC(op, y, 50)(x0)
    P = torch.eye(16, dtype=torch.float64) - torch.linalg.pinv(op.matrix) @ op.matrix  # projector onto null(A)
    torch.testing.assert_close(full.reshape(4, 16) @ P.T, x0.reshape(4, 16) @ P.T, atol=1e-6, rtol=0)


def test_cg_with_lambda_solves_the_proximal_system():
    op, x_true, y = _problem()
    x0 = torch.zeros_like(x_true)
    lam_rel = 0.05
    out = ConjugateGradientDC(op, y, 200, lam=lam_rel, rtol=1e-12)(x0)
    lam = lam_rel * op.norm() ** 2
    M = op.matrix.T @ op.matrix + lam * torch.eye(16, dtype=torch.float64)
    expected = torch.linalg.solve(M, (y @ op.matrix + lam * x0.reshape(4, 16)).T).T.reshape(4, 4, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_zero_iterations_is_identity():
    op, x_true, y = _problem()
    x0 = torch.rand_like(x_true)
    assert torch.equal(ConjugateGradientDC(op, y, 0)(x0), x0)


def test_z_diff_adjoint():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close((z_diff(x) * w).sum(), (x * z_diff_adjoint(w)).sum())


def test_ztv_smooths_along_z_more_than_cg():
    op, x_true, y = _problem(depth=6)
    x0 = x_true + 0.3 * torch.randn(x_true.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = ConjugateGradientDC(op, y, 3)(x0)
    smooth = ZTVDataConsistency(op, y, 3, admm_iterations=3, rho=1.0, lam=0.5)(x0)
    assert z_diff(smooth).abs().sum() < z_diff(plain).abs().sum()
    assert smooth.shape == x0.shape and torch.isfinite(smooth).all()


def test_invalid_settings():
    op, _, y = _problem()
    with pytest.raises(ValueError):
        ConjugateGradientDC(op, y, -1)
    with pytest.raises(ValueError):
        ZTVDataConsistency(op, y, rho=0.0)
