"""bf16 mixed precision of the denoiser: detection of native support, the setting, and both precisions agreeing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from bundle.physics.geometry import sparse_view
from bundle.networks import SlabDenoiser
from bundle.physics.operators import make_operator
from bundle.precision import autocast, cpu_bf16_flags, inference_weights, native_bf16, resolve_mixed_precision
from bundle.recon.inferers import make_inferer
from bundle.workflows.training import SlabDiffusionInferer

TINY = {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 8, "num_head_channels": 8}


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return str(path)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("", ()), ("avx512f avx512_bf16", ("avx512_bf16",)), ("amx_tile amx_bf16 avx512_bf16", ("amx_bf16", "avx512_bf16"))],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, expected: tuple) -> None:
    assert cpu_bf16_flags(_cpuinfo(tmp_path, flags)) == expected


def test_auto_follows_the_cpu_of_this_machine() -> None:
    """``auto`` is bf16 exactly where this CPU reports AMX-BF16 or AVX512-BF16; fp32 elsewhere (CI's CPU may have neither)."""
    native = bool(cpu_bf16_flags())
    assert native_bf16("cpu") is native
    assert resolve_mixed_precision("auto", "cpu") is native
    assert resolve_mixed_precision("AUTO", torch.device("cpu")) is native
    if not native:
        print("this CPU has no native bf16 (no amx_bf16 / avx512_bf16 flag): auto picks fp32")


def test_explicit_settings_and_bad_values() -> None:
    assert resolve_mixed_precision("true", "cpu") is True
    assert resolve_mixed_precision(False, "cpu") is False
    with pytest.raises(ValueError, match="mixed_precision must be true or false, got 'fast'"):
        resolve_mixed_precision("fast", "cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        make_inferer("dbpp", mixed_precision="fast")


def test_autocast_runs_the_network_in_bf16_only_when_enabled() -> None:
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", True):
        assert layer(x).dtype == torch.bfloat16
    with autocast("cpu", False):
        assert layer(x).dtype == torch.float32


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    network = SlabDenoiser(**TINY).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution: give the untrained net an output
        network.unet.out[2].conv.weight.normal_(0, 0.05)
    geometry = sparse_view(6, (6, 16, 16), (3.0, 3.0, 3.0))
    operator = make_operator(geometry)
    x = torch.zeros(geometry.vol_shape)
    x[:, 4:12, 5:11] = 0.3
    return network, operator, operator(x)


def test_bf16_reconstruction_matches_fp32_and_reports_its_precision(problem) -> None:
    network, operator, y = problem
    runs = {}
    for precision in (False, True):
        inferer = make_inferer("dbpp", steps=3, seed=0, batch_size=4, mixed_precision=precision)
        runs[precision] = (inferer(y, network, operator), inferer.precision(y.device))
    (fp32, p32), (bf16, p16) = runs[False], runs[True]
    assert (p32, p16) == ("fp32", "bf16")
    assert fp32.dtype == bf16.dtype == torch.float32  # the sampler's arithmetic stays fp32
    assert (fp32 - bf16).abs().max() < 0.05
    assert not torch.equal(fp32, bf16)  # bf16 really ran


def test_sampling_holds_a_bf16_copy_of_the_weights_and_leaves_the_callers_network_fp32(problem) -> None:
    network, operator, y = problem
    copy = inference_weights(network, True)
    assert copy is not network and {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    assert inference_weights(network, False) is network
    assert inference_weights(copy, True) is copy  # already bf16: no second copy
    analytic = lambda x, t, s: torch.zeros_like(x)  # noqa: E731  (not a module: passed through)
    assert inference_weights(analytic, True) is analytic

    # the sampler's view of it: the same reconstruction as autocast over fp32 weights, to bf16 rounding
    inferer = make_inferer("dbpp", steps=3, seed=0, batch_size=4, mixed_precision=True)
    recon = inferer(y, copy, operator)
    fp32 = make_inferer("dbpp", steps=3, seed=0, batch_size=4, mixed_precision=False)(y, network, operator)
    assert recon.dtype == torch.float32 and (recon - fp32).abs().max() < 0.05
    assert {p.dtype for p in network.parameters()} == {torch.float32}  # a bf16 run left the caller's weights alone


def test_training_inferer_autocasts_the_network_and_returns_fp32(problem) -> None:
    network, _, _ = problem
    network = network.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x = torch.randn(2, 3, 16, 16)
    noise, t, s = torch.randn_like(x), torch.tensor([5, 500]), torch.tensor([1, 3])
    eps = {p: SlabDiffusionInferer(scheduler, mixed_precision=p)(x, network, noise, t, s) for p in (False, True)}
    assert eps[True].dtype == eps[False].dtype == torch.float32
    assert torch.allclose(eps[True], eps[False], atol=0.05, rtol=0.05)
    loss = torch.nn.functional.mse_loss(eps[True], noise)
    loss.backward()  # gradients flow through the bf16 forward pass
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters() if p.requires_grad)
