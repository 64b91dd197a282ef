"""The evaluation's parts: the plan as data, progress with the time left, the workflow through configs/evaluate.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from bundle.workflows.evaluation import Cell, Evaluation, MethodSpec, plan_cells, setting_name
from bundle.workflows.evaluation.progress import CellProgress, duration
from bundle.workflows.ranks import Ranks, cpu_threads_per_rank
from tests.conftest import ROOT, write_crop

CONFIGS = [str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "evaluate.json")]
TINY = {f"{net}#{key}": value for net in ("network_def", "network_def_2d")
        for key, value in (("channels", [8, 16]), ("attention_levels", [False, False]), ("num_head_channels", 8))}  # fmt: skip


def test_plan_is_the_grid_of_volumes_settings_and_methods_in_table_order(tmp_path):
    settings = [{"name": "4 views", "views": 4}, {"arc_degrees": 90.0, "step_degrees": 15.0, "photons": 1e5}]
    methods = ["fbp", {"method": "tv", "settings": {"lam": 1e-3}}, {"method": "dbpp", "variant": "mean of 2", "settings": {"samples": 2}}]
    cells = plan_cells([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], settings, methods, {"steps": 5, "samples": 1}, seed=7)
    assert len(cells) == 2 * 2 * 3 and [c.index for c in cells] == list(range(12))
    assert [(c.name, c.setting, c.method, c.variant) for c in cells[:6]] == [
        ("a", "4 views", "fbp", ""), ("a", "4 views", "tv", "lam=0.001"), ("a", "4 views", "dbpp", "mean of 2"),
        ("a", "arc_degrees90.0_step_degrees15.0_photons100000.0", "fbp", ""),
        ("a", "arc_degrees90.0_step_degrees15.0_photons100000.0", "tv", "lam=0.001"),
        ("a", "arc_degrees90.0_step_degrees15.0_photons100000.0", "dbpp", "mean of 2"),
    ]  # fmt: skip
    mean = cells[2]
    assert mean.samples == 2 and dict(mean.inferer_settings) == {"steps": 5, "seed": 7} and mean.seed == 7
    assert mean.folder(tmp_path / "out") == tmp_path / "out" / "a" / "4_views" / "dbpp_mean_of_2"
    assert mean.recon_path(tmp_path).name == "a_recon.nii.gz"
    assert cells[3].scan.n_views == 6 and cells[3].scan.photons == 1e5 and dict(cells[3].acquisition)["step_degrees"] == 15.0
    assert isinstance(mean, Cell) and MethodSpec.parse("fbp") == MethodSpec("fbp")
    assert setting_name({"views": 4, "beam": "fan"}) == "views4_beamfan"
    with pytest.raises(ValueError, match="unknown keys \\['view'\\]"):
        plan_cells(["a"], [{"view": 4}], ["fbp"])
    with pytest.raises(ValueError, match="views"):
        plan_cells(["a"], [{"views": 0}], ["fbp"])
    with pytest.raises(ValueError, match="'method' key"):
        plan_cells(["a"], [{"views": 4}], [{"variant": "x"}])
    with pytest.raises(ValueError, match="at least one volume"):
        plan_cells([], [{"views": 4}], ["fbp"])


def test_progress_estimates_the_time_left_from_the_cells_so_far(caplog):
    now = [100.0]
    progress = CellProgress(3, prefix="rank 1 of 2: ", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="bundle.workflows.evaluation"):
        assert progress.start("a | 4 views | fbp") == "rank 1 of 2: cell 1 of 3: a | 4 views | fbp (time left not known yet)"
        now[0] += 40.0
        progress.finish()
        assert progress.start("a | 4 views | sirt").endswith("cell 2 of 3: a | 4 views | sirt (about 1 min 20 s left)")
        now[0] += 20.0
        progress.finish()
        assert progress.seconds_left() == pytest.approx(30.0)
        progress.start("a | 4 views | tv")
        now[0] += 30.0
        progress.finish()
    assert "rank 1 of 2: 3 cells in 1 min 30 s" in caplog.messages
    assert [duration(s) for s in (0.4, 59, 61, 3600 * 2 + 300)] == ["0 s", "59 s", "1 min 01 s", "2 h 05 min"]


def test_ranks_share_round_robin_and_split_the_cpu_threads():
    assert Ranks() == Ranks.current() == Ranks(0, 1) and Ranks().gather("x") == ["x"]
    assert [i for i in range(7) if Ranks(1, 3).owns(i)] == [1, 4] and not Ranks(1, 3).is_main
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        Ranks(2, 2)
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "1"}) >= cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}) >= 1
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "1000"}) == 1


def _evaluation(tmp_path: Path, **overrides) -> Evaluation:
    crop = tmp_path / "crop.nii.gz"
    if not crop.exists():
        write_crop(crop, xy=24, slices=4)
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({
        "bundle_root": str(ROOT), "eval_volumes": [str(crop)], "eval_methods": ["fbp", "sirt"], "eval_dir": str(tmp_path / "eval"),
        "eval_settings": [{"name": "4 views", "views": 4}, {"name": "60 degrees", "arc_degrees": 60.0, "step_degrees": 20.0}],
        "device": "cpu", "image_size": 24, "progress": False, "ckpt_path": "", "ckpt_path_2d": "", **TINY, **overrides,
    })  # fmt: skip
    return parser.get_parsed_content("evaluation")


def test_evaluation_logs_each_cell_and_writes_the_table_and_figures(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bundle.workflows.evaluation"):
        rows = _evaluation(tmp_path, eval_window="350/50").run()
    cells = [m for m in caplog.messages if " of 4: crop | " in m]
    assert [m.split(":")[0] for m in cells] == ["cell 1 of 4", "cell 2 of 4", "cell 3 of 4", "cell 4 of 4"]
    assert "time left not known yet" in cells[0] and all(" left)" in m and "about " in m for m in cells[1:])
    assert [(r["setting"], r["method"], r["selected"]) for r in rows] == [
        ("4 views", "fbp", True), ("4 views", "sirt", True), ("60 degrees", "fbp", True), ("60 degrees", "sirt", True)
    ]
    out = tmp_path / "eval"
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    for setting in ("4_views", "60_degrees"):
        for kind in ("views", "views_bone", "diff", "zprofile"):
            assert (out / "figures" / f"crop_{setting}_{kind}.png").stat().st_size > 0
        assert json.loads((out / "crop" / setting / "sirt" / "cell.json").read_text())["acquisition"]
    assert (out / "results.png").stat().st_size > 0

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bundle.workflows.evaluation"):
        again = _evaluation(tmp_path, eval_resume=True, eval_window="350/50").run()
    assert sum(m.startswith("reusing crop | ") for m in caplog.messages) == 4
    assert again == json.loads(json.dumps(rows))


def test_bad_settings_fail_before_any_cell_runs(tmp_path):
    with pytest.raises(RuntimeError) as failed:  # MONAI's "Failed to instantiate" around the cause
        _evaluation(tmp_path, eval_window="brain")
    assert isinstance(failed.value.__cause__, ValueError) and "window 'brain'" in str(failed.value.__cause__)
    evaluation = _evaluation(tmp_path, **{"evaluation#distributed": True})
    with pytest.raises(RuntimeError, match="multi_gpu_evaluate.json"):
        evaluation.run()
    assert not (tmp_path / "eval" / "results.csv").exists()
