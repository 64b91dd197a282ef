"""Methods behind one switch: make_inferer, the diffusion inferer wired from objects, its checks, counts and determinism."""

from __future__ import annotations

import re

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.physics.geometry import sparse_view
from bundle.networks import SlabDenoiser
from bundle.physics.operators import make_operator
from bundle.recon.data_consistency import ConjugateGradientDC, ZTVDataConsistency
from bundle.recon.inferers import (
    METHODS,
    DiffusionBlendInferer,
    accepted_settings,
    check_settings,
    make_inferer,
    method_slab_size,
)
from bundle.recon.noise_schedule import NoiseSchedule
from bundle.recon.partitions import DiffusionBlendPPSchedule, ShiftedSchedule, SliceSchedule
from bundle.workflows.profiling import CountedNetwork

TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}


@pytest.fixture(scope="module")
def problem():
    geometry = sparse_view(6, (5, 16, 16), (3.0, 3.0, 3.0))
    operator = make_operator(geometry)
    x = torch.zeros(geometry.vol_shape)
    x[:, 4:12, 5:11] = 0.3
    return operator, operator(x)


def test_switch():
    assert METHODS == ("dbpp", "db", "fixed", "dds2d", "mbir", "fbp", "sirt", "tv")
    assert isinstance(make_inferer().schedule, DiffusionBlendPPSchedule)
    assert isinstance(make_inferer("db").schedule, ShiftedSchedule)
    assert isinstance(make_inferer("dds2d", slab_size=3).schedule, SliceSchedule)
    assert make_inferer("mbir").data_consistency.func is ZTVDataConsistency
    assert make_inferer("dbpp", cg_iterations=2).data_consistency.keywords == {"iterations": 2, "lam": 0.0}
    assert [make_inferer(m).method for m in METHODS] == list(METHODS)
    assert [method_slab_size(m) for m in ("dbpp", "dds2d", "fbp")] == [3, 1, None]
    with pytest.raises(ValueError, match="unknown reconstruction method 'magic'"):
        make_inferer("magic")


def test_data_consistency_setting_chooses_the_step_of_the_blending_methods():
    """``data_consistency`` picks CG or z-TV for the slab methods; the 2D methods keep the step they are defined by."""
    ztv = make_inferer("dbpp", data_consistency="ztv", cg_iterations=3, tv_lambda=2e-4).data_consistency
    assert ztv.func is ZTVDataConsistency
    assert ztv.keywords == {"iterations": 3, "admm_iterations": 1, "rho": 1e-3, "lam": 2e-4}
    assert make_inferer("db").data_consistency.func is ConjugateGradientDC  # the default: plain DDS
    assert make_inferer("dds2d", data_consistency="ztv").data_consistency.func is ConjugateGradientDC
    assert make_inferer("mbir", data_consistency="cg").data_consistency.func is ZTVDataConsistency
    with pytest.raises(ValueError, match=r"data_consistency must be one of \['cg', 'ztv'\], got 'tv'"):
        make_inferer("dbpp", data_consistency="tv")


def test_settings_of_another_method_are_allowed_unknown_ones_raise():
    """One set of settings drives every method; a name that no method takes (a typo) is an error, never a no-op."""
    assert make_inferer("sirt", steps=3, n_iter=4).n_iter == 4  # steps: a diffusion setting, ignored by SIRT
    assert make_inferer("dbpp", steps=3, n_iter=4, lam=1e-3).steps == 3  # n_iter, lam: classical settings
    with pytest.raises(ValueError, match=r"unknown reconstruction setting 'cg_lamda'.*did you mean 'cg_lambda'\?"):
        make_inferer("dbpp", cg_lamda=0.1)
    with pytest.raises(ValueError, match=r"unknown reconstruction setting 'n_iters'.*did you mean 'n_iter'\?"):
        make_inferer("sirt", n_iters=10)
    with pytest.raises(ValueError, match=r"unknown reconstruction setting 'num_train_timesteps'.*'noise_schedule'"):
        make_inferer("dbpp", num_train_timesteps=500)  # the schedule is one object now (configs/inference.json)
    with pytest.raises(ValueError, match=r"unknown reconstruction setting 'qqq'.*the settings are \["):
        make_inferer("fbp", qqq=1)
    assert {"steps", "n_iter", "lam", "filter_name", "noise_schedule"} <= accepted_settings()


