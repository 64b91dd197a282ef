"""Classical reconstructions: FBP, SIRT, CGLS and 3D-TV (ADMM), as functions and MONAI Inferers.

All functions take a sinogram of ``A.range_shape`` and an operator from
:func:`bundle.physics.operators.make_operator` (or a geometry, for which one is built) and return a
``(Z, H, W)`` volume in the sinogram's units (normalised attenuation for normalised
sinograms). They run without autograd.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch

from bundle.physics.geometry import FanBeamGeometry, ParallelBeamGeometry
from bundle.physics.operators import LinearOperator, make_operator
from bundle.physics.operators.base import check_tensor
from bundle.recon.cg import cg
from bundle.recon.method import ReconstructionMethod
from bundle.recon.support import SupportOperator, support_setting, visual_hull
from bundle.settings import as_bool

__all__ = [
    "FILTERS",
    "FanBackprojector",
    "ramp_filter",
    "fbp",
    "sirt",
    "cgls",
    "tv_reconstruct",
    "gradient3d",
    "gradient3d_adjoint",
    "FBPInferer",
    "SIRTInferer",
    "CGLSInferer",
    "TVInferer",
]

#: Windows of the ramp filter.
FILTERS: tuple[str, ...] = ("ram-lak", "shepp-logan", "cosine", "hann")

OperatorOrGeometry = Union[LinearOperator, ParallelBeamGeometry, FanBeamGeometry]


@runtime_checkable
class FanBackprojector(Protocol):
    """What fan-beam FBP needs of an operator besides ``A.T``: its distance-weighted back-projection.

    The weights depend on how the backend discretises the rays, so the operator provides them
    (``bundle.physics.operators.AstraMatrixOperator.fan_backprojection``).
    """

    def fan_backprojection(self, q: torch.Tensor) -> torch.Tensor: ...


def _as_operator(A: OperatorOrGeometry, device: torch.device) -> LinearOperator:
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, (ParallelBeamGeometry, FanBeamGeometry)) or hasattr(A, "sino_shape"):
        return make_operator(A, device=device)  # type: ignore[arg-type]
    raise TypeError(f"expected a LinearOperator or a geometry, got {type(A).__name__}")


def ramp_filter(n_det: int, spacing: float, window: str = "ram-lak", cutoff: float = 1.0) -> torch.Tensor:
    """Frequency response (length ``n_fft``, float64) of the band-limited ramp filter ``|f|`` with a window.

    The ramp is the FFT of the discrete spatial-domain Ram-Lak kernel (Kak and Slaney 1988,
    eq. 3.61), which gets the zero frequency right; ``n_fft`` is the power of two at least
    ``2 n_det``. Windows: ``ram-lak`` (none), ``shepp-logan`` (sinc), ``cosine``, ``hann``;
    ``cutoff`` (fraction of Nyquist, in (0, 1]) zeroes higher frequencies.

    Args:
        n_det: detector bins.
        spacing: bin width (mm, at the rotation axis).
        window: one of :data:`FILTERS`.
        cutoff: frequency cutoff as a fraction of Nyquist.
    """
    if window not in FILTERS:
        raise ValueError(f"unknown filter window {window!r}; expected one of {FILTERS}")
    if not 0 < cutoff <= 1:
        raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
    n_fft = max(64, 1 << int(math.ceil(math.log2(2 * n_det))))
    n = torch.cat([torch.arange(0, n_fft // 2 + 1), torch.arange(-(n_fft // 2) + 1, 0)]).double()
    h = torch.zeros(n_fft, dtype=torch.float64)
    h[0] = 1.0 / (4.0 * spacing**2)
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * n[odd] * spacing) ** 2
    ramp = torch.fft.fft(h).real * spacing  # the convolution's integral gives the factor spacing
    f = torch.fft.fftfreq(n_fft, dtype=torch.float64)  # cycles per sample, |f| <= 0.5
    u = f.abs() / (0.5 * cutoff)  # 1 at the cutoff
    if window == "shepp-logan":
        w = torch.sinc(u / 2)
    elif window == "cosine":
        w = torch.cos(math.pi * u / 2)
    elif window == "hann":
        w = 0.5 * (1 + torch.cos(math.pi * u))
    else:
        w = torch.ones_like(u)
    return ramp * torch.where(u <= 1, w, torch.zeros_like(w))


def _filter_rows(sino: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    n_det = sino.shape[-1]
    n_fft = response.numel()
    spec = torch.fft.rfft(sino.double(), n=n_fft, dim=-1) * response[: n_fft // 2 + 1].to(sino.device)
    return torch.fft.irfft(spec, n=n_fft, dim=-1)[..., :n_det]


def _angular_weight(angles: Sequence[float], period: float) -> float:
    """Angle step (radians) of one view: the mean spacing of the sorted angles (period / n if one view)."""
    a = np.sort(np.mod(np.asarray(angles, dtype=np.float64), period))
    if a.size < 2:
        return period
    return float(np.median(np.diff(a)))


def fbp(
    sinogram: torch.Tensor,
    A: OperatorOrGeometry,
    filter_name: str = "ram-lak",
    cutoff: float = 1.0,
) -> torch.Tensor:
    """Filtered back-projection: ramp-filtered parallel FBP, or distance-weighted fan-beam FBP (Kak and Slaney 1988, ch. 3).

    Parallel: ``x = dtheta / (a/ds) * A^T (h * y)``; the back-projection is the operator's
    own adjoint (ASTRA's linear/strip projector sums ``a / ds`` per pixel and view, ``a`` the
    pixel area). Fan (flat detector, full 360-degree scans; short scans would need Parker
    weights): cosine pre-weighting, ramp filter at the axis, and the ``U^-2`` distance-weighted
    back-projection that the operator provides (:class:`FanBackprojector`; the ``astra-matrix`` backend).

    Args:
        sinogram: ``(Z, n_views, n_det)`` normalised sinogram.
        A: the operator (or geometry) that made it.
        filter_name: ramp window, one of :data:`FILTERS`.
        cutoff: frequency cutoff as a fraction of Nyquist.
    """
    op = _as_operator(A, sinogram.device if isinstance(sinogram, torch.Tensor) else torch.device("cpu"))
    check_tensor(sinogram, op.range_shape, "sinogram")
    geometry = getattr(op, "geometry", None)
    if not isinstance(geometry, (ParallelBeamGeometry, FanBeamGeometry)):
        raise ValueError(f"fbp supports parallel and fan slice stacks, got {type(geometry).__name__}")
    _, dy, dx = geometry.voxel_size
    with torch.no_grad():
        if isinstance(geometry, ParallelBeamGeometry):
            resp = ramp_filter(geometry.det_count, geometry.det_spacing, filter_name, cutoff)
            q = _filter_rows(sinogram, resp).to(sinogram.dtype)
            dtheta = _angular_weight(geometry.angles, math.pi)
            return op.T(q) * (dtheta * geometry.det_spacing / (dx * dy))
        if not isinstance(op, FanBackprojector):
            raise ValueError(
                f"fan-beam fbp needs an operator with the distance-weighted back-projection (backend astra-matrix), "
                f"got {type(op).__name__}"
            )
        mag = (geometry.source_origin + geometry.origin_det) / geometry.source_origin
        ds = geometry.det_spacing / mag
        s = (torch.arange(geometry.det_count, dtype=torch.float64) - (geometry.det_count - 1) / 2) * ds
        pre = geometry.source_origin / torch.sqrt(geometry.source_origin**2 + s**2)
        resp = ramp_filter(geometry.det_count, ds, filter_name, cutoff)
        q = _filter_rows(sinogram.double() * pre.to(sinogram.device), resp)
        out = op.fan_backprojection(q)
        dbeta = _angular_weight(geometry.angles, 2 * math.pi)
        return (0.5 * dbeta * out).to(sinogram.dtype)


def _fbp_applies(op: LinearOperator) -> bool:
    """Whether :func:`fbp` reconstructs with ``op``: a parallel slice stack, or a fan one with the weighted back-projection."""
    geometry = getattr(op, "geometry", None)
    return isinstance(geometry, ParallelBeamGeometry) or (isinstance(geometry, FanBeamGeometry) and isinstance(op, FanBackprojector))


def iterations(n_iter: int, progress: bool = False, desc: str = "") -> Iterable[int]:
    """``range(n_iter)``, shown as a tqdm progress bar (with the time left) when ``progress``."""
    if not progress:
        return range(n_iter)
    from tqdm import tqdm

    return tqdm(range(n_iter), desc=desc, unit="it")


def sirt(
    sinogram: torch.Tensor,
    A: OperatorOrGeometry,
    n_iter: int = 100,
    x0: Optional[torch.Tensor] = None,
    nonnegative: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """SIRT: ``x += C A^T R (y - A x)`` with ``R, C`` the inverse row and column sums (Gregor and Benson 2008).

    Args:
        sinogram: ``A.range_shape`` sinogram.
        A: operator (or geometry).
        n_iter: iterations.
        x0: start (default zeros).
        nonnegative: project onto ``x >= 0`` after each iteration.
        progress: show the iterations as a progress bar.
    """
    op = _as_operator(A, sinogram.device if isinstance(sinogram, torch.Tensor) else torch.device("cpu"))
    check_tensor(sinogram, op.range_shape, "sinogram")
    with torch.no_grad():
        ones_x = torch.ones(op.domain_shape, dtype=sinogram.dtype, device=sinogram.device)
        ones_y = torch.ones(op.range_shape, dtype=sinogram.dtype, device=sinogram.device)
        row = op(ones_x)
        colsum = op.T(ones_y)
        r = torch.where(row > 0, 1.0 / row.clamp(min=1e-12), torch.zeros_like(row))
        c = torch.where(colsum > 0, 1.0 / colsum.clamp(min=1e-12), torch.zeros_like(colsum))
        x = torch.zeros_like(ones_x) if x0 is None else x0.clone()
        for _ in iterations(n_iter, progress, "SIRT"):
            x = x + c * op.T(r * (sinogram - op(x)))
            if nonnegative:
                x.clamp_(min=0)
        return x


def cgls(
    sinogram: torch.Tensor,
    A: OperatorOrGeometry,
    n_iter: int = 30,
    x0: Optional[torch.Tensor] = None,
    damping: float = 0.0,
) -> torch.Tensor:
    """CGLS: conjugate gradients on ``(A^T A + damping I) x = A^T y`` (Hestenes and Stiefel 1952), with this package's :func:`cg`.

    Args:
        sinogram: ``A.range_shape`` sinogram.
        A: operator (or geometry).
        n_iter: iterations (early stopping regularises).
        x0: start (default zeros).
        damping: Tikhonov weight ``>= 0``.
    """
    op = _as_operator(A, sinogram.device if isinstance(sinogram, torch.Tensor) else torch.device("cpu"))
    check_tensor(sinogram, op.range_shape, "sinogram")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    with torch.no_grad():
        return cg(lambda v: op.T(op(v)) + damping * v, op.T(sinogram), x0=x0, max_iter=n_iter, rtol=1e-6)


def gradient3d(x: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Forward differences along Z, H, W (zero at the far border), stacked as ``(3, Z, H, W)``."""
    g = torch.zeros((3,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    g[0, :-1] = (x[1:] - x[:-1]) * weights[0]
    g[1, :, :-1] = (x[:, 1:] - x[:, :-1]) * weights[1]
    g[2, :, :, :-1] = (x[:, :, 1:] - x[:, :, :-1]) * weights[2]
    return g


def gradient3d_adjoint(g: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Adjoint of :func:`gradient3d` (a negative divergence)."""
    out = torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device)
    for axis in range(3):
        d = g[axis] * weights[axis]
        sl_lo = [slice(None)] * 3
        sl_hi = [slice(None)] * 3
        sl_lo[axis] = slice(0, -1)
        sl_hi[axis] = slice(1, None)
        out[tuple(sl_lo)] -= d[tuple(sl_lo)]
        out[tuple(sl_hi)] += d[tuple(sl_lo)]
    return out


# One function on purpose: ADMM's four numbered updates read as the algorithm (a little over ~50 lines).
def tv_reconstruct(
    sinogram: torch.Tensor,
    A: OperatorOrGeometry,
    lam: float = 5e-4,
    rho: Optional[float] = None,
    n_iter: int = 30,
    cg_iter: int = 5,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    nonnegative: bool = True,
    x0: Optional[torch.Tensor] = None,
    progress: bool = False,
    support: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """3D isotropic TV reconstruction by ADMM (Boyd et al. 2011, section 6.4.1) with CG x-updates.

    Solves ``min_x 1/2 ||A x - y||^2 / ||A||^2 + lam TV(x)`` subject to ``x >= 0``, splitting
    ``z = D x`` (group soft-thresholding) and ``w = x`` (projection onto ``x >= 0``, and onto
    ``x = 0`` outside ``support`` when one is given); the x-update
    ``(A^T A / ||A||^2 + rho D^T D + rho I) x = ...`` runs ``cg_iter`` warm-started CG steps.
    The data term is divided by ``||A||^2`` so that ``lam`` does not depend on the number of
    views or the pixel size.

    Args:
        sinogram: ``A.range_shape`` sinogram.
        A: operator (or geometry).
        lam: TV weight (normalised units).
        rho: ADMM penalty (default ``10 lam``, at least ``1e-4``).
        n_iter: ADMM iterations.
        cg_iter: CG iterations per x-update.
        weights: finite-difference weights along (Z, H, W), e.g. to weaken TV across slices.
        nonnegative: enforce ``x >= 0``.
        x0: start (default: FBP for slice stacks, else zeros).
        progress: show the ADMM iterations as a progress bar.
        support: boolean mask of ``A.domain_shape``; ``x`` is 0 outside it (``bundle.recon.support``).
    """
    op = _as_operator(A, sinogram.device if isinstance(sinogram, torch.Tensor) else torch.device("cpu"))
    check_tensor(sinogram, op.range_shape, "sinogram")
    if support is not None and tuple(support.shape) != op.domain_shape:
        raise ValueError(f"the support has shape {tuple(support.shape)}, the volume {op.domain_shape}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    rho = max(10.0 * lam, 1e-4) if rho is None else rho
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    scale = 1.0 / op.norm() ** 2
    constrained = nonnegative or support is not None  # the split w = x carries the constraints

    def project(t: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(t, min=0) if nonnegative else t
        return t * support.to(t.dtype) if support is not None else t

    with torch.no_grad():
        if x0 is None:
            x = fbp(sinogram, op, "hann") if _fbp_applies(op) else torch.zeros(op.domain_shape, dtype=sinogram.dtype, device=sinogram.device)
        else:
            x = x0.clone()
        x = project(x)
        aty = op.T(sinogram) * scale
        z = gradient3d(x, weights)
        u = torch.zeros_like(z)
        w = x.clone()
        v = torch.zeros_like(x)

        def normal(t: torch.Tensor) -> torch.Tensor:
            out = op.T(op(t)) * scale + rho * gradient3d_adjoint(gradient3d(t, weights), weights)
            return out + rho * t if constrained else out

        for _ in iterations(n_iter, progress, "TV (ADMM)"):
            # 1. x-update: least squares coupling data, gradients and the constrained copy
            rhs = aty + rho * gradient3d_adjoint(z - u, weights)
            if constrained:
                rhs = rhs + rho * (w - v)
            x = cg(normal, rhs, x0=x, max_iter=cg_iter, rtol=1e-8)
            # 2. z-update: group (isotropic) soft-thresholding of the gradient
            dx_u = gradient3d(x, weights) + u
            mag = torch.sqrt((dx_u**2).sum(0, keepdim=True)).clamp(min=1e-12)
            z = dx_u * torch.clamp(1 - (lam / rho) / mag, min=0)
            # 3. w-update: projection onto x >= 0 (and onto the support)
            if constrained:
                w = project(x + v)
                v = v + x - w
            # 4. dual ascent
            u = dx_u - z
        return project(x)


def _split_leading(sinogram: torch.Tensor, range_shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(sinogram.shape[: sinogram.dim() - len(range_shape)])
    if any(s != 1 for s in lead):
        raise ValueError(f"sinogram has shape {tuple(sinogram.shape)}; leading dims must be 1 for a {range_shape} sinogram")
    return sinogram.reshape(range_shape), lead


class _ClassicalInferer(ReconstructionMethod):
    """A classical method under the call convention of every method (:class:`ReconstructionMethod`); no network, no randomness.

    The sinogram may carry leading singleton dims (batch, channel); the volume keeps them.

    Args:
        support: ``"hull"``: reconstruct over the visual hull of the measurements, air outside it
            (``bundle.recon.support``, the projector restricted to the hull); ``"none"``: every voxel free.
        support_threshold: share of the largest line integral below which a ray counts as empty.
    """

    def __init__(self, support: str = "none", support_threshold: float = 0.003) -> None:
        super().__init__()
        self._support, self._support_threshold = support_setting(support, support_threshold)

    def _reconstruct(self, sinogram: torch.Tensor, op: LinearOperator, support: torch.Tensor | None) -> torch.Tensor:
        """The method's volume; with a ``support`` the method holds the voxels outside it at air as it iterates."""
        raise NotImplementedError

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: object, operator: OperatorOrGeometry, seed: int | None = None
    ) -> torch.Tensor:
        """Reconstruct.

        Args:
            inputs: sinogram of the operator's ``range_shape``, optionally with leading
                singleton dims (e.g. ``(1, 1, Z, n_views, n_det)``).
            network: not used (``None``): classical methods have no prior.
            operator: the operator (``make_operator(geometry)``) or the geometry itself.
            seed: not used: classical methods are deterministic.

        Returns:
            ``(Z, H, W)`` volume with the same leading singleton dims as ``inputs``.
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor sinogram, got {type(inputs).__name__}")
        op = _as_operator(operator, inputs.device)
        sino, lead = _split_leading(inputs, op.range_shape)
        sino = sino.contiguous()
        if self._support == "none":
            return self._reconstruct(sino, op, None).reshape(lead + op.domain_shape)
        hull = visual_hull(op, sino, self._support_threshold)
        return (self._reconstruct(sino, op, hull) * hull).reshape(lead + op.domain_shape)

    def __repr__(self) -> str:
        settings = getattr(self, "kwargs", None) or {k: v for k, v in vars(self).items() if not k.startswith("_")}
        if self._support != "none":
            settings = {**settings, "support": self._support, "support_threshold": self._support_threshold}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


class FBPInferer(_ClassicalInferer):
    """Filtered back-projection as a MONAI Inferer (see :func:`fbp`): ``inferer(sinogram, None, operator)``.

    Args:
        filter_name: ramp window, one of :data:`FILTERS`.
        cutoff: frequency cutoff as a fraction of Nyquist.
    """

    method = "fbp"

    def __init__(
        self, filter_name: str = "ram-lak", cutoff: float = 1.0, support: str = "none", support_threshold: float = 0.003
    ) -> None:
        super().__init__(support, support_threshold)
        ramp_filter(8, 1.0, filter_name, cutoff)  # validates
        self.filter_name, self.cutoff = filter_name, cutoff

    def _reconstruct(self, sinogram: torch.Tensor, op: LinearOperator, support: torch.Tensor | None) -> torch.Tensor:
        return fbp(sinogram, op, self.filter_name, self.cutoff)  # one back-projection: the support is its mask


class SIRTInferer(_ClassicalInferer):
    """SIRT as a MONAI Inferer (see :func:`sirt`).

    Args:
        n_iter: iterations.
        nonnegative: enforce ``x >= 0``.
    """

    method = "sirt"

    def __init__(
        self,
        n_iter: int = 100,
        nonnegative: bool = True,
        progress: bool = False,
        support: str = "none", support_threshold: float = 0.003,  # the support constraint (_ClassicalInferer)
    ) -> None:
        super().__init__(support, support_threshold)
        self.n_iter, self.nonnegative = n_iter, nonnegative
        self._progress = as_bool(progress, "progress")

    def _reconstruct(self, sinogram: torch.Tensor, op: LinearOperator, support: torch.Tensor | None) -> torch.Tensor:
        op = op if support is None else SupportOperator(op, support)  # SIRT's updates are back-projections
        return sirt(sinogram, op, self.n_iter, nonnegative=self.nonnegative, progress=self._progress)


class CGLSInferer(_ClassicalInferer):
    """CGLS as a MONAI Inferer (see :func:`cgls`).

    Args:
        n_iter: iterations.
        damping: Tikhonov weight.
    """

    method = "cgls"

    def __init__(self, n_iter: int = 30, damping: float = 0.0, support: str = "none", support_threshold: float = 0.003) -> None:
        super().__init__(support, support_threshold)
        self.n_iter, self.damping = n_iter, damping

    def _reconstruct(self, sinogram: torch.Tensor, op: LinearOperator, support: torch.Tensor | None) -> torch.Tensor:
        return cgls(sinogram, op if support is None else SupportOperator(op, support), self.n_iter, damping=self.damping)


class TVInferer(_ClassicalInferer):
    """3D-TV ADMM reconstruction as a MONAI Inferer (see :func:`tv_reconstruct` for the arguments)."""

    method = "tv"

    def __init__(
        self,
        lam: float = 5e-4,
        rho: Optional[float] = None,
        n_iter: int = 30,
        cg_iter: int = 5,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        nonnegative: bool = True,
        progress: bool = False,
        support: str = "none", support_threshold: float = 0.003,  # the support constraint (_ClassicalInferer)
    ) -> None:
        super().__init__(support, support_threshold)
        self.kwargs = dict(lam=lam, rho=rho, n_iter=n_iter, cg_iter=cg_iter, weights=tuple(weights), nonnegative=nonnegative)
        self._progress = as_bool(progress, "progress")

    def _reconstruct(self, sinogram: torch.Tensor, op: LinearOperator, support: torch.Tensor | None) -> torch.Tensor:
        return tv_reconstruct(sinogram, op, **self.kwargs, progress=self._progress, support=support)  # type: ignore[arg-type]
