"""Smoke runs of configs/train.json and multi_gpu_train.json through monai.bundle, resumption and bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.networks import SlabDenoiser, load_weights
from tests.conftest import TINY_NETWORK, subprocess_env, write_crop

pytestmark = pytest.mark.slow


def datalist(folder: Path, names: list[str], validation: list[str] = ()) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": n} for n in names], "validation": [{"image": n} for n in validation]}))
    return path


def train(root: Path, python: str, work: Path, *, configs: str = "configs/train.json", launcher: list[str] | None = None,
          check: bool = True, run_id: str | None = "training", **overrides) -> subprocess.CompletedProcess:
    """Run the training workflow on the tiny data in ``work`` with a tiny network.

    ``model_path`` keeps its default, ``@output_dir/model.pt``: no run of the tests writes to ``models/``.
    ``run_id=None`` gives no run id, so monai.bundle runs its default, ``run``.
    """
    settings = {
        "data_root": str(work), "datalist": str(work / "datalist.json"), "output_dir": str(work / "run"),
        "image_size": 32, "batch_size": 4,
        "samples_per_volume": 4, "max_epochs": 1, "warmup_iterations": 1, **TINY_NETWORK, **overrides,
    }
    cmd = (launcher or [python]) + ["-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", configs]
    for key, value in settings.items():
        cmd += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    proc = subprocess.run(cmd, cwd=root, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_crop(tmp_path / "a.nii.gz", xy=32, slices=8)
    write_crop(tmp_path / "b.nii.gz", xy=28, slices=6)
    datalist(tmp_path, ["a.nii.gz", "b.nii.gz"])
    return tmp_path


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of a run: ``(step, value)`` by tag, over all its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_train_config_validates_and_writes_loadable_weights(root: Path, python: str, work: Path) -> None:
    """Run with no run id: monai.bundle's default, ``run``, is the training (the zoo's convention, beside ``training``)."""
    write_crop(work / "val.nii.gz", xy=32, slices=5)
    datalist(work, ["a.nii.gz", "b.nii.gz"], validation=["val.nii.gz"])
    proc = train(root, python, work, run_id=None, max_epochs=2, val_interval=2, val_steps=2)
    best = torch.load(work / "run" / "model_best.pt", weights_only=True)
    assert set(best) == set(torch.load(work / "run" / "model.pt", weights_only=True))
    net = SlabDenoiser(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)
    state = torch.load(work / "run" / "model.pt", weights_only=True)
    assert set(state) == set(net.state_dict())
    load_weights(net, work / "run" / "model.pt")
    ckpt = torch.load(work / "run" / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert {"network", "ema", "optimizer", "lr_scheduler", "trainer", "random_states", "validation"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4

    # validated once, after epoch 2: its PSNR is the checkpointed best, logged with the SSIM and the learning rate
    logged = scalars(work / "run")
    assert {"train_loss", "lr", "val_psnr", "val_ssim"} <= set(logged), sorted(logged)
    assert logged["val_psnr"] == [(2, pytest.approx(ckpt["validation"]["best_metric"], abs=1e-4))]
    assert ckpt["validation"]["best_metric_epoch"] == 2 and 0.0 < logged["val_ssim"][0][1] < 1.0
    lrs = [value for _, value in sorted(logged["lr"])]
    assert len(lrs) == 4 and lrs[0] > lrs[-1] > 0  # one per iteration, after the warm-up, falling along the cosine
    assert "val_psnr: " in proc.stdout + proc.stderr  # MONAI's StatsHandler reports the validation


def test_2d_prior_trains_and_validates_with_the_same_config(root: Path, python: str, work: Path) -> None:
    """k = 1 (the dds2d / mbir prior): validation reconstructs slice by slice instead of blending slabs.

    Run as ``run run``: the zoo's run id names the training too.
    """
    write_crop(work / "val.nii.gz", xy=32, slices=5)
    datalist(work, ["a.nii.gz", "b.nii.gz"], validation=["val.nii.gz"])
    train(root, python, work, run_id="run", slab_size=1, separations=[1], val_interval=1, val_steps=2)
    assert (work / "run" / "model_best.pt").is_file()
    net = SlabDenoiser(
        slab_size=1, separations=[1], channels=(8, 16), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8
    )
    load_weights(net, work / "run" / "model.pt")
    state = torch.load(work / "run" / "model.pt", weights_only=True)
    assert state["unet.conv_in.conv.weight"].shape[1] == 1  # the saved prior takes one slice in


@pytest.mark.parametrize("configs", ["configs/train.json", "['configs/train.json', 'configs/train_augment.json']"])
def test_resume_matches_uninterrupted_run(root: Path, python: str, work: Path, configs: str) -> None:
    """Also with the augmentation overlay, whose affine draws must be checkpointed as well."""
    straight, split = work / "straight", work / "split"
    train(root, python, work, configs=configs, max_epochs=3, output_dir=str(straight))
    # interrupted after 2 of 6 iterations, then resumed from the checkpoint it left
    train(root, python, work, configs=configs, max_epochs=3, stop_after_iterations=2, output_dir=str(split))
    stopped = torch.load(split / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert stopped["trainer"]["iteration"] == 2
    resumed = train(root, python, work, configs=configs, max_epochs=3, output_dir=str(split))
    assert "Epoch: 1/3" not in resumed.stdout + resumed.stderr  # it went on from epoch 2

    a = torch.load(straight / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 6
    for key in ("network", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=1e-6)
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def test_init_from_weights_starts_from_them(root: Path, python: str, work: Path) -> None:
    torch.manual_seed(3)
    net = SlabDenoiser(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(net.state_dict(), work / "start.pt")
    # with a zero learning rate (the schedule's floor is 1e-6: two Adam steps move a weight by
    # at most ~2e-6) the run ends where it started, network and EMA alike; weights drawn
    # afresh would differ by ~0.05
    train(root, python, work, init_from=str(work / "start.pt"), learning_rate=0.0)
    ckpt = torch.load(work / "run" / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    for key in ("network", "ema"):
        for name, value in net.state_dict().items():
            torch.testing.assert_close(ckpt[key][name], value, rtol=0, atol=1e-5, msg=f"{key}.{name}")


def test_two_process_torchrun_on_cpu(root: Path, python: str, work: Path) -> None:
    launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train(root, python, work, configs="['configs/train.json','configs/multi_gpu_train.json']", launcher=launcher)
    ckpt = torch.load(work / "run" / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 1  # 8 slabs shared by 2 ranks, batch 4 each
    assert not any(k.startswith("module.") for k in ckpt["network"])
    assert (work / "run" / "model.pt").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"entry 1 of 'training' names .*gone\.nii\.gz, which does not exist"),
        ("unreadable", r"broken\.nii\.gz"),
        ("thin", r"b\.nii\.gz: 2 axial slices, but at least 3 are needed"),
        ("nan", r"b\.nii\.gz: the volume contains NaN"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(root: Path, python: str, work: Path, case: str, message: str) -> None:
    if case == "missing":
        datalist(work, ["a.nii.gz", "gone.nii.gz"])
    elif case == "unreadable":
        (work / "broken.nii.gz").write_bytes(b"\x1f\x8b not a volume")
        datalist(work, ["a.nii.gz", "broken.nii.gz"])
    else:
        hu = np.asarray(nib.load(work / "b.nii.gz").dataobj).astype(np.float32)
        hu = hu[..., :2] if case == "thin" else np.where(np.arange(hu.size).reshape(hu.shape) == 7, np.nan, hu)
        nib.save(nib.Nifti1Image(hu, nib.load(work / "b.nii.gz").affine), work / "b.nii.gz")
    proc = train(root, python, work, check=False)
    assert proc.returncode != 0
    import re

    assert re.search(message, proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]
    ckpts = list((work / "run" / "checkpoints").glob("*")) if (work / "run" / "checkpoints").exists() else []
    assert ckpts == [] and not (work / "run" / "model.pt").exists()
