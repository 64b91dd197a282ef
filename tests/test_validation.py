"""Training validation: MONAI's evaluator scores reconstructions from simulated sinograms; its best PSNR guards model_best.pt."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from bundle.metrics import psnr, ssim
from bundle.networks import SlabDenoiser, load_weights
from bundle.physics.geometry import sparse_view
from bundle.physics.operators import make_operator
from bundle.recon.inferers import make_inferer
from bundle.transforms import SimulateSinogramd
from bundle.transforms.layout import to_zhw
from bundle.workflows.handlers import ReconstructionEvaluator, SaveBestWeights, SinogramPrepareBatch, VolumeMetric
from monai.data import Dataset

TINY = {"channels": (8, 16), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}
VOXEL = (3.0, 2.0, 2.0)  # (dz, dy, dx) mm
VIEWS = 6


def phantom(x: int, y: int, z: int) -> dict:
    """A channel-first ``(1, X, Y, Z)`` item: a box of soft tissue with a denser core, in normalised attenuation."""
    image = torch.zeros(1, x, y, z)
    image[:, 3:-3, 4:-4] = 0.2
    image[:, x // 2 - 2:x // 2 + 2, y // 2 - 2:y // 2 + 2] = 0.5
    return {"image": image}


def evaluator(items: list[dict], network: torch.nn.Module, best_path: Path) -> ReconstructionEvaluator:
    simulate = SimulateSinogramd(keys="image", n_views=VIEWS, voxel_size=VOXEL)
    return ReconstructionEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items, transform=simulate), batch_size=None),
        network=network,
        inferer=make_inferer("dbpp", steps=2, seed=0, mixed_precision=False),
        key_val_metric={"val_psnr": VolumeMetric(psnr)},
        additional_metrics={"val_ssim": VolumeMetric(ssim)},
        val_handlers=[SaveBestWeights(network, best_path)],
    )


@pytest.fixture
def network() -> SlabDenoiser:
    torch.manual_seed(0)
    return SlabDenoiser(**TINY)


def test_scores_are_bundle_metrics_of_the_reconstruction_from_the_simulated_sinogram(tmp_path: Path, network) -> None:
    """The evaluator gives the mean over volumes of psnr/ssim of inferer(A x, network, A), A the sparse-view projector."""
    items = [phantom(16, 16, 5), phantom(12, 16, 4)]
    engine = evaluator(items, network, tmp_path / "model_best.pt")
    engine.run(global_epoch=3)

    inferer = make_inferer("dbpp", steps=2, seed=0, mixed_precision=False)
    expected = {"val_psnr": [], "val_ssim": []}
    for item in items:
        x = to_zhw(item["image"])
        operator = make_operator(sparse_view(VIEWS, tuple(x.shape), VOXEL))
        with torch.no_grad():
            recon = inferer(operator(x), network, operator)
        expected["val_psnr"].append(psnr(recon, x))
        expected["val_ssim"].append(ssim(recon, x))
    for name, values in expected.items():
        assert engine.state.metrics[name] == pytest.approx(sum(values) / 2, abs=1e-5), name
    assert len(set(expected["val_psnr"])) == 2  # two volumes with different scores: the mean is over both
    assert (engine.state.best_metric, engine.state.best_metric_epoch) == (engine.state.metrics["val_psnr"], 3)
    load_weights(SlabDenoiser(**TINY), tmp_path / "model_best.pt")  # the first validation wrote a plain state dict


def test_a_restored_best_metric_keeps_model_best_until_a_better_model(tmp_path: Path, network) -> None:
    best = tmp_path / "model_best.pt"
    items = [phantom(16, 16, 4)]
    first = evaluator(items, network, best)
    first.run(global_epoch=1)
    score = first.state.metrics["val_psnr"]
    torch.save({"validation": first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["validation"]
    assert state == {"best_metric": score, "best_metric_epoch": 1}

    with torch.no_grad():  # a changed model, so that any write would change the file
        next(network.parameters()).add_(0.01)
    kept = best.read_bytes()
    for restored in ({"best_metric": score + 1.0, "best_metric_epoch": 1}, {"best": score + 1.0}):  # new and old format
        resumed = evaluator(items, network, best)
        resumed.load_state_dict(restored)
        resumed.run(global_epoch=2)
        assert resumed.state.metrics["val_psnr"] < score + 1.0
        assert resumed.state.best_metric == score + 1.0 and best.read_bytes() == kept, restored

    for restored in ({"best_metric": score - 50.0, "best_metric_epoch": 1}, {"best": -math.inf}):  # beaten, or none yet
        best.unlink()
        resumed = evaluator(items, network, best)
        resumed.load_state_dict(restored)
        resumed.run(global_epoch=2)
        assert resumed.state.best_metric_epoch == 2 and best.is_file(), restored
        assert resumed.state_dict() == {"best_metric": resumed.state.metrics["val_psnr"], "best_metric_epoch": 2}


def test_no_validation_volumes_runs_nothing_and_says_so(tmp_path: Path, network, caplog) -> None:
    engine = evaluator([], network, tmp_path / "model_best.pt")
    assert "validation is off: the datalist has no validation volumes" in caplog.text
    engine.run(global_epoch=1)
    assert engine.state.best_metric_epoch == -1 and not (tmp_path / "model_best.pt").exists()


def test_prepare_batch_refuses_a_collated_batch() -> None:
    item = SimulateSinogramd(keys="image", n_views=VIEWS, voxel_size=VOXEL)(phantom(16, 16, 4))
    sinogram, volume, (operator,), _ = SinogramPrepareBatch()(item)
    assert volume.shape == (4, 16, 16) and torch.equal(sinogram, operator(volume))
    with pytest.raises(ValueError, match=r"'image' has shape \(1, 1, 16, 16, 4\).*batch_size null"):
        SinogramPrepareBatch()({**item, "image": item["image"][None]})
