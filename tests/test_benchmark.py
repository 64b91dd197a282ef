"""scripts/benchmark.py in-process on a tiny crop of the sample with tiny random priors: table rows, columns, figures, NFE sweep."""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.workflows.evaluation import TABLE_COLUMNS
from bundle.networks import SlabDenoiser
from tests.conftest import ROOT, write_crop

TINY = {"channels": (8, 16), "attention_levels": (False, True), "norm_num_groups": 8, "num_head_channels": 8}
TINY_SET = [
    f"{net}#{key}={value}"
    for net in ("network_def", "network_def_2d")
    for key, value in (("channels", "[8,16]"), ("attention_levels", "[false,true]"), ("num_head_channels", "8"))
]


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("benchmark")
    torch.manual_seed(0)
    torch.save(SlabDenoiser(slab_size=3, **TINY).state_dict(), tmp / "tiny.pt")
    torch.save(SlabDenoiser(slab_size=1, separations=(1,), **TINY).state_dict(), tmp / "tiny_2d.pt")
    return {"crop": write_crop(tmp / "crop.nii.gz", xy=32, slices=6), "ckpt": tmp / "tiny.pt", "ckpt_2d": tmp / "tiny_2d.pt"}


def _argv(setup: dict[str, Path], out: Path, *more: str) -> list[str]:
    return [
        "--out", str(out), "--no_shared", "--volumes", str(setup["crop"]),
        "--steps", "2", "--device", "cpu", "--ckpt", str(setup["ckpt"]), "--ckpt_2d", str(setup["ckpt_2d"]),
        "--set", "image_size=32", *[a for s in TINY_SET for a in ("--set", s)], *more,
    ]  # fmt: skip


