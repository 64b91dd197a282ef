"""scripts/gpu_check.py's CPU dry run, as CI runs it: every part's JSON, the CUDA cases skipped, every number finite."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

PARTS = ("operators", "cone", "training", "amp")
FILES = {*(f"{p}.json" for p in PARTS), "summary.json", "gpu_check.log"}


def _numbers(value: object, path: str = "") -> list[tuple[str, object]]:
    """``(path, value)`` of every number in a JSON record, and of every string the script writes for NaN or Inf."""
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}/{i}")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, value)]
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return [(path, value)]
    return []


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_every_part_writes_its_json_and_the_summary(dry_run):
    assert {p.name for p in dry_run.iterdir()} == FILES  # what comes back from the device: at most 8 plain names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in FILES)
    summary = _load(dry_run, "summary")
    assert summary["complete"] and summary["device"] == "cpu" and summary["plan"] == "cpu"
    assert summary["seconds"] < summary["max_seconds"]
    assert list(summary["parts"]) == list(PARTS)  # cheapest first
    for name, part in summary["parts"].items():
        assert part == {**part, "status": "ok", "case_errors": [], "file": f"{name}.json"}
        assert _load(dry_run, name)["status"] == "ok"
    assert "part amp: ok" in (dry_run / "gpu_check.log").read_text()


@pytest.mark.parametrize("name", [*PARTS, "summary"])
def test_every_number_is_finite(dry_run, name):
    numbers = _numbers(_load(dry_run, name))
    assert numbers
    bad = [(path, v) for path, v in numbers if isinstance(v, str) or not math.isfinite(v)]
    assert not bad, f"{name}.json: non-finite values {bad}"


def test_operators_measure_the_matrix_adjoint_and_skip_cuda(dry_run):
    operators = _load(dry_run, "operators")
    assert operators["astra_cuda"] is False
    cases = operators["cases"]
    cuda = [k for k in cases if "astra-cuda" in k] + ["agreement"]
    assert {"test-parallel-sparse-astra-cuda", "test-cone-limited-astra-cuda", "cone-4x32x32-astra-cuda"} <= set(cuda)
    assert all(cases[k] == {"status": "skipped", "reason": "no CUDA device"} for k in cuda)
    matrix = {k: v for k, v in cases.items() if k not in cuda}
    assert {"test-parallel-sparse-astra-matrix", "test-fan-limited-astra-matrix", "parallel-4x32x32-astra-matrix"} <= set(matrix)
    for name, case in matrix.items():
        assert case["status"] == "ok", name
        assert case["adjoint_error"] < 1e-5 and case["adjoint_error_ax_y"] < 1e-5, name  # an exact adjoint
        assert case["norm"] > 0 and case["forward_ms"] > 0 and case["adjoint_ms"] > 0
    summary = _load(dry_run, "summary")
    assert summary["figures"]["adjoint_error"] == {k: v["adjoint_error"] for k, v in matrix.items()}


def test_cone_part_guards_astra_3d_and_reconstructs_a_fan_stand_in(dry_run):
    cone = _load(dry_run, "cone")
    geometry = cone["geometry"]
    assert geometry["beam"] == "cone" and geometry["round_trip"] is True and geometry["available_backends"] == []
    assert len(geometry["sino_shape"]) == 3 and geometry["sino_shape"][1] == geometry["n_views"]
    assert cone["guard"].startswith("ValueError") and "cone" in cone["guard"]
    assert cone["cone_reconstruction"] == {"status": "skipped", "reason": "no CUDA device"}
    assert cone["reconstructed_beam"] == "fan"
    cases = cone["cases"]
    assert {k: v["status"] for k, v in cases.items()} == {"sirt": "ok", "cgls": "ok", "dbpp": "ok"}
    assert cases["sirt"]["psnr"] > 20 and cases["cgls"]["psnr"] > 20  # 8 fan views of the sample at 32 x 32
    assert cases["dbpp"]["nfe"] == 2 and cases["dbpp"]["psnr"] > 0


def test_amp_grid_and_training_speed(dry_run):
    amp = _load(dry_run, "amp")
    runs = amp["runs"]
    assert list(runs) == ["Z4-nfe2", "Z4-nfe4", "Z8-nfe2", "Z8-nfe4"]  # cheapest first; fp32 already, so no fp32 reference
    for name, run in runs.items():
        assert run["status"] == "ok", name
        assert f"Z{run['depth']}-nfe{run['nfe']}" == name and run["size"] == 32 and run["precision"] == "fp32"
        assert run["seconds"] > 0 and run["peak_memory_mb"] > 0 and run["psnr_sanity"] > 0
    assert amp["warmup_seconds"] > 0
    training = _load(dry_run, "training")["runs"]
    assert list(training) == ["fp32"]
    assert training["fp32"]["iterations"] == 2 and training["fp32"]["iterations_per_second"] > 0
    assert _load(dry_run, "summary")["figures"]["train_iterations_per_second"] == {"fp32": training["fp32"]["iterations_per_second"]}


def test_wrapper_isolates_parts_and_a_failing_part_keeps_the_others(tmp_path):
    env = {**subprocess_env(), "OUT": str(tmp_path / "out")}
    missing = tmp_path / "missing.pt"
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--isolate", "yes",
           "--parts", "amp", "operators", "--ckpt", str(missing)]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr[-4000:]  # a part failed
    out = tmp_path / "out"
    summary = _load(out, "summary")
    assert summary["isolate"] is True and summary["complete"] is True
    assert list(summary["parts"]) == ["operators", "amp"]  # the run's order, not the command line's
    assert summary["parts"]["operators"]["status"] == "ok"
    amp = summary["parts"]["amp"]
    assert amp["status"] == "error" and "FileNotFoundError" in amp["error"] and str(missing) in amp["error"]
    assert "Traceback" in _load(out, "amp")["traceback"]
    pids = {line.split()[2] for line in (out / "gpu_check.log").read_text().splitlines() if " INFO " in line}
    assert len(pids) == 3  # the run and one process per part
