"""The weights files in models/: each loads with ``weights_only=True`` into the network its inference config builds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.networks import load_weights

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 50 * 2**20


@pytest.mark.parametrize(("ckpt_key", "network_key", "slab_size"), [("ckpt_path", "network_def", 3), ("ckpt_path_2d", "network_def_2d", 1)])
def test_shipped_weights_load_into_the_inference_network(ckpt_key, network_key, slab_size):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT)})
    path = Path(parser.get_parsed_content(ckpt_key))
    assert path.is_file(), f"{path} is not shipped"
    assert path.stat().st_size < MAX_BYTES, f"{path} is {path.stat().st_size / 2**20:.1f} MB"

    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and torch.isfinite(v).all() for v in state.values())
    network = load_weights(parser.get_parsed_content(network_key), path).eval()
    assert network.slab_size == slab_size

    size = parser.get_parsed_content("image_size")
    x = torch.randn(2, slab_size, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = network(x, torch.tensor([999, 10]), torch.ones(2, dtype=torch.long))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # a trained prior predicts the noise of an almost pure-noise input: close to the input itself
    assert torch.nn.functional.cosine_similarity(eps[0].flatten(), x[0].flatten(), dim=0) > 0.9


def _adapt_prior_main():
    spec = importlib.util.spec_from_file_location("adapt_prior", ROOT / "scripts" / "adapt_prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_adapt_prior_turns_the_shipped_slab_prior_into_a_2d_starting_point(tmp_path, capsys):
    out = tmp_path / "init_2d.pt"
    assert _adapt_prior_main()([str(ROOT / "models" / "model.pt"), "--slab_size", "1", "--separations", "1", "--out", str(out)]) == 0
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    network = load_weights(parser.get_parsed_content("network_def_2d"), out)
    assert network.slab_size == 1 and "slab_size=3" in capsys.readouterr().out


def test_adapt_prior_deepens_the_shipped_slab_prior_without_changing_its_output(tmp_path, capsys):
    out = tmp_path / "deep.pt"
    argv = [str(ROOT / "models" / "model.pt"), "--slab_size", "3", "--separations", "1", "2", "3", "--num_res_blocks", "2"]
    assert _adapt_prior_main()([*argv, "--out", str(out)]) == 0
    assert "num_res_blocks=2" in capsys.readouterr().out
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    shallow = load_weights(parser.get_parsed_content("network_def"), ROOT / "models" / "model.pt").eval()
    parser["num_res_blocks"] = 2
    deep = load_weights(parser.get_parsed_content("network_def", lazy=False), out).eval()
    x, t, sep = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 10]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, sep), shallow(x, t, sep), rtol=1e-5, atol=1e-5)


def test_adapt_prior_names_a_source_that_is_not_the_configured_slab_prior(tmp_path, capsys):
    bad = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(SystemExit):
        _adapt_prior_main()([str(bad), "--out", str(tmp_path / "x.pt")])
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
