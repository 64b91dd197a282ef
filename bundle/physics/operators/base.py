"""Linear operators on torch tensors: ``A(x)``, ``A.T(y)``, shapes, device, norm, autograd."""

from __future__ import annotations

import abc
from typing import Optional

import torch

__all__ = ["LinearOperator", "check_tensor", "adjoint_error"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(x: torch.Tensor, shape: tuple[int, ...], name: str, check_finite: bool = True) -> None:
    """Raise TypeError/ValueError unless ``x`` is a finite float32/float64 tensor of ``shape``.

    Args:
        x: the tensor to check.
        shape: expected shape.
        name: how to call ``x`` in error messages.
        check_finite: also reject NaN and Inf values.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    # A finite sum proves every entry finite (NaN and Inf propagate); only then is it cheap.
    if check_finite and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


class _Apply(torch.autograd.Function):
    """Differentiable application of a linear operator: the gradient of ``A(x)`` is ``A.T``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, op: "LinearOperator") -> torch.Tensor:  # type: ignore[override]
        ctx.op = op  # type: ignore[attr-defined]
        return op._apply(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        op: LinearOperator = ctx.op  # type: ignore[attr-defined]
        return _Apply.apply(grad, op.T), None


class LinearOperator(abc.ABC):
    """A linear map between tensor shapes, tomosipo style: ``A(x)``, ``A.T(y)``.

    Subclasses implement :meth:`_apply` and :meth:`_apply_adjoint` on raw tensors (already
    checked). Calling the operator checks the input (type, dtype, shape, finiteness, device)
    and goes through a ``torch.autograd.Function`` whose backward is the adjoint, so
    gradients flow through ``A`` as ``A.T`` and through ``A.T`` as ``A``.

    Args:
        domain_shape: shape of ``x``.
        range_shape: shape of ``A(x)``.
        device: device of the operator's data; inputs must be on it.
        check_finite: reject inputs containing NaN or Inf.
    """

    def __init__(
        self,
        domain_shape: tuple[int, ...],
        range_shape: tuple[int, ...],
        device: torch.device | str | None = None,
        check_finite: bool = True,
    ) -> None:
        self.domain_shape = tuple(int(s) for s in domain_shape)
        self.range_shape = tuple(int(s) for s in range_shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.check_finite = check_finite
        self._adjoint_op: Optional[LinearOperator] = None
        self._norm: Optional[float] = None

    @abc.abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """Forward map on a checked (possibly non-contiguous) tensor of ``domain_shape``."""

    @abc.abstractmethod
    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint map on a checked (possibly non-contiguous) tensor of ``range_shape``."""

    def _check_device(self, x: torch.Tensor, name: str) -> None:
        if x.device.type != self.device.type or (
            self.device.index is not None and x.device.index is not None and x.device.index != self.device.index
        ):
            raise ValueError(f"{name} is on {x.device} but the operator is on {self.device}; use op.to(device)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator (differentiable)."""
        check_tensor(x, self.domain_shape, f"input of {type(self).__name__}", self.check_finite)
        self._check_device(x, "input")
        return _Apply.apply(x, self)

    @property
    def T(self) -> "LinearOperator":
        """The adjoint operator (cached); ``A.T.T is A``."""
        if self._adjoint_op is None:
            self._adjoint_op = _AdjointOperator(self)
        return self._adjoint_op

    def to(self, device: torch.device | str) -> "LinearOperator":
        """An equivalent operator on ``device`` (subclasses override when they hold data)."""
        if torch.device(device) == self.device:
            return self
        raise NotImplementedError(f"{type(self).__name__} cannot move to {device}")

    def norm(self, n_iter: int = 50, generator: Optional[torch.Generator] = None) -> float:
        """Operator 2-norm ``||A||``, estimated by power iteration on ``A^T A`` (cached).

        Args:
            n_iter: power iterations (the estimate approaches the norm from below).
            generator: CPU generator for the random start (default: seed 0).
        """
        if self._norm is None:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            x = torch.rand(self.domain_shape, generator=gen, dtype=torch.float64).to(self.device, torch.float32)
            x = x / x.norm()
            est = 0.0
            with torch.no_grad():
                for _ in range(n_iter):
                    z = self._apply_adjoint(self._apply(x))
                    est = float(z.double().norm())
                    if est == 0.0:
                        break
                    x = z / est
            self._norm = est**0.5
        return self._norm

    def __repr__(self) -> str:
        return f"{type(self).__name__}(domain_shape={self.domain_shape}, range_shape={self.range_shape}, device={self.device})"


class _AdjointOperator(LinearOperator):
    """The adjoint of a linear operator; its adjoint is the original."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.range_shape, op.domain_shape, op.device, op.check_finite)
        self._adjoint_op = op

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        assert self._adjoint_op is not None
        return self._adjoint_op._apply_adjoint(x)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        assert self._adjoint_op is not None
        return self._adjoint_op._apply(y)

    def norm(self, n_iter: int = 50, generator: Optional[torch.Generator] = None) -> float:
        """Same as the original operator's norm."""
        assert self._adjoint_op is not None
        return self._adjoint_op.norm(n_iter, generator)

    def __repr__(self) -> str:
        return f"{self._adjoint_op!r}.T"


def adjoint_error(op: LinearOperator, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> float:
    """Normalised dot-product test ``|<Ax, y> - <x, A^T y>| / (||A|| ||x|| ||y||)`` (ODL's adjoint test).

    ``x`` and ``y`` are uniform random in ``[0, 1)`` (nonnegative, the hard case for
    cancellation); the inner products are accumulated in float64.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.rand(op.domain_shape, generator=gen, dtype=torch.float64).to(op.device, dtype)
    y = torch.rand(op.range_shape, generator=gen, dtype=torch.float64).to(op.device, dtype)
    with torch.no_grad():
        ax = op(x).double()
        aty = op.T(y).double()
    lhs = float((ax * y.double()).sum())
    rhs = float((x.double() * aty).sum())
    return abs(lhs - rhs) / (op.norm() * float(x.double().norm()) * float(y.double().norm()))
