"""Conjugate gradients against torch.linalg.solve, stopping rule, edge cases."""

from __future__ import annotations

import pytest
import torch

from bundle.recon.cg import cg


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [5, 40])
def test_matches_linalg_solve(n):
    a = _spd(n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = cg(lambda v: a @ v, b, max_iter=10 * n, rtol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)


def test_tensor_shaped_unknown_and_warm_start():
    a = _spd(12)
    b = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    apply = lambda v: (a @ v.reshape(-1)).reshape(3, 4)  # noqa: E731
    ref = torch.linalg.solve(a, b.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(cg(apply, b, max_iter=100, rtol=1e-12), ref)
    x0 = ref.clone()
    calls = []
    torch.testing.assert_close(cg(apply, b, x0=x0, rtol=1e-8, callback=lambda *a: calls.append(a)), ref)
    assert calls == []  # already converged at the start
    torch.testing.assert_close(x0, ref)  # start not modified


def test_stops_on_relative_residual():
    a = _spd(60)
    b = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    history = []
    x = cg(lambda v: a @ v, b, max_iter=200, rtol=1e-3, callback=lambda i, x, r: history.append(r))
    assert history[-1] <= 1e-3 and all(r > 1e-3 for r in history[:-1])
    assert float((b - a @ x).norm() / b.norm()) <= 1e-3 * 1.0001


def test_zero_rhs_and_bad_args():
    a = _spd(4)
    assert torch.equal(cg(lambda v: a @ v, torch.zeros(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x0"):
        cg(lambda v: v, torch.ones(3), x0=torch.ones(4))
    with pytest.raises(TypeError):
        cg(lambda v: v, [1.0, 2.0])
