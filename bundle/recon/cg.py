"""Conjugate gradients over a callable."""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["cg"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` accumulated in float64 without float64 copies of the operands (one product in their dtype)."""
    return torch.sum(a * b, dtype=torch.float64)


def cg(
    apply_A: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: Optional[torch.Tensor] = None,
    max_iter: int = 50,
    rtol: float = 1e-6,
    callback: Optional[Callable[[int, torch.Tensor, float], None]] = None,
) -> torch.Tensor:
    """Solve ``A x = b`` for symmetric positive (semi)definite ``A`` by conjugate gradients (Hestenes and Stiefel 1952).

    Stops after ``max_iter`` iterations or when the relative residual ``||b - A x|| / ||b||``
    falls to ``rtol``. Inner products are accumulated in float64. Runs without autograd.

    Args:
        apply_A: the linear map, any tensor shape (``apply_A(x)`` has ``x``'s shape).
        b: right-hand side.
        x0: start (default zeros); not modified.
        max_iter: most iterations (``0`` returns the start).
        rtol: relative residual to stop at.
        callback: called as ``callback(iteration, x, relative_residual)`` after each iteration.

    Returns:
        The approximate solution, same shape and dtype as ``b``.
    """
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if x0 is not None and tuple(x0.shape) != tuple(b.shape):
        raise ValueError(f"x0 has shape {tuple(x0.shape)}, b has {tuple(b.shape)}")
    if max_iter < 0 or rtol < 0:
        raise ValueError(f"max_iter and rtol must be >= 0, got {max_iter}, {rtol}")
    with torch.no_grad():
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        b_norm = float(_dot(b, b)) ** 0.5
        if b_norm == 0.0:
            return torch.zeros_like(b)
        r = b - apply_A(x) if x0 is not None else b.clone()
        rr = _dot(r, r)
        if float(rr) ** 0.5 / b_norm <= rtol:
            return x
        p = r.clone()
        for it in range(max_iter):
            ap = apply_A(p)
            pap = _dot(p, ap)
            if float(pap) <= 0.0:  # breakdown: A not positive definite along p (or p = 0)
                break
            alpha = (rr / pap).to(b.dtype)
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = _dot(r, r)
            rel = float(rr_new) ** 0.5 / b_norm
            if callback is not None:
                callback(it, x, rel)
            if rel <= rtol:
                break
            p = r + (rr_new / rr).to(b.dtype) * p
            rr = rr_new
        return x
