"""Classical reconstructions: FBP calibration (parallel, fan, windows), SIRT/CGLS, TV on the sample, Inferers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.physics.geometry import limited_angle, sparse_view
from bundle.physics.operators import LinearOperator, make_operator
from bundle.physics.simulation import hu_to_normalized
from bundle.recon.classical import (
    FILTERS,
    CGLSInferer,
    FBPInferer,
    SIRTInferer,
    TVInferer,
    cgls,
    fbp,
    gradient3d,
    gradient3d_adjoint,
    ramp_filter,
    sirt,
    tv_reconstruct,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "sample_ct.nii.gz"
BEAMS = ["parallel", "fan"]


def _phantom(n: int = 48, z: int = 2) -> torch.Tensor:
    yy, xx = np.mgrid[:n, :n]
    c = n / 2
    ph = 0.5 * (((xx - c) ** 2 + (yy - c + 1) ** 2) < (0.35 * n) ** 2)
    ph = ph + 0.5 * (((xx - c - 0.15 * n) ** 2 + (yy - c - 0.12 * n) ** 2) < (0.08 * n) ** 2)  # off-centre insert
    return torch.from_numpy(np.stack([ph] * z)).float()


def _psnr(r: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((r.clamp(0, 1) - x) ** 2).mean()))


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("window", FILTERS)
def test_fbp_calibrated(beam, window):
    x = _phantom()
    g = sparse_view(180 if beam == "parallel" else 360, x.shape, (2.0, 1.5, 1.5), beam=beam)
    A = make_operator(g)
    r = fbp(A(x), A, window)
    body = x[0] == 0.5
    assert abs(float(r[0][body].mean()) - 0.5) < 0.02, "FBP scaling is off"
    assert _psnr(r, x) > 22


def test_fbp_fan_strong_divergence():
    """Fan FBP stays right when the source is close (the distance weighting matters there)."""
    x = _phantom()
    g = sparse_view(360, x.shape, (1.0, 1.5, 1.5), beam="fan", source_origin=80.0, origin_det=60.0)
    A = make_operator(g)
    r = fbp(A(x), A)
    assert abs(float(r[0][x[0] == 0.5].mean()) - 0.5) < 0.02
    assert abs(float(r[0][x[0] == 1.0].mean()) - 1.0) < 0.06


def test_ramp_filter_shape():
    resp = ramp_filter(50, 1.0)
    assert resp.numel() >= 100 and resp[0] > 0 and resp[0] < resp[5]
    assert torch.all(ramp_filter(50, 1.0, "hann") <= resp + 1e-12)
    with pytest.raises(ValueError, match="window"):
        ramp_filter(50, 1.0, "butterworth")
    with pytest.raises(ValueError, match="cutoff"):
        ramp_filter(50, 1.0, cutoff=0.0)


@pytest.mark.parametrize("beam", BEAMS)
def test_sirt_and_cgls_reduce_residual(beam):
    x = _phantom(32)
    g = sparse_view(20, x.shape, (2.0, 2.0, 2.0), beam=beam)
    A = make_operator(g)
    y = A(x)
    for r in (sirt(y, A, n_iter=30), cgls(y, A, n_iter=15)):
        assert float((A(r) - y).norm()) < 0.1 * float(y.norm())
        assert _psnr(r, x) > 20


def test_gradient_adjoint():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, 4, dtype=torch.float64, generator=g)
    p = torch.rand(3, 3, 5, 4, dtype=torch.float64, generator=g)
    w = (0.5, 1.0, 2.0)
    lhs = (gradient3d(x, w) * p).sum()
    rhs = (x * gradient3d_adjoint(p, w)).sum()
    assert abs(float(lhs - rhs)) < 1e-12


def _sample_slab(n_slices: int = 2) -> torch.Tensor:
    hu = np.asarray(nib.load(str(SAMPLE)).dataobj, dtype=np.float32)  # (X, Y, Z), 3 mm
    vol = np.transpose(hu, (2, 1, 0))[16 : 16 + n_slices]  # (Z, Y, X)
    z, h, w = vol.shape
    out = np.full((z, 128, 128), -1024.0, dtype=np.float32)  # pad 122 x 101 in plane to 128 x 128
    out[:, (128 - h) // 2 : (128 - h) // 2 + h, (128 - w) // 2 : (128 - w) // 2 + w] = vol[:, :128, :128]
    return hu_to_normalized(torch.from_numpy(out))


@pytest.mark.parametrize("beam", BEAMS)
def test_tv_beats_fbp_on_sample_8_views(beam):
    x = _sample_slab()
    g = sparse_view(8, x.shape, (3.0, 3.0, 3.0), beam=beam)
    A = make_operator(g)
    y = A(x)
    p_fbp = _psnr(fbp(y, A), x)
    p_tv = _psnr(tv_reconstruct(y, A, lam=5e-4, n_iter=20), x)
    assert p_tv >= p_fbp + 5.0, f"TV {p_tv:.2f} dB vs FBP {p_fbp:.2f} dB"


def test_inferers_keep_leading_dims_and_accept_geometry():
    """The call convention of every method: ``inferer(sinogram, network, operator, seed)``; no network for these."""
    x = _phantom(24)
    g = limited_angle(120, 10, x.shape, (1.0, 1.0, 1.0))
    A = make_operator(g)
    y = A(x)
    for inferer in (FBPInferer("shepp-logan"), SIRTInferer(5), CGLSInferer(5), TVInferer(n_iter=3)):
        out = inferer(y[None, None], None, A)
        assert out.shape == (1, 1) + x.shape
        torch.testing.assert_close(inferer(y, None, g, seed=7), out[0, 0])  # a geometry works; the seed changes nothing
        assert inferer.slab_size is None and inferer.nfe == 0 and inferer.precision("cpu") == "fp32"
        assert inferer.working_shape(A) == x.shape
    assert repr(SIRTInferer(5)) == "SIRTInferer(n_iter=5, nonnegative=True)"


def test_fan_fbp_uses_the_operators_weighted_backprojection():
    """The backend's weights live in the operator: fan FBP refuses an operator without its weighted back-projection."""
    x = _phantom(24)
    A = make_operator(sparse_view(90, x.shape, (1.0, 1.5, 1.5), beam="fan"))

    class Wrapped(LinearOperator):  # the same A and A.T, without the fan-beam weights
        def __init__(self):
            super().__init__(A.domain_shape, A.range_shape)
            self.geometry = A.geometry

        def _apply(self, v):
            return A(v)

        def _apply_adjoint(self, v):
            return A.T(v)

    with pytest.raises(ValueError, match="fan-beam fbp needs an operator with the distance-weighted back-projection"):
        fbp(A(x), Wrapped())
    r = fbp(A(x), A)
    assert abs(float(r[0][x[0] == 0.5].mean()) - 0.5) < 0.03


