"""The support constraint: the visual hull of a sinogram, the projector restricted to it, and the sampler's use of it."""

from __future__ import annotations

import pytest
import torch

from bundle.networks import SlabDenoiser
from bundle.physics.geometry import limited_angle, sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.operators.base import adjoint_error
from bundle.physics.simulation import simulate_sinogram
from bundle.recon.data_consistency import ConjugateGradientDC, ZTVDataConsistency
from bundle.recon.inferers import make_inferer
from bundle.recon.support import SupportConstraint, SupportOperator, visual_hull

TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}


def body(shape: tuple[int, int, int] = (4, 32, 32), radius: float = 9.0) -> torch.Tensor:
    """A water disc (0.33) with a denser core (0.6) in each slice, air around it."""
    z, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    r = (yy**2 + xx**2).sqrt()
    disc = torch.where(r <= radius, 0.33, 0.0) + torch.where(r <= radius / 3, 0.27, 0.0)
    return disc.expand(z, h, w).contiguous()


@pytest.fixture(scope="module")
def scan():
    x = body()
    operator = make_operator(sparse_view(8, tuple(x.shape), (2.0, 2.0, 2.0)))
    return x, operator, operator(x)


def test_the_hull_holds_the_whole_body_and_leaves_out_the_air_the_rays_saw(scan):
    x, operator, y = scan
    hull = visual_hull(operator, y)
    assert hull.dtype == torch.bool and hull.shape == x.shape
    assert bool(hull[x > 0].all()), "a voxel of the body fell outside the hull"
    assert not hull[:, 0, 0].any() and not hull[:, -1, -1].any(), "the corners are air every ray there saw"
    share = hull.float().mean().item()
    disc_share = (x[0] > 0).float().mean().item()
    assert disc_share < share < 0.6, f"from 8 views the hull is a polygon a little larger than the disc, got {share:.3f}"
    # a lower threshold and a wider margin can only keep more
    assert bool((visual_hull(operator, y, threshold=0.001, margin=2) >= hull).all())


def test_a_noisy_scan_keeps_the_body_in_the_hull_and_a_blank_scan_has_none(scan):
    x, operator, y = scan
    for photons in (1e5, 1e4):
        noisy = visual_hull(operator, simulate_sinogram(x, operator, photons=photons, generator=torch.Generator().manual_seed(0)))
        assert bool(noisy[x > 0].all())
        assert noisy.float().mean() < 0.75, "noise in air may widen the hull a little, not to the whole volume"
    assert not visual_hull(operator, torch.zeros_like(y)).any()


def test_a_fan_beam_hull_holds_the_body_too():
    x = body()
    operator = make_operator(sparse_view(8, tuple(x.shape), (2.0, 2.0, 2.0), beam="fan"))
    hull = visual_hull(operator, operator(x))
    assert bool(hull[x > 0].all())
    assert not hull[:, 0, 0].any() and hull.float().mean() < 0.6


def test_limited_angle_hull_is_weaker_but_still_holds_the_body():
    x = body()
    operator = make_operator(limited_angle(90.0, 10.0, tuple(x.shape), (2.0, 2.0, 2.0)))
    hull = visual_hull(operator, operator(x))
    assert bool(hull[x > 0].all())
    assert not hull[:, 0, 0].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"threshold": 1.0}, r"support_threshold must be in \[0, 1\), got 1.0"), ({"margin": -1}, "margin must be >= 0")],
)
def test_hull_settings_are_checked(scan, kwargs, message):
    _, operator, y = scan
    with pytest.raises(ValueError, match=message):
        visual_hull(operator, y, **kwargs)


def test_the_restricted_projector_is_A_M_with_the_adjoint_M_AT_and_the_norm_of_A(scan):
    x, operator, y = scan
    hull = visual_hull(operator, y)
    restricted = SupportOperator(operator, hull)
    assert adjoint_error(restricted) < 1e-5
    assert restricted.norm() == operator.norm()
    outside = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * ~hull
    assert restricted(outside).abs().max() == 0, "what lies outside the support is not projected"
    assert restricted.T(y)[~hull].abs().max() == 0
    with pytest.raises(ValueError, match=r"the support has shape \(4, 16, 16\)"):
        SupportOperator(operator, torch.ones(4, 16, 16, dtype=torch.bool))


@pytest.mark.parametrize("factory", [ConjugateGradientDC, ZTVDataConsistency])
def test_data_consistency_over_the_hull_keeps_air_outside_and_fits_the_data_as_well(scan, factory):
    x, operator, y = scan
    hull = visual_hull(operator, y)
    start = torch.full(x.shape, 0.2)  # a grey start: a halo of 0.2 around the body
    free = factory(operator, y)(start)
    held = SupportConstraint(factory, operator, y, hull)(start.clone())
    assert held[~hull].abs().max() == 0
    assert free[~hull].abs().mean() > 0.01, "without the support the halo stays"
    residual = lambda v: float((operator(v) - y).norm() / y.norm())  # noqa: E731
    assert residual(held) <= residual(free) + 1e-3
    assert (held - x).abs().mean() < (free - x).abs().mean()
    everywhere = SupportConstraint(factory, operator, y, torch.ones_like(hull))(start.clone())
    assert torch.allclose(everywhere, free, atol=1e-5), "an all-true support is the plain step"


def test_the_sampler_returns_air_outside_the_hull_and_checks_the_setting(scan):
    x, operator, y = scan
    torch.manual_seed(0)
    network = SlabDenoiser(slab_size=3, separations=(1, 2, 3), **TINY).eval()
    settings = {"steps": 4, "batch_size": 8, "image_size": 32}
    hull = visual_hull(operator, y)
    recon = make_inferer("dbpp", support="hull", **settings)(y, network, operator)
    assert recon[~hull].abs().max() == 0
    plain = make_inferer("dbpp", **settings)(y, network, operator)
    assert plain[~hull].abs().max() > 0, "the untrained prior leaves noise in the air without the support"
    assert "support='hull'" in repr(make_inferer("mbir", support="hull"))
    with pytest.raises(ValueError, match=r"support must be one of \['none', 'hull'\], got 'mask'"):
        make_inferer("dbpp", support="mask")
    with pytest.raises(ValueError, match="support_threshold must be a number >= 0 and < 1, got '2'"):
        make_inferer("dds2d", support="hull", support_threshold="2")


@pytest.mark.parametrize("method", ["fbp", "sirt", "tv"])
def test_classical_methods_take_the_same_support(scan, method):
    x, operator, y = scan
    hull = visual_hull(operator, y)
    settings = {"n_iter": 20} if method != "fbp" else {}
    free = make_inferer(method, **settings)(y, None, operator)
    held_inferer = make_inferer(method, support="hull", **settings)
    held = held_inferer(y, None, operator)
    assert held[~hull].abs().max() == 0
    assert free[~hull].abs().max() > 0
    assert (held - x).abs().mean() < (free - x).abs().mean()
    assert "support='hull'" in repr(held_inferer) and "support" not in repr(make_inferer(method))
