"""SlabDiffusionInferer's min-SNR-gamma loss weighting: the weights, the weighted loss through MONAI's MSE, the errors."""

from __future__ import annotations

import pytest
import torch

from bundle.networks import SlabDenoiser
from bundle.recon.noise_schedule import NoiseSchedule
from bundle.workflows.training import SlabDiffusionInferer

TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}
TIMES = torch.tensor([0, 20, 300, 999])  # SNR from ~1e4 (nearly clean) down to ~4e-5 (pure noise)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    network = SlabDenoiser(**TINY)
    x, noise = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 3, 16, 16)
    return network, x, noise, torch.tensor([1, 2, 3, 1])


def test_weights_are_min_snr_over_snr():
    scheduler = NoiseSchedule().scheduler()
    abar = scheduler.alphas_cumprod[TIMES].float()
    snr = abar / (1 - abar)
    weights = SlabDiffusionInferer(scheduler, mixed_precision=False, min_snr_gamma=5.0).loss_weights(TIMES)
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr, rtol=1e-6, atol=0)
    assert weights[0] < 1e-3 and weights[-1] == 1.0  # the nearly clean step weighs least; below gamma the weight is 1
    torch.testing.assert_close(SlabDiffusionInferer(scheduler, min_snr_gamma=0).loss_weights(TIMES), torch.ones(4))


def test_gamma_zero_returns_the_networks_eps(batch):
    network, x, noise, separation = batch
    scheduler = NoiseSchedule().scheduler()
    with torch.no_grad():
        eps = network(scheduler.add_noise(original_samples=x, noise=noise, timesteps=TIMES), TIMES, separation)
        prediction = SlabDiffusionInferer(scheduler, mixed_precision=False, min_snr_gamma=0)(x, network, noise, TIMES, separation)
    torch.testing.assert_close(prediction, eps, rtol=0, atol=0)


def test_mse_of_the_prediction_is_the_weighted_loss_and_gives_its_gradient(batch):
    """The trainer's MSELoss(prediction, noise) equals mean_i w_i |eps_i - noise_i|^2 / n, in value and in gradient."""
    network, x, noise, separation = batch
    scheduler = NoiseSchedule().scheduler()
    inferer = SlabDiffusionInferer(scheduler, mixed_precision=False, min_snr_gamma=5.0)
    weights = inferer.loss_weights(TIMES)

    network.zero_grad()
    loss = torch.nn.MSELoss()(inferer(x, network, noise, TIMES, separation), noise)
    loss.backward()
    grads = [p.grad.clone() for p in network.parameters()]

    network.zero_grad()
    eps = network(scheduler.add_noise(original_samples=x, noise=noise, timesteps=TIMES), TIMES, separation)
    expected = (weights * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for got, want in zip(grads, (p.grad for p in network.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert loss < ((eps - noise) ** 2).mean()  # the weighting changed the loss: some weights are below 1


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), "five"])
def test_a_negative_or_nan_gamma_is_refused(gamma):
    with pytest.raises(ValueError, match=r"min_snr_gamma must be a number >= 0, got "):
        SlabDiffusionInferer(NoiseSchedule().scheduler(), min_snr_gamma=gamma)
