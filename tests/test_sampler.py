"""The DiffusionBlend sampler: oracle recovery, determinism, regression numbers with an analytic denoiser."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from bundle.recon.partitions import DiffusionBlendPPSchedule, FixedSchedule, Partition, PartitionSchedule, SliceSchedule
from bundle.recon.sampler import ddim_timesteps, sample

# the regression numbers below are for this schedule (the shipped priors' one, written out so that they stay put)
ALPHAS = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02).alphas_cumprod


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


def test_timestep_power_crowds_the_times_towards_zero_and_keeps_them_distinct():
    assert ddim_timesteps(5, 1000, 2.0).tolist() == [999, 562, 250, 62, 0]  # 999 (1 - i/4)^2
    assert torch.equal(ddim_timesteps(50, 1000, 1.0), torch.linspace(999, 0, 50).round().long())  # the paper's
    for steps, power in [(50, 2.0), (200, 2.0), (500, 3.0), (1000, 1.5)]:
        times = ddim_timesteps(steps, 1000, power)
        gaps = times[:-1] - times[1:]
        assert len(times) == steps and times[0] == 999 and times[-1] == 0 and int(gaps.min()) >= 1
        assert gaps[-1] <= gaps[0]  # denser at low noise
    assert ddim_timesteps(1000, 1000, 3.0).tolist() == list(range(999, -1, -1))  # every time once
    with pytest.raises(ValueError, match="timestep_power must be >= 1"):
        ddim_timesteps(50, 1000, 0.5)


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
    from bundle.physics.geometry import sparse_view
    from bundle.physics.operators import make_operator
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


# --- a Gaussian prior, whose exact eps is known in closed form -------------------------------------------------------
# Data 2x-1 ~ N(MU, VAR) voxel by voxel, so x_t ~ N(sqrt(a) MU, a VAR + 1 - a) and E[eps | x_t] =
# sqrt(1-a) (x_t - sqrt(a) MU) / (a VAR + 1 - a). MU +- 4.5 sd stays inside [-1, 1]: the sampler's clipping of x0
# touches a few voxels in a million, far below the tolerances.
MU, VAR = 0.1, 0.04


def _gaussian_eps(x, t, separation):
    a = ALPHAS[t].double().reshape(-1, 1, 1, 1)
    return ((1 - a).sqrt() * (x - a.sqrt() * MU) / (a * VAR + 1 - a)).float()


def _predicted_moments(num_steps: int, eta: float, power: float = 1.0) -> tuple[float, float]:
    """Mean and variance of the sampler's output (model variable) with the exact eps, from x_T ~ N(0, 1).

    Every step is affine in x_t, so the moments follow in closed form: x0 = alpha x_t + beta,
    eps = gamma x_t + delta, and the re-noise ``x_prev = sqrt(a') x0 + sqrt(1-a') (eta z + sqrt(1-eta^2) eps)``.
    """
    alphas = ALPHAS.double()
    times = ddim_timesteps(num_steps, len(alphas), power).tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(times):
        a = float(alphas[t])
        a_prev = float(alphas[times[i + 1]]) if i + 1 < len(times) else 1.0
        v = a * VAR + 1 - a
        alpha, beta = a**0.5 * VAR / v, (1 - a) * MU / v
        gamma, delta = (1 - a) ** 0.5 / v, -((1 - a) * a) ** 0.5 * MU / v
        x0_mean, x0_var = alpha * mean + beta, alpha**2 * var
        keep = (1 - a_prev) ** 0.5 * (1 - eta**2) ** 0.5
        c, d = a_prev**0.5 * alpha + keep * gamma, a_prev**0.5 * beta + keep * delta
        mean, var = c * mean + d, c**2 * var + (1 - a_prev) * eta**2
    return x0_mean, x0_var


@pytest.fixture
def one_thread():
    """Elementwise work on a few 100k voxels: one thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian_samples(shape: tuple[int, int, int], num_steps: int, eta: float, power: float = 1.0) -> torch.Tensor:
    """The sampler's output with the exact Gaussian eps and no data consistency, in the model variable 2x-1."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    out = sample(_gaussian_eps, x_T, SliceSchedule(), None, ALPHAS, num_steps=num_steps, eta=eta,
                 batch_size=shape[0], generator=g, timestep_power=power)
    return (2 * out - 1).double()


def test_gaussian_prior_deterministic_ddim_samples_the_prior(one_thread):
    """eta = 0 is DDIM's probability-flow discretisation: with 1000 steps its samples have the prior's mean and variance.

    The closed form gives the discretisation error: variance 0.0394 instead of 0.04 (-1.5 %); the sample
    variance of 131k voxels scatters by 0.4 %.
    """
    x = _gaussian_samples((8, 128, 128), num_steps=1000, eta=0.0)
    assert abs(float(x.mean()) - MU) < 2e-3  # the standard error is 5e-4
    assert abs(float(x.var()) / VAR - 1) < 0.03


@pytest.mark.parametrize(("eta", "power"), [(0.0, 1.0), (0.85, 1.0), (1.0, 1.0), (0.0, 2.0), (0.85, 2.0)])
def test_gaussian_prior_moments_follow_the_renoise_step(one_thread, eta, power):
    """At any eta, the sample mean and variance are the closed-form moments of the re-noise step (50 steps, 262k voxels).

    A wrong coefficient of the re-noise (``1-a_t`` for ``1-a_prev``, ``1-eta^2`` without the root, eta on eps)
    moves the variance by 10 % or more; the sample variance scatters by 0.3 %. With this (DDS) re-noise the
    variance at eta > 0 stays below the prior's: the fresh noise replaces the predicted eps, so the result
    is the spread of E[x0 | x_t] (eta = 1: 0.019 instead of 0.04 even at 1000 steps; eta = 0 tends to the prior).
    The quadratic time grid (``timestep_power`` 2) moves the variance by 16-18 % at 50 steps (at eta = 0 closer to
    the prior's: 0.0366 against 0.0309), so the sampler must follow the grid it is given.
    """
    x = _gaussian_samples((16, 128, 128), num_steps=50, eta=eta, power=power)
    mean, var = _predicted_moments(50, eta, power)
    assert abs(float(x.mean()) - mean) < 2e-3  # the standard error is 4e-4
    assert abs(float(x.var()) / var - 1) < 0.02


def test_the_blend_is_a_parameter():
    """``sample(..., blend=...)`` runs the given blend once a step with the step's partition; the default is the local blend."""
    from bundle.recon.partitions import blend as local_blend

    calls = []

    def recording(denoiser, x_t, t, partition, batch_size):
        calls.append((t, partition.separation, batch_size))
        return local_blend(denoiser, x_t, t, partition, batch_size)

    g, x_T = torch.Generator().manual_seed(0), torch.randn(10, 6, 6, generator=torch.Generator().manual_seed(0))
    out = sample(_analytic, x_T, DiffusionBlendPPSchedule(3, 3), None, ALPHAS, num_steps=4, batch_size=3, generator=g,
                 blend=recording)  # fmt: skip
    assert [(sep, b) for _, sep, b in calls] == [(1, 3), (3, 3), (1, 3), (3, 3)]
    assert [t for t, _, _ in calls] == ddim_timesteps(4, 1000).tolist()
    default = sample(_analytic, x_T, DiffusionBlendPPSchedule(3, 3), None, ALPHAS, num_steps=4, batch_size=3,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(out, default)
