"""Training checkpoints through monai.bundle: a crash never overwrites them, a corrupt one is skipped, publishing is explicit."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from bundle.networks import SlabDenoiser, load_weights
from tests.conftest import ROOT, TINY_NETWORK, write_crop
from tests.test_train_workflow import datalist, train, work  # noqa: F401  (work: the two-volume training folder fixture)

TINY = {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 8, "num_head_channels": 8}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_default_training_writes_inside_its_output_dir_and_leaves_models_untouched(root: Path, python: str, work: Path) -> None:
    shipped = {path: sha256(path) for path in sorted((root / "models").glob("*.pt"))}
    train(root, python, work)  # model_path not overridden: the default of configs/train.json
    assert {path: sha256(path) for path in sorted((root / "models").glob("*.pt"))} == shipped
    load_weights(SlabDenoiser(**TINY), work / "run" / "model.pt")


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_named_and_the_older_one_resumed(root: Path, python: str, work: Path) -> None:
    # 2 iterations per epoch; a periodic checkpoint at iteration 2, the final one at iteration 3
    train(root, python, work, max_epochs=3, save_interval=2, stop_after_iterations=3)
    ckpt_dir = work / "run" / "checkpoints"
    latest = ckpt_dir / "checkpoint_latest.pt"
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 3
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as by a kill while saving

    resumed = train(root, python, work, max_epochs=3, save_interval=2)
    log = resumed.stdout + resumed.stderr
    assert f"skipping the training checkpoint {latest}" in log, log[-3000:]
    assert f"Restored all variables from {ckpt_dir / 'checkpoint_checkpoint_iteration=2.pt'}" in log, log[-3000:]
    assert "Epoch: 1/3" not in log  # went on from iteration 2, not from scratch
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 6


@pytest.mark.slow
def test_no_loadable_checkpoint_stops_instead_of_starting_afresh(root: Path, python: str, work: Path) -> None:
    ckpt_dir = work / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "checkpoint_latest.pt").write_bytes(b"PK\x03\x04 truncated")
    proc = train(root, python, work, check=False)
    assert proc.returncode != 0
    assert "none of its 1 checkpoint(s) loads" in proc.stderr, proc.stderr[-3000:]
    assert (ckpt_dir / "checkpoint_latest.pt").read_bytes() == b"PK\x03\x04 truncated"
    assert not (work / "run" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, settings, message",
    [
        # a resumed run whose network no longer matches its checkpoint fails at start-up, where
        # MONAI's saver wrote the untrained network over checkpoint_latest.pt
        ("other network", {"network_def": {**TINY_NETWORK["network_def"], "channels": [8, 32]}},
         r"resume_from \S*checkpoint_latest\.pt: the checkpoint does not fit this run"),
        # the loss turns NaN (injected through the trainer's loss setting): TerminateOnNan stops the
        # run with NaN weights, which MONAI's saver wrote as the final checkpoint
        ("nan loss", {"trainer#loss_function": "$lambda p, t: torch.nn.functional.mse_loss(p, t) * float('nan')"},
         r"contains NaN or Inf\. Stop training"),
    ],
)
def test_a_failed_run_keeps_the_good_checkpoint(root: Path, python: str, work: Path, case: str, settings: dict,
                                                message: str) -> None:
    train(root, python, work, max_epochs=1)
    latest, weights = work / "run" / "checkpoints" / "checkpoint_latest.pt", work / "run" / "model.pt"
    before = latest.read_bytes(), weights.read_bytes()

    proc = train(root, python, work, check=False, max_epochs=3, **settings)
    log = proc.stdout + proc.stderr
    assert re.search(message, log), log[-3000:]
    if case == "other network":
        assert proc.returncode != 0
        assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]  # the last line says it
    else:
        assert "weights of network, ema are not finite" in log, log[-3000:]
    assert (latest.read_bytes(), weights.read_bytes()) == before
    assert [p.name for p in latest.parent.glob("*.pt")] == ["checkpoint_latest.pt"]


@pytest.mark.slow
def test_resumed_training_keeps_model_best_when_validation_is_worse(root: Path, python: str, work: Path) -> None:
    write_crop(work / "val.nii.gz", xy=32, slices=5)
    datalist(work, ["a.nii.gz", "b.nii.gz"], validation=["val.nii.gz"])
    validate = {"val_interval": 1, "val_steps": 2}
    train(root, python, work, max_epochs=1, **validate)
    latest, best = work / "run" / "checkpoints" / "checkpoint_latest.pt", work / "run" / "model_best.pt"
    ckpt = torch.load(latest, weights_only=True)
    assert 0.0 < ckpt["validation"]["best_metric"] < 100.0  # the PSNR of the first validation, in dB
    assert ckpt["validation"]["best_metric_epoch"] == 1

    # a best PSNR no validation reaches: every later validation is worse
    ckpt["validation"]["best_metric"] = 1000.0
    torch.save(ckpt, latest)
    kept = best.read_bytes()
    train(root, python, work, max_epochs=2, **validate)
    assert best.read_bytes() == kept
    assert torch.load(latest, weights_only=True)["validation"] == {"best_metric": 1000.0, "best_metric_epoch": 1}

    # a checkpoint written before the validation state was checkpointed still resumes
    ckpt = torch.load(latest, weights_only=True)
    del ckpt["validation"]
    torch.save(ckpt, latest)
    resumed = train(root, python, work, max_epochs=3, **validate)
    assert "predates the checkpointing of validation" in resumed.stdout + resumed.stderr
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["trainer"]["iteration"] == 6 and 0.0 < ckpt["validation"]["best_metric"] < 100.0
    assert best.read_bytes() != kept  # the best PSNR started afresh, so the first validation wrote it


def publish(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``scripts/publish_weights.py`` with ``args`` (its ``main``, in this process); exit code, stdout, stderr."""
    spec = importlib.util.spec_from_file_location("publish_weights", ROOT / "scripts" / "publish_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        code = script.main(list(args))
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def inference_network(slab_size: int) -> SlabDenoiser:
    """A freshly initialised network of configs/inference.json's architecture."""
    return SlabDenoiser(slab_size=slab_size, separations=[1, 2, 3] if slab_size == 3 else [1], channels=(16, 32, 64, 128),
                        attention_levels=(False, False, False, True), num_res_blocks=1, norm_num_groups=8, num_head_channels=32)


@pytest.mark.parametrize("slab_size, kind", [(3, "state dict"), (3, "training checkpoint"), (1, "state dict")])
def test_publish_weights_writes_what_inference_loads(tmp_path: Path, capsys: pytest.CaptureFixture, slab_size: int,
                                                    kind: str) -> None:
    torch.manual_seed(0)
    ema = inference_network(slab_size).state_dict()
    source = tmp_path / "trained.pt"
    if kind == "training checkpoint":  # the EMA weights are published, not the raw network's
        torch.save({"network": inference_network(slab_size).state_dict(), "ema": ema, "trainer": {"iteration": 1}}, source)
    else:
        torch.save(ema, source)
    target = tmp_path / "models" / "model.pt"
    code, out, err = publish(capsys, str(source), "--to", str(target), "--slab_size", str(slab_size))
    assert code == 0, err[-2000:]
    assert f"sha256 {sha256(target)}, {target.stat().st_size} bytes" in out
    published = torch.load(target, weights_only=True)
    assert set(published) == set(ema)
    for name, value in ema.items():
        torch.testing.assert_close(published[name], value, rtol=0, atol=0)
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]  # no temporary file left


@pytest.mark.parametrize("source_slab_size, slab_size", [(1, 3), (3, 1)])
def test_publish_weights_refuses_another_network_and_keeps_the_target(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      source_slab_size: int, slab_size: int) -> None:
    source, target = tmp_path / "trained.pt", tmp_path / "model.pt"
    torch.save(inference_network(source_slab_size).state_dict(), source)
    target.write_bytes(b"the published weights")
    code, _, err = publish(capsys, str(source), "--to", str(target), "--slab_size", str(slab_size))
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert f"SRC checkpoint {source} was saved for another network" in last, err
    assert f"slab_size={slab_size}" in last
    assert target.read_bytes() == b"the published weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "trained.pt"]


def test_publish_weights_refuses_a_file_that_does_not_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "trained.pt"
    source.write_bytes(b"\x80\x04 not a checkpoint")
    code, _, err = publish(capsys, str(source), "--to", str(tmp_path / "model.pt"))
    assert code != 0
    assert f"SRC {source} does not load with weights_only=True" in err.strip().splitlines()[-1]
    assert not (tmp_path / "model.pt").exists()
