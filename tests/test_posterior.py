"""draw_samples: one pure function for N reconstructions, their mean, std and counts."""

from __future__ import annotations

import pytest
import torch

from bundle.recon.method import ReconstructionMethod
from bundle.recon.posterior import draw_samples


class _Constant(ReconstructionMethod):
    """Returns ``seed`` everywhere: the mean and std of the samples are those of the seeds."""

    method = "constant"

    @property
    def nfe(self) -> int:
        return 5

    def __call__(self, inputs, network, operator, seed=None):
        return torch.full((2, 3, 4), float(seed), dtype=torch.float64)


def test_mean_std_and_counts_of_the_seeds():
    posterior = draw_samples(_Constant(), torch.zeros(1), None, None, [1, 2, 3, 6])
    torch.testing.assert_close(posterior.mean, torch.full((2, 3, 4), 3.0))
    torch.testing.assert_close(posterior.std, torch.full((2, 3, 4), float(torch.tensor([1.0, 2, 3, 6]).std(unbiased=False))))
    assert posterior.mean.dtype == torch.float32 and posterior.mean.device.type == "cpu"
    assert (posterior.samples, posterior.nfe) == (4, 20)


def test_one_sample_is_the_reconstruction_itself():
    posterior = draw_samples(_Constant(), torch.zeros(1), None, None, range(7, 8))
    assert posterior.std is None and torch.equal(posterior.mean, torch.full((2, 3, 4), 7.0))
    with pytest.raises(ValueError, match="at least one seed"):
        draw_samples(_Constant(), torch.zeros(1), None, None, [])
