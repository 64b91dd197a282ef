"""One noise schedule and one jump separation: defined in configs/inference.json, read by training, validation and inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler

from bundle.recon.inferers import DiffusionBlendInferer, make_inferer
from bundle.recon.noise_schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]


def _bundle_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **inference_changes) -> Path:
    """A copy of the configs with ``inference.json`` changed; the working directory is the copy (``%`` paths are relative)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    path = tmp_path / "configs" / "inference.json"
    config = json.loads(path.read_text())
    for key, value in inference_changes.items():
        assert key in config, f"configs/inference.json has no {key!r}"
        config[key] = value
    path.write_text(json.dumps(config, indent=4))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _parser(bundle_root: Path, *names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / name) for name in names])
    parser.update({"bundle_root": str(bundle_root)})
    return parser


def _schedules_in_use(bundle_root: Path) -> dict[str, torch.Tensor]:
    """``alphas_cumprod`` of every place that uses the schedule, and the T that training draws times from."""
    inference = _parser(bundle_root, "inference.json")
    train = _parser(bundle_root, "train.json")
    evaluate = _parser(bundle_root, "inference.json", "evaluate.json")
    evaluate_settings = evaluate.get_parsed_content("evaluation#inferer_settings", instantiate=True)
    prepare_batch = train.get_parsed_content("trainer#prepare_batch")
    return {
        "inference": inference.get_parsed_content("inferer").alphas_cumprod,
        "training": train.get_parsed_content("trainer#inferer").scheduler.alphas_cumprod,
        "validation": train.get_parsed_content("validation#inferer").alphas_cumprod,
        "evaluation": make_inferer("dbpp", **evaluate_settings).alphas_cumprod,
        "training_times": torch.arange(prepare_batch.num_train_timesteps),
    }


def test_the_shipped_schedule_is_the_shipped_priors():
    """T = 1000, linear betas 1e-4 .. 0.02 (what models/model.pt was trained with) everywhere, and as the Python default."""
    expected = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    used = _schedules_in_use(ROOT)
    assert len(used.pop("training_times")) == 1000
    for place, alphas_cumprod in used.items():
        torch.testing.assert_close(alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0, msg=place)
    torch.testing.assert_close(make_inferer("dbpp").alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0)
    assert NoiseSchedule() == _parser(ROOT, "inference.json").get_parsed_content("noise_schedule")


def test_changing_the_schedule_in_inference_json_changes_every_user(tmp_path, monkeypatch):
    changed = {"_target_": "bundle.recon.noise_schedule.NoiseSchedule", "num_train_timesteps": 500,
               "schedule": "scaled_linear_beta", "beta_start": 0.0005, "beta_end": 0.015}
    root = _bundle_copy(tmp_path, monkeypatch, noise_schedule=changed)
    expected = DDPMScheduler(num_train_timesteps=500, schedule="scaled_linear_beta", beta_start=0.0005, beta_end=0.015)
    used = _schedules_in_use(root)
    assert len(used.pop("training_times")) == 500
    for place, alphas_cumprod in used.items():
        torch.testing.assert_close(alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0, msg=place)


@pytest.mark.parametrize(
    "change, separation",
    [({}, 3), ({"separations": [1, 2]}, 2), ({"jump_separation": 2}, 2)],
)
def test_one_jump_separation_for_validation_and_inference(tmp_path, monkeypatch, change, separation):
    """The jump steps' separation is max(separations) unless set, in inference.json only; training validation reads it."""
    root = _bundle_copy(tmp_path, monkeypatch, **change)
    inference = _parser(root, "inference.json").get_parsed_content("inferer")
    validation = _parser(root, "train.json").get_parsed_content("validation#inferer")
    evaluation = _parser(root, "inference.json", "evaluate.json").get_parsed_content("evaluation#inferer_settings")
    assert inference.schedule.interleaved.separation == validation.schedule.interleaved.separation == separation
    assert evaluation["separation"] == separation


def test_noise_schedule_value_object():
    schedule = NoiseSchedule(num_train_timesteps=200, schedule="linear_beta", beta_start=2e-4, beta_end=0.03)
    assert eval(repr(schedule)) == schedule  # noqa: S307 - a repr that rebuilds
    torch.testing.assert_close(
        schedule.alphas_cumprod,
        DDPMScheduler(num_train_timesteps=200, beta_start=2e-4, beta_end=0.03).alphas_cumprod,
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(schedule.scheduler().betas, torch.linspace(2e-4, 0.03, 200), rtol=0, atol=1e-8)
    assert len(NoiseSchedule(num_train_timesteps=50, schedule="cosine").alphas_cumprod) == 50
    assert len(DiffusionBlendInferer(noise_schedule=schedule).alphas_cumprod) == 200
    assert len(DiffusionBlendInferer(noise_schedule=DDPMScheduler(num_train_timesteps=300)).alphas_cumprod) == 300


def test_noise_schedule_errors():
    with pytest.raises(ValueError, match=r"noise_schedule: schedule must be one of \[.*'linear_beta'.*got 'linear'"):
        NoiseSchedule(schedule="linear")
    with pytest.raises(ValueError, match="noise_schedule: num_train_timesteps must be >= 1, got 0"):
        NoiseSchedule(num_train_timesteps=0)
    with pytest.raises(TypeError, match="noise_schedule must be a NoiseSchedule .* got int"):
        DiffusionBlendInferer(noise_schedule=1000)