def test_bad_input():
    x = _phantom(24)
    A = make_operator(sparse_view(8, x.shape))
    y = A(x)
    with pytest.raises(ValueError, match="shape"):
        fbp(y[:, :4], A)
    bad = y.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tv_reconstruct(bad, A)
    with pytest.raises(ValueError, match="leading dims"):
        FBPInferer()(torch.stack([y, y]), None, A)
    with pytest.raises(ValueError, match="window"):
        FBPInferer("butterworth")
    with pytest.raises(TypeError):
        FBPInferer()(y, None, "parallel")
    with pytest.raises(TypeError, match="operator"):  # the operator is no longer taken in the network's place
        FBPInferer()(y, A)


def test_progress_shows_the_iterations_and_changes_nothing(capfd):
    x = _phantom(24)
    A = make_operator(sparse_view(8, x.shape, (2.0, 2.0, 2.0)))
    y = A(x)
    for name, quiet, shown in (
        ("SIRT", SIRTInferer(n_iter=5), SIRTInferer(n_iter=5, progress="true")),
        ("TV (ADMM)", TVInferer(n_iter=3), TVInferer(n_iter=3, progress=True)),
    ):
        silent = quiet(y, None, A)
        assert name not in capfd.readouterr().err
        torch.testing.assert_close(shown(y, None, A), silent, rtol=0, atol=0)
        assert f"{name}: 100%" in capfd.readouterr().err
    with pytest.raises(ValueError, match="progress"):
        SIRTInferer(progress="maybe")
