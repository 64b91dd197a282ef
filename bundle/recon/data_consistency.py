"""Data consistency steps of the sampler: callables that map an image estimate to a measurement-consistent one.

Both work on the normalised image in [0, 1], where ``y = A x`` holds. Their weights are
relative to ``||A||^2`` (the operator's cached norm estimate), so one setting fits any voxel
size in mm and any number of views.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bundle.recon.cg import cg

__all__ = ["LinearOperatorLike", "ConjugateGradientDC", "ZTVDataConsistency", "z_diff", "z_diff_adjoint"]


class LinearOperatorLike(Protocol):
    """What data consistency needs of a projector (``bundle.physics.operators.LinearOperator``)."""

    T: LinearOperatorLike

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def norm(self) -> float: ...


def z_diff(x: torch.Tensor) -> torch.Tensor:
    """Forward differences along z (axis 0): ``(Z, H, W) -> (Z-1, H, W)``."""
    return x[1:] - x[:-1]


def z_diff_adjoint(w: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`z_diff`: ``(Z-1, H, W) -> (Z, H, W)``."""
    out = torch.zeros((w.shape[0] + 1, *w.shape[1:]), dtype=w.dtype, device=w.device)
    out[1:] += w
    out[:-1] -= w
    return out


def _soft_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


class ConjugateGradientDC:
    """A few CG iterations on ``(A^T A + lam I) x = A^T y + lam x0``, started at ``x0`` (DDS, Chung et al. 2024).

    ``lam = 0`` is plain DDS: CG on the normal equations, where starting at ``x0`` and
    stopping early keeps the result close to the diffusion estimate.

    Args:
        operator: the projector ``A`` (``A(x)``, ``A.T(y)``, ``norm()``).
        measurements: the sinogram ``y``.
        iterations: CG iterations per sampling step.
        lam: weight of the proximal term, relative to ``||A||^2``.
        rtol: stop earlier once the relative residual is below this.
    """

    def __init__(
        self,
        operator: LinearOperatorLike,
        measurements: torch.Tensor,
        iterations: int = 5,
        lam: float = 0.0,
        rtol: float = 1e-6,
    ) -> None:
        if iterations < 0 or lam < 0:
            raise ValueError(f"iterations and lam must be non-negative, got {iterations} and {lam}")
        self.operator = operator
        self.measurements = measurements
        self.iterations = int(iterations)
        self.lam = float(lam)
        self.rtol = float(rtol)
        self._normal_rhs = operator.T(measurements)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """The data-consistent image, started at and pulled towards ``x0`` (same shape)."""
        if self.iterations == 0:
            return x0
        A = self.operator
        lam = self.lam * A.norm() ** 2 if self.lam > 0 else 0.0
        b = self._normal_rhs + lam * x0 if lam else self._normal_rhs
        x0 = x0.to(b.dtype)

        def normal(x: torch.Tensor) -> torch.Tensor:
            return A.T(A(x)) + lam * x if lam else A.T(A(x))

        return cg(normal, b, x0=x0, max_iter=self.iterations, rtol=self.rtol)


class ZTVDataConsistency:
    """Data consistency with a total-variation penalty along z only (the DiffusionMBIR-style step, Chung et al. 2023).

    Approximately solves ``min_x 1/2 ||A x - y||^2 + lam ||D_z x||_1`` near ``x0`` by ADMM
    with the split ``v = D_z x``: the x-update is a few CG iterations on
    ``(A^T A + rho D_z^T D_z) x = A^T y + rho D_z^T (v - u)`` started at the current x, then
    ``v = soft(D_z x + u, lam/rho)`` and ``u += D_z x - v``. ADMM starts from
    ``v = soft(D_z x0, lam/rho)``, ``u = 0`` at every call, so the step has no hidden state.

    Args:
        operator: the projector ``A``.
        measurements: the sinogram ``y``.
        iterations: CG iterations per x-update.
        admm_iterations: ADMM passes per sampling step.
        rho: ADMM penalty, relative to ``||A||^2``.
        lam: z-TV weight, relative to ``||A||^2``.
    """

    def __init__(
        self,
        operator: LinearOperatorLike,
        measurements: torch.Tensor,
        iterations: int = 5,
        admm_iterations: int = 1,
        rho: float = 1e-3,
        lam: float = 5e-5,
    ) -> None:
        if rho <= 0 or lam < 0 or iterations < 1 or admm_iterations < 1:
            raise ValueError(
                f"need rho > 0, lam >= 0, iterations >= 1, admm_iterations >= 1; got {rho}, {lam}, {iterations}, {admm_iterations}"
            )
        self.operator = operator
        self.measurements = measurements
        self.iterations = int(iterations)
        self.admm_iterations = int(admm_iterations)
        self.rho = float(rho)
        self.lam = float(lam)
        self._normal_rhs = operator.T(measurements)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """The data-consistent, z-regularised image started at ``x0`` (same shape)."""
        A = self.operator
        rho = self.rho * A.norm() ** 2
        threshold = self.lam / self.rho
        x = x0.to(self._normal_rhs.dtype)
        if x.shape[0] < 2:  # a single slice has no z-differences: plain CG
            return cg(lambda v: A.T(A(v)), self._normal_rhs, x0=x, max_iter=self.iterations, rtol=1e-6)
        v = _soft_threshold(z_diff(x), threshold)
        u = torch.zeros_like(v)

        def system(w: torch.Tensor) -> torch.Tensor:
            return A.T(A(w)) + rho * z_diff_adjoint(z_diff(w))

        for _ in range(self.admm_iterations):
            x = cg(system, self._normal_rhs + rho * z_diff_adjoint(v - u), x0=x, max_iter=self.iterations, rtol=1e-6)
            dx = z_diff(x)
            v = _soft_threshold(dx + u, threshold)
            u = u + dx - v
        return x