def test_benchmark_table_figures_and_nfe_sweep(setup, tmp_path):
    script = _load_script()
    result = script.main(
        _argv(
            setup, tmp_path,
            "--methods", "fbp", "tv", "dbpp", "dds2d", "mbir", "--tv_weights", "1e-4", "2e-3", "--samples", "1", "2",
            "--views", "6", "--arcs", "90", "--step_degrees", "15", "--photons", "none", "--nfe", "1", "2",
        )
    )  # fmt: skip
    rows = result["rows"]
    expected = [
        (setting, method, variant)
        for setting in ("6 views", "90 degrees")
        for method, variant in (
            ("fbp", ""), ("tv", "lam=0.0001"), ("tv", "lam=0.002"), ("dbpp", ""), ("dbpp", "mean of 2"),
            ("dds2d", ""), ("dds2d", "mean of 2"), ("mbir", ""), ("mbir", "mean of 2"),
        )
    ]  # fmt: skip
    assert [(r["setting"], r["method"], r["variant"]) for r in rows] == expected
    for r in rows:
        for key in ("psnr_3d", "ssim_3d", "mae_body_hu", "psnr_axial", "psnr_coronal", "psnr_sagittal", "ssim_sagittal", "seconds", "peak_memory_mb"):
            assert np.isfinite(r[key]), (r["method"], key)
        assert r["samples"] == (2 if r["variant"] == "mean of 2" else 1)
        assert r["nfe"] == (2 * r["samples"] if r["method"] in ("dbpp", "dds2d", "mbir") else 0)
        # a posterior mean is its own row, selected apart from the single sample, with its spread written beside it
        assert r["selected"] or r["method"] == "tv"
        if r["samples"] == 2:
            assert Path(r["recon_path"].replace("_recon.nii.gz", "_std.nii.gz")).is_file()
    for setting in ("6 views", "90 degrees"):
        tv = [r for r in rows if r["setting"] == setting and r["method"] == "tv"]
        assert sum(r["selected"] for r in tv) == 1
        assert max(tv, key=lambda r: r["psnr_3d"])["selected"]

    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(TABLE_COLUMNS) and len(table) == len(rows)
    for name in ("results.png", "nfe.png", "nfe.csv", "benchmark.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for setting in ("6_views", "90_degrees"):
        for kind in ("views", "views_bone", "diff", "zprofile"):
            assert (tmp_path / "figures" / f"crop_{setting}_{kind}.png").stat().st_size > 0

    nfe = result["nfe_rows"]
    assert sorted((r["steps"], r["method"]) for r in nfe) == [(1, "dbpp"), (1, "dds2d"), (2, "dbpp"), (2, "dds2d")]
    assert all(r["setting"] == "6 views" and r["nfe"] == r["steps"] for r in nfe)


def test_missing_weights_are_skipped_with_a_note(setup, tmp_path, capfd):
    script = _load_script()
    argv = _argv(setup, tmp_path, "--methods", "fbp", "dds2d", "--views", "4", "--arcs", "none", "--photons", "1e5", "--no_figures")
    argv[argv.index("--ckpt_2d") + 1] = str(tmp_path / "model_2d.pt")
    rows = script.main(argv)["rows"]
    log = "".join(capfd.readouterr())  # the bundle's logging.conf logs to stdout
    assert "cell 1 of 2: crop | 4 views, 1e5 photons | fbp (time left not known yet)" in log
    assert re.search(r"cell 2 of 2: crop \| 4 views, 1e5 photons \| dds2d \(about \d+ s left\)", log), log[-2000:]
    assert [(r["setting"], r["method"]) for r in rows] == [("4 views, 1e5 photons", "fbp"), ("4 views, 1e5 photons", "dds2d")]
    assert np.isfinite(rows[0]["psnr_3d"]) and rows[0]["photons"] == 1e5
    assert "psnr_3d" not in rows[1] and "model_2d.pt not found" in rows[1]["note"]


def test_settings_and_methods_from_options():
    script = _load_script()
    args = script.parse_args(["--methods", "tv", "dbpp", "--tv_weights", "1e-4", "5e-4", "--samples", "1", "4"])
    assert [s["name"] for s in script.make_settings(args)] == [
        "8 views", "8 views, 1e5 photons", "6 views", "6 views, 1e5 photons",
        "4 views", "4 views, 1e5 photons", "90 degrees", "90 degrees, 1e5 photons",
    ]  # fmt: skip
    assert script.make_methods(args) == [
        {"method": "tv", "variant": "lam=0.0001", "settings": {"lam": 1e-4}},
        {"method": "tv", "variant": "lam=0.0005", "settings": {"lam": 5e-4}},
        "dbpp",
        {"method": "dbpp", "variant": "mean of 4", "settings": {"samples": 4}},
    ]
    assert args.window == "soft_tissue" and script.parse_args(["--window", "350/50"]).window == "350/50"
    with pytest.raises(SystemExit):
        script.parse_args(["--window", "brain"])  # not a preset nor W/L: argparse names --window
    only_mean = script.make_methods(script.parse_args(["--methods", "fbp", "dbpp", "--samples", "4"]))
    assert only_mean == ["fbp", {"method": "dbpp", "variant": "mean of 4", "settings": {"samples": 4}}]
    if script.SHARED_DATA.is_dir():  # the held-out volume of configs/datalist_shared_ct.json
        assert [v.name for v in script.find_volumes(script.parse_args([]))] == ["ts_example_ct_abdomen_pelvis_3mm.nii.gz"]


def test_resume_reuses_exactly_matching_runs_only(setup, tmp_path):
    """--resume reads back runs whose cell.json matches; a changed setting or weights file runs again."""
    script = _load_script()
    weights = tmp_path / "weights.pt"
    weights.write_bytes(setup["ckpt"].read_bytes())
    argv = _argv(setup, tmp_path / "out", "--methods", "fbp", "dbpp", "--views", "4", "--arcs", "none", "--photons", "none", "--no_figures")
    argv[argv.index("--ckpt") + 1] = str(weights)

    def run(*more: str, steps: str = "2") -> dict[str, tuple[int, dict]]:
        args = list(argv) + list(more)
        args[args.index("--steps") + 1] = steps
        rows = script.main(args)["rows"]
        return {r["method"]: (Path(r["recon_path"]).stat().st_mtime_ns, r) for r in rows}

    first = run()
    again = run("--resume")
    for method in ("fbp", "dbpp"):
        assert again[method][0] == first[method][0], f"{method} ran again"
        assert again[method][1]["psnr_3d"] == first[method][1]["psnr_3d"]
        assert again[method][1]["seconds"] == first[method][1]["seconds"]  # the time of the run that made it

    more_steps = run("--resume", steps="3")
    assert more_steps["fbp"][0] == first["fbp"][0] and more_steps["dbpp"][0] != first["dbpp"][0]
    assert more_steps["dbpp"][1]["nfe"] == 3

    torch.manual_seed(1)
    torch.save(SlabDenoiser(slab_size=3, **TINY).state_dict(), weights)  # retrained weights, same file name
    retrained = run("--resume", steps="3")
    assert retrained["fbp"][0] == first["fbp"][0] and retrained["dbpp"][0] != more_steps["dbpp"][0]

    no_resume = run(steps="3")
    assert no_resume["fbp"][0] != first["fbp"][0]
