"""HU <-> normalised attenuation and sinogram simulation (noise statistics, seeding, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.physics.simulation import MU_MAX, MU_WATER, hu_to_normalized, normalized_to_hu, simulate_sinogram


def test_hu_conversion_values_and_round_trip():
    hu = torch.tensor([-3000.0, -1000.0, 0.0, 1000.0, 2000.0])
    x = hu_to_normalized(hu)
    torch.testing.assert_close(x, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(normalized_to_hu(x[1:]), hu[1:])
    a = np.array([-1000, 0, 500], dtype=np.int16)
    np.testing.assert_allclose(normalized_to_hu(hu_to_normalized(a)), a, atol=1e-3)
    assert MU_MAX == pytest.approx(3 * MU_WATER)
    assert hu_to_normalized(torch.tensor([0.0]), mu_water=0.02, mu_max=0.02).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mu_max"):
        hu_to_normalized(hu, mu_max=0.0)
    with pytest.raises(TypeError):
        hu_to_normalized([0.0])


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_noiseless_is_forward_projection(beam):
    g = sparse_view(6, (2, 16, 16), (2.0, 1.0, 1.0), beam=beam)
    A = make_operator(g)
    x = torch.rand(g.vol_shape)
    torch.testing.assert_close(simulate_sinogram(x, A), A(x))


def test_poisson_noise_statistics_and_seed():
    g = sparse_view(8, (4, 32, 32), (3.0, 3.0, 3.0))
    A = make_operator(g)
    x = torch.full(g.vol_shape, 1 / 3)  # water
    clean = A(x)
    photons = 1e5
    y1 = simulate_sinogram(x, A, photons=photons, generator=torch.Generator().manual_seed(3))
    y2 = simulate_sinogram(x, A, photons=photons, generator=torch.Generator().manual_seed(3))
    y3 = simulate_sinogram(x, A, photons=photons, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(y1, y2)
    assert not torch.equal(y1, y3)
    # delta method: var(p) ~ 1 / (I0 exp(-p)); compare on well-exposed rays
    p = clean.double() * MU_MAX
    mask = (p > 0.5) & (p < 3)
    z = ((y1.double() - clean.double()) * MU_MAX / torch.sqrt(torch.exp(p) / photons))[mask]
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.std()) < 1.2


def test_electronic_noise_adds_variance():
    g = sparse_view(8, (4, 32, 32), (3.0, 3.0, 3.0))
    A = make_operator(g)
    x = torch.full(g.vol_shape, 1 / 3)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = simulate_sinogram(x, A, photons=1e4, generator=gen()) - A(x)
    b = simulate_sinogram(x, A, photons=1e4, electronic_noise=30.0, generator=gen()) - A(x)
    assert float(b.std()) > float(a.std())
    assert torch.isfinite(simulate_sinogram(x * 50, A, photons=10.0, electronic_noise=5.0, generator=gen())).all()


def test_bad_input():
    g = sparse_view(4, (2, 16, 16))
    A = make_operator(g)
    x = torch.rand(g.vol_shape)
    with pytest.raises(ValueError, match="photons"):
        simulate_sinogram(x, A, photons=-1.0)
    with pytest.raises(ValueError, match="needs photons"):
        simulate_sinogram(x, A, electronic_noise=1.0)
    with pytest.raises(ValueError, match="shape"):
        simulate_sinogram(x[:1], A)
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        simulate_sinogram(bad, A)
