"""The DiffusionBlend sampler: oracle recovery, determinism, regression numbers with an analytic denoiser."""

from __future__ import annotations

import pytest
import torch

from bundle.recon.partitions import DiffusionBlendPPSchedule, FixedSchedule, Partition, PartitionSchedule, SliceSchedule
from bundle.recon.sampler import ddim_timesteps, linear_alphas_cumprod, sample

ALPHAS = linear_alphas_cumprod()


class RecordingSchedule(PartitionSchedule):
    """Wraps a schedule and remembers the partition of the current step."""

    def __init__(self, inner: PartitionSchedule) -> None:
        super().__init__(inner.slab_size)
        self.inner = inner
        self.current: Partition | None = None

    def __call__(self, step, depth, generator=None):
        self.current = self.inner(step, depth, generator)
        return self.current


class Oracle:
    """Returns the exact noise of x_t with respect to a known clean volume (in [-1, 1])."""

    def __init__(self, clean: torch.Tensor, schedule: RecordingSchedule, batch_size: int) -> None:
        self.clean, self.schedule, self.batch_size = clean, schedule, batch_size
        self._batches = None

    def __call__(self, x, t, separation):
        if self._batches is None or self._partition is not self.schedule.current:
            self._partition = self.schedule.current
            self._batches = iter(self._partition.batches(self.batch_size))
        slabs = next(self._batches)
        a = ALPHAS[int(t[0])].float()
        clean = self.clean[slabs.flatten()].reshape(x.shape)
        return (x - a.sqrt() * clean) / (1 - a).sqrt()


@pytest.mark.parametrize("schedule", [DiffusionBlendPPSchedule(3, 3), FixedSchedule(3)])
@pytest.mark.parametrize("depth", [7, 10])
def test_oracle_denoiser_recovers_ground_truth(schedule, depth):
    image = torch.rand(depth, 8, 8, generator=torch.Generator().manual_seed(0))
    recording = RecordingSchedule(schedule)
    oracle = Oracle(2 * image - 1, recording, batch_size=2)
    x_T = torch.randn(depth, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(oracle, x_T, recording, None, ALPHAS, num_steps=5, eta=0.85, batch_size=2,
                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)


def _analytic(x, t, separation):
    """A deterministic dummy denoiser: eps = 0.5 x + 0.01 separation."""
    return 0.5 * x + 0.01 * separation.reshape(-1, 1, 1, 1)


def _run(seed: int, eta: float = 0.85, steps: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(10, 6, 6, generator=g)
    return sample(_analytic, x_T, DiffusionBlendPPSchedule(3, 3), None, ALPHAS, num_steps=steps, eta=eta,
                  batch_size=3, generator=g)


def test_same_seed_same_volume():
    torch.testing.assert_close(_run(0), _run(0), rtol=0, atol=0)
    assert not torch.equal(_run(0), _run(1))


def test_regression_numbers():
    out = _run(0)
    assert out.shape == (10, 6, 6)
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # reference values of this exact configuration (update only with a deliberate change of the sampler)
    torch.testing.assert_close(out.mean(), torch.tensor(REFERENCE_MEAN), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(), torch.tensor(REFERENCE_STD), atol=1e-5, rtol=0)
    det = _run(0, eta=0.0)
    torch.testing.assert_close(det.mean(), torch.tensor(REFERENCE_MEAN_ETA0), atol=1e-5, rtol=0)


REFERENCE_MEAN = 0.479958
REFERENCE_STD = 0.363356
REFERENCE_MEAN_ETA0 = 0.505966


def test_data_consistency_is_called_on_unit_image():
    seen = []

    def dc(image):
        seen.append((float(image.min()), float(image.max())))
        return torch.full_like(image, 0.25)

    x_T = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(lambda x, t, s: torch.zeros_like(x), x_T, SliceSchedule(), dc, ALPHAS, num_steps=3, eta=0.5)
    assert len(seen) == 3 and all(0 <= lo and hi <= 1 for lo, hi in seen)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_timesteps():
    ts = ddim_timesteps(5, 1000)
    assert ts.tolist() == [999, 749, 500, 250, 0]
    assert ddim_timesteps(1, 1000).tolist() == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(0, 1000)


def test_counts_network_evaluations():
    calls = []

    def counting(x, t, s):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    sample(counting, torch.randn(10, 4, 4), FixedSchedule(3), None, ALPHAS, num_steps=3, batch_size=2)
    # 10 slices in slabs of 3: starts 0, 3, 6 and 7 -> 4 slabs, 2 calls per step
    assert sum(calls) == 3 * 4 and len(calls) == 3 * 2


def test_data_consistency_makes_the_volume_fit_the_measurements():
    """With a Gaussian prior (analytic eps) and CG data consistency, the result fits y = A x far better than without."""
    from bundle.geometry import sparse_view
    from bundle.operators import make_operator
    from bundle.recon.data_consistency import ConjugateGradientDC

    geometry = sparse_view(8, (5, 16, 16), (3.0, 3.0, 3.0))
    A = make_operator(geometry)
    truth = torch.zeros(geometry.vol_shape)
    truth[:, 4:12, 3:13] = 0.4
    truth[1:4, 6:9, 6:9] = 0.8
    y = A(truth)
    mean, var = 0.0, 0.5  # the prior of the model variable 2x-1: independent N(0, 0.5) voxels

    def gaussian(x, t, separation):
        a = ALPHAS[t].float().reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * var + 1 - a)

    def residual(image):
        return float((A(image) - y).norm() / y.norm())

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(geometry.vol_shape, generator=g)
    prior_only = sample(gaussian, x_T, FixedSchedule(3), None, ALPHAS, num_steps=10, generator=torch.Generator().manual_seed(1))
    fitted = sample(gaussian, x_T, FixedSchedule(3), ConjugateGradientDC(A, y, 5), ALPHAS, num_steps=10,
                    generator=torch.Generator().manual_seed(1))
    assert residual(fitted) < 0.2 and residual(fitted) < 0.25 * residual(prior_only)
    assert float((fitted - truth).abs().mean()) < float((prior_only - truth).abs().mean())


def test_warm_start_runs_the_remaining_steps_and_still_recovers_the_oracle():
    """Starting at step 3 of 5 from the clean volume diffused to that step's noise level: 2 steps, exact recovery."""
    depth = 7
    image = torch.rand(depth, 8, 8, generator=torch.Generator().manual_seed(0))
    recording = RecordingSchedule(DiffusionBlendPPSchedule(3, 3))
    oracle = Oracle(2 * image - 1, recording, batch_size=8)
    steps_seen = []
    t = int(ddim_timesteps(5, 1000)[3])
    a = float(ALPHAS[t])
    x_t = a**0.5 * (2 * image - 1) + (1 - a) ** 0.5 * torch.randn(depth, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(oracle, x_t, recording, None, ALPHAS, num_steps=5, eta=0.85, batch_size=8, start_step=3,
                 generator=torch.Generator().manual_seed(2), on_step=lambda step, x0: steps_seen.append(step))
    assert steps_seen == [3, 4]
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="start_step must be in \\[0, 4\\]"):
        sample(oracle, x_t, recording, None, ALPHAS, num_steps=5, start_step=5)
