"""The diffusion inferers on any in-plane size: the prior runs on a padded working volume, data consistency on the operator's domain."""

from __future__ import annotations

import pytest
import torch

from bundle.physics.geometry import sparse_view
from bundle.networks import SlabDenoiser
from bundle.physics.operators import make_operator
from bundle.recon.data_consistency import ConjugateGradientDC
from bundle.recon.inferers import make_inferer
from bundle.recon.padding import CroppedDataConsistency, centre_crop, working_shape

TINY = {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 8, "num_head_channels": 8}


@pytest.mark.parametrize(
    ("shape", "divisor", "min_size", "expected"),
    [
        ((20, 30, 29), 2, None, (20, 30, 30)),
        ((5, 122, 101), 8, None, (5, 128, 104)),
        ((5, 122, 101), 8, 128, (5, 128, 128)),
        ((5, 144, 128), 16, 128, (5, 144, 128)),
        ((3, 16, 16), 1, 0, (3, 16, 16)),
    ],
)
def test_working_shape(shape, divisor, min_size, expected):
    assert working_shape(shape, divisor, min_size) == expected


def test_centre_crop_matches_monai_spatial_pad():
    from monai.transforms import SpatialPad

    x = torch.rand(1, 3, 7, 10)
    padded = SpatialPad((-1, 12, 13))(x)[0]
    index = centre_crop((3, 7, 10), tuple(padded.shape))
    torch.testing.assert_close(torch.as_tensor(padded)[index], x[0])


def test_cropped_data_consistency_is_the_step_on_the_domain():
    geometry = sparse_view(4, (3, 9, 11), (2.0, 2.0, 2.0))
    operator = make_operator(geometry)
    x = torch.rand(geometry.vol_shape)
    dc = ConjugateGradientDC(operator, operator(x), iterations=3)
    padded = torch.rand(3, 12, 16)
    index = centre_crop((3, 9, 11), (3, 12, 16))
    expected_inside = dc(padded[index].contiguous())
    border = padded.clone()
    out = CroppedDataConsistency(dc, index)(padded)
    torch.testing.assert_close(out[index], expected_inside)
    border[index] = 0
    out[index] = 0
    torch.testing.assert_close(out, border, rtol=0, atol=0)  # the border is left to the prior


@pytest.mark.parametrize("method", ["dbpp", "mbir"])
def test_diffusion_runs_on_a_grid_the_unet_cannot_take(method):
    """20 x 30 x 29: W is odd, which a 2-level UNet cannot take as it is (a measured sinogram's grid)."""
    geometry = sparse_view(6, (20, 30, 29), (3.0, 3.0, 3.0))
    operator = make_operator(geometry)
    x = torch.zeros(geometry.vol_shape)
    x[:, 8:22, 6:20] = 0.4
    y = operator(x)
    torch.manual_seed(0)
    k = 1 if method == "mbir" else 3
    network = SlabDenoiser(slab_size=k, separations=(1,) if k == 1 else (1, 2, 3), **TINY)
    with pytest.raises(RuntimeError):  # the bug this guards against: the UNet on the raw grid
        network(torch.zeros(1, k, 30, 29), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    inferer = make_inferer(method, steps=3, batch_size=4, seed=1, image_size=32)
    recon = inferer(y, network, operator)
    assert recon.shape == (20, 30, 29) and torch.isfinite(recon).all()
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1
    assert inferer.working_shape(operator, network) == (20, 32, 32)
    torch.testing.assert_close(inferer(y, network, operator), recon, rtol=0, atol=0)  # seeded


class _Oracle:
    """Predicts the noise of a known clean slice (the same for every slice and slab), on the padded grid."""

    slab_size = 3
    size_divisor = 16

    def __init__(self, clean: torch.Tensor) -> None:
        from monai.networks.schedulers import DDPMScheduler

        self.clean = clean  # (H', W') in [-1, 1]
        self.alphas_cumprod = DDPMScheduler().alphas_cumprod  # make_inferer's default schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, separation: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.clean) / (1 - a).sqrt()


def test_oracle_prior_on_the_padded_grid_returns_the_truth():
    """A prior that knows the (air-padded) truth: the cropped result is the truth, so the crop is where the domain is."""
    geometry = sparse_view(6, (5, 14, 13), (3.0, 3.0, 3.0))
    operator = make_operator(geometry)
    x = torch.zeros(geometry.vol_shape)
    x[:, 3:10, 4:9] = 0.5
    x[:, 5, 6] = 0.9  # off-centre, so a shifted crop would show
    padded = torch.zeros(16, 16)
    padded[1:15, 1:14] = x[0]  # centred: 14 -> 16 is 1 + 1, 13 -> 16 is 1 + 2
    recon = make_inferer("dbpp", steps=3, seed=0)(operator(x), _Oracle(2 * padded - 1), operator)
    assert recon.shape == (5, 14, 13)
    torch.testing.assert_close(recon, x, rtol=0, atol=1e-4)