@pytest.mark.parametrize("config", [["inference.json"], ["inference.json", "evaluate.json"]])
def test_configs_pass_only_known_settings(root, config):
    """The configs' inferer settings all exist (a typo there would now stop the run; here it stops the test)."""
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in config])
    parser.update({"bundle_root": str(root)})
    inferer = parser.get("inferer")
    settings = {k: v for k, v in inferer.items() if not k.startswith("_") and k != "method"}
    if "evaluation" in parser:
        settings.update(parser.get("evaluation#inferer_settings"))
    check_settings(settings)


def test_the_evaluation_passes_every_method_setting_of_the_inference_config(root):
    """A setting that inference reads and the evaluation does not (mixed_precision was one) would be ignored there silently."""
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in ("inference.json", "evaluate.json")])
    inference = {k for k in parser.get("inferer") if not k.startswith("_")}
    evaluation = set(parser.get("evaluation#inferer_settings"))
    # the method and seed are set per cell; the blend shards one reconstruction (the evaluation spreads cells over ranks)
    assert inference - evaluation == {"method", "seed", "blend"}


def test_diffusion_inferer_counts_and_is_deterministic(problem):
    operator, y = problem
    torch.manual_seed(0)
    network = CountedNetwork(SlabDenoiser(slab_size=3, **TINY))  # what the workflow passes: it counts, the inferer does not
    inferer = make_inferer("dbpp", steps=3, batch_size=2, seed=5)
    first = inferer(y, network, operator)
    assert first.shape == (5, 16, 16) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert inferer.nfe == 3 and network.calls >= 3 and network.slabs >= 3 * 2 and network.seconds > 0
    assert inferer.working_shape(operator, network) == (5, 16, 16) and inferer.precision("cpu") in ("fp32", "bf16")
    torch.testing.assert_close(inferer(y, network, operator), first, rtol=0, atol=0)
    assert not torch.equal(inferer(y, network, operator, seed=6), first)
    assert not hasattr(inferer, "stats")  # the cost is measured around the call (bundle.workflows.profiling)


def test_diffusion_inferer_is_wired_from_objects_in_a_config(problem):
    """A partition schedule, a data-consistency factory (``"_mode_": "callable"``, a partial) and the noise schedule: the same as make_inferer's."""
    operator, y = problem
    parser = ConfigParser(
        {
            "inferer": {
                "_target_": "bundle.recon.inferers.DiffusionBlendInferer",
                "schedule": {"_target_": "bundle.recon.partitions.ShiftedSchedule", "slab_size": 3},
                "data_consistency": {"_target_": "bundle.recon.data_consistency.ConjugateGradientDC", "_mode_": "callable", "iterations": 2},
                "noise_schedule": {"_target_": "bundle.recon.noise_schedule.NoiseSchedule", "num_train_timesteps": 500},
                "steps": 3,
                "batch_size": 4,
                "seed": 2,
                "method": "db",
            }
        }
    )
    wired = parser.get_parsed_content("inferer")
    switched = make_inferer("db", steps=3, batch_size=4, seed=2, cg_iterations=2, noise_schedule=NoiseSchedule(num_train_timesteps=500))
    assert wired.data_consistency.func is ConjugateGradientDC and len(wired.alphas_cumprod) == 500
    torch.manual_seed(0)
    network = SlabDenoiser(slab_size=3, **TINY)
    torch.testing.assert_close(wired(y, network, operator), switched(y, network, operator), rtol=0, atol=0)
    assert repr(wired).startswith("DiffusionBlendInferer(method='db', schedule=ShiftedSchedule(slab_size=3)")
    assert "data_consistency=ConjugateGradientDC(iterations=2)" in repr(wired)


