"""Outputs of a reconstruction as one set: staged, moved into place when complete, stale files removed, temp files cleaned."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import nibabel as nib

from tests.conftest import ROOT, TINY_NETWORK, subprocess_env, write_crop
from tests.test_input_checks import bundle_run, failed_with, ok


def _hidden(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_stale_std_of_an_earlier_run_is_removed(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    ok(bundle_run(tmp_path, input_path=str(crop), method="fbp", samples=2))
    out = tmp_path / "out"
    assert (out / "crop_std.nii.gz").is_file()
    (out / "notes.txt").write_text("mine")  # not an output of a run: kept
    ok(bundle_run(tmp_path, input_path=str(crop), method="sirt", samples=1, save_png=False))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["crop_recon.nii.gz", "metrics.json", "notes.txt"], names  # no _std, no stale _views.png
    assert json.loads((out / "metrics.json").read_text())["method"] == "sirt"


def test_unwritable_output_folder_is_refused_before_the_work(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / "out"  # cannot be created, even by root
    proc = bundle_run(tmp_path, input_path=str(crop), method="fbp", output_dir=str(target))
    failed_with(proc, "output_dir", "a_file/out", "not writable")


def test_sigterm_mid_run_leaves_the_earlier_set_and_no_temp_files(tmp_path):
    crop = write_crop(tmp_path / "crop.nii.gz", xy=24, slices=4)
    ok(bundle_run(tmp_path, input_path=str(crop), method="fbp"))
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import torch

    from bundle.networks import SlabDenoiser

    tiny = {k: v for k, v in TINY_NETWORK["network_def"].items() if k != "_target_"}
    tiny.update(slab_size=3, separations=(1, 2, 3))
    torch.save(SlabDenoiser(**tiny).state_dict(), tmp_path / "tiny.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    settings = {
        "input_path": str(crop), "output_dir": str(out), "device": "cpu", "image_size": 32, "progress": "false",
        "ckpt_path": str(tmp_path / "tiny.pt"), "steps": "1000", "samples": "3", "network_def": repr(TINY_NETWORK["network_def"]),
    }
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not _hidden(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _hidden(out), "the run never staged its outputs"
        time.sleep(1.0)  # inside the reconstruction
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert _hidden(out) == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert nib.load(str(out / "crop_recon.nii.gz")).shape == (24, 24, 4)
