"""scripts/benchmark_precision.py's sampler part on a few slices of the sample: one JSON line with the issue's keys."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import ROOT


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_precision", ROOT / "scripts" / "benchmark_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_part_prints_both_precisions_of_the_same_seeded_reconstruction(monkeypatch, capsys) -> None:
    script = _load_script()
    monkeypatch.setattr("sys.argv", ["benchmark_precision.py", "--part", "sampler", "--depth", "3", "--steps", "1", "--repeats", "1"])
    script.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"fp32_seconds", "bf16_seconds", "speedup", "psnr_fp32", "psnr_bf16", "native_bf16", "threads"} <= line.keys()
    assert line["speedup"] == pytest.approx(line["fp32_seconds"] / line["bf16_seconds"])
    # one DDIM step from noise is a rough image, but the same one in both precisions
    assert line["psnr_fp32"] > 5 and abs(line["psnr_bf16"] - line["psnr_fp32"]) < 0.5
    assert line["depth"] == 3 and line["repeats"] == 1


def test_the_benchmarked_network_is_the_configured_one_with_the_shipped_weights() -> None:
    network = _load_script().shipped_network(torch.device("cpu"), ROOT / "models" / "model.pt")
    shipped = torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert network.state_dict().keys() == shipped.keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in shipped.items())