def test_diffusion_inferer_checks(problem):
    operator, y = problem
    network_2d = SlabDenoiser(slab_size=1, separations=(1,), **TINY)
    with pytest.raises(ValueError, match="slab_size=3.*slab_size=1"):
        make_inferer("dbpp", steps=2)(y, network_2d, operator)
    with pytest.raises(ValueError, match="sinogram has shape"):
        make_inferer("dds2d", steps=2)(y[:, :-1], network_2d, operator)
    with pytest.raises(TypeError, match="schedule must be a partition schedule"):
        DiffusionBlendInferer(schedule="dbpp")  # objects, not string switches
    with pytest.raises(TypeError, match="data_consistency must be a factory"):
        DiffusionBlendInferer(data_consistency="cg")
    with pytest.raises(ValueError, match=re.escape("steps must be <= num_train_timesteps (200), got 300")):
        DiffusionBlendInferer(noise_schedule=NoiseSchedule(num_train_timesteps=200), steps=300)
    with pytest.raises(ValueError, match="warm_start_method must be a classical method"):
        DiffusionBlendInferer(warm_start_method=make_inferer("dbpp"))


def test_classical_inferer_follows_the_same_convention(problem):
    operator, y = problem
    inferer = make_inferer("fbp")
    out = inferer(y, None, operator, seed=3)
    assert out.shape == (5, 16, 16) and inferer.nfe == 0 and inferer.slab_size is None and inferer.method == "fbp"


def test_warm_start_starts_from_the_classical_reconstruction(problem):
    """warm_start skips that share of the steps; the start is the SIRT image diffused to the first step's noise level."""
    operator, y = problem
    torch.manual_seed(0)
    network = SlabDenoiser(slab_size=3, **TINY)
    cold, cold_network = make_inferer("dbpp", steps=10, batch_size=8, seed=1), CountedNetwork(network)
    cold(y, cold_network, operator)
    warm = make_inferer("dbpp", steps=10, batch_size=8, seed=1, warm_start=0.7, warm_start_method="sirt")
    warm_network = CountedNetwork(network)
    out = warm(y, warm_network, operator)
    assert warm.start_step == 7 and warm.nfe == 3 and cold.nfe == 10
    assert warm_network.slabs == cold_network.slabs * 3 // 10
    assert out.shape == (5, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1

    # the start volume: sqrt(a_t) (2 sirt - 1) + sqrt(1 - a_t) z on the (here unpadded) working volume
    sirt = make_inferer("sirt")(y, None, operator).clamp(0, 1)  # the same call convention as every method
    generator = torch.Generator().manual_seed(1)
    crop = (slice(None),) * 3
    start = warm.start_volume((5, 16, 16), crop, operator, y, generator)
    z = torch.randn((5, 16, 16), generator=torch.Generator().manual_seed(1))
    a = float(warm.alphas_cumprod[int(torch.linspace(999, 0, 10).round()[7])])
    torch.testing.assert_close(start, a**0.5 * (2 * sirt - 1) + (1 - a) ** 0.5 * z, atol=1e-5, rtol=0)

    assert make_inferer("dbpp", steps=4, warm_start=0.99).start_step == 3  # always at least one step
    with pytest.raises(ValueError, match="warm_start must be a number >= 0 and < 1"):
        make_inferer("dbpp", warm_start=1.0)
    with pytest.raises(ValueError, match="warm_start_method"):
        make_inferer("dbpp", warm_start=0.5, warm_start_method="magic")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("steps", "abc", "steps must be an integer >= 1, got 'abc'"),
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("eta", "2", "eta must be a number >= 0 and <= 1, got '2'"),
        ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
        ("seed", -1, "seed must be an integer >= 0, got -1"),
        ("warm_start", 1, "warm_start must be a number >= 0 and < 1, got 1"),
        ("timestep_power", "0.5", "timestep_power must be a number >= 1, got '0.5'"),
    ],
)
def test_diffusion_settings_are_read_as_numbers_in_range_naming_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_inferer("dbpp", **{setting: value})
    assert make_inferer("dbpp", steps="7", eta="0.5").steps == 7  # the command line's strings are read
