"""Every command line in README.md runs as written, with tiny overrides (issue 16).

The commands are read from README.md's indented code blocks, so a command added there without a
rule here fails `test_every_readme_command_has_a_rule`. Each rule swaps the README's example
paths for tiny files in a temporary folder and replaces the values of the settings that make a
run long (steps, slices, methods, epochs); everything else (config files, overlays, run ids,
flag spellings) is the README's own text. The commands run in the order the README gives them,
so the training and publishing commands use the data the preparation command wrote.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import nibabel as nib

from tests.conftest import ROOT, subprocess_env, write_crop

pytestmark = pytest.mark.slow

README = ROOT / "README.md"


def readme_commands(text: str) -> list[str]:
    """The command lines of the indented code blocks, continuation lines joined, comments dropped."""
    commands, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    ") or not line.strip():
            current = ""
            continue
        body = line.strip()
        current += " " + body
        if current.rstrip().endswith("\\"):
            current = current.rstrip()[:-1]
            continue
        words = shlex.split(current, comments=True)
        if words:
            commands.append(shlex.join(words))
        current = ""
    return commands


def with_settings(argv: list[str], settings: dict[str, str | list[str]]) -> list[str]:
    """``argv`` with each ``--flag``'s values replaced by ``settings[flag]`` (appended when absent)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in settings:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(token)
        i += 1
    for flag, value in settings.items():
        out += [flag, *([value] if isinstance(value, str) else value)]
    return out


def fake_lidc(folder: Path) -> Path:
    """Two tiny 'patients' in LIDC-IDRI's ``<patient>/<study>/<series>/*.dcm`` layout."""
    from tests.test_prepare_data import write_dicom_series

    for i, xy in enumerate((40, 36), start=1):
        hu = np.asarray(nib.load(write_crop(folder / f"crop{i}.nii.gz", xy=xy, slices=10)).dataobj)
        (folder / f"crop{i}.nii.gz").unlink()
        write_dicom_series(folder / "LIDC-IDRI" / f"LIDC-IDRI-000{i}" / "study" / "series", hu.transpose(2, 1, 0),
                           spacing=(3.0, 3.0, 3.0))
    return folder / "LIDC-IDRI"


def tiny(command: str, work: Path) -> list[str] | None:
    """The README ``command`` with tiny overrides, run in the repository root; ``None``: checked with ``make -n``."""
    argv = shlex.split(command)
    volume = str(work / "tiny_ct.nii.gz")
    argv = [{"my_ct.nii.gz": volume, "my_scans": str(work / "scans"), "/data/LIDC-IDRI": str(work / "LIDC-IDRI"), "data/lidc": str(work / "data" / "lidc"),
             "data/lidc/datalist.json": str(work / "data" / "lidc" / "datalist.json"),
             "runs/train/model.pt": str(work / "runs" / "train" / "model.pt")}.get(a, a) for a in argv]
    if argv[0] == "make":
        return None
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    elif argv[0] == ".venv/bin/python":
        argv[0] = sys.executable
    joined = " ".join(argv)
    small_training = {"--image_size": "32", "--batch_size": "2", "--samples_per_volume": "2", "--max_epochs": "1",
                      "--warmup_iterations": "1", "--val_interval": "1000", "--output_dir": str(work / "runs" / "train")}
    if "scripts/benchmark.py" in joined:
        return with_settings(argv, {"--out": str(work / "benchmark" / str(len(list(work.glob("benchmark/*"))))),
                                    "--volumes": volume, "--no_shared": [], "--max_slices": "4", "--steps": "1",
                                    "--views": "4", "--arcs": "none", "--photons": "none", "--tv_weights": "1e-3",
                                    "--methods": ["fbp", "dds2d", "dbpp"], **({"--nfe": "1"} if "--nfe" in argv else {})})
    if "configs/multi_gpu_evaluate.json" in joined:  # two ranks sharing the cells of two classical methods
        return with_settings(argv, {"--eval_volumes": f"['{volume}']", "--eval_dir": str(work / "eval_torchrun"),
                                    "--eval_methods": "['fbp','sirt']", "--eval_settings": "[{'name': '4 views', 'views': 4}]"})
    if "configs/evaluate.json" in joined:
        return with_settings(argv, {"--eval_volumes": f"['{volume}']", "--eval_dir": str(work / "eval"),
                                    "--eval_methods": "['fbp','dbpp']", "--steps": "1",
                                    "--eval_settings": "[{'name': '4 views', 'views': 4}]"})
    if "run training" in joined and "--datalist" in argv:
        return with_settings(argv, small_training)
    if "run training" in joined:  # the torchrun line: the prepared data, two ranks of one iteration
        return with_settings(argv, {**small_training, "--datalist": str(work / "data" / "lidc" / "datalist.json"),
                                    "--data_root": str(work / "data" / "lidc"),
                                    "--output_dir": str(work / "runs" / "torchrun")})
    if "configs/multi_gpu_inference.json" in joined:  # two gloo processes sharing the slabs of one tiny volume
        return with_settings(argv, {"--output_dir": str(work / "out_torchrun"), "--steps": "2", "--batch_size": "1"})
    if "configs/inference.json" in joined and "--input_dir" in argv:
        return with_settings(argv, {"--output_dir": str(work / "out_folder")})
    if "configs/inference.json" in joined:
        return with_settings(argv, {"--output_dir": str(work / "out"), "--steps": "2"})
    if "scripts/prepare_data.py" in joined:
        return argv
    if "scripts/publish_weights.py" in joined:
        return with_settings(argv, {"--to": str(work / "published" / "model.pt")})
    raise AssertionError(f"no rule for the README command {command!r}: add one to tests/test_readme.py")


COMMANDS = readme_commands(README.read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    write_crop(folder / "tiny_ct.nii.gz", xy=32, slices=6)
    (folder / "scans").mkdir()
    write_crop(folder / "scans" / "a.nii.gz", xy=24, slices=4)
    write_crop(folder / "scans" / "b.nii.gz", xy=20, slices=5)
    fake_lidc(folder)
    return folder


def test_every_readme_command_has_a_rule(tmp_path: Path) -> None:
    assert len(COMMANDS) >= 8, COMMANDS
    for command in COMMANDS:
        tiny(command, tmp_path)  # raises for a command without a rule


@pytest.mark.parametrize("command", COMMANDS, ids=[re.sub(r"\W+", "_", c)[:60] for c in COMMANDS])
def test_readme_command_runs(command: str, work: Path) -> None:
    argv = tiny(command, work)
    if argv is None:  # `make run` / `make test`: the target exists and runs the command tested here / what CI runs
        proc = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "python" in proc.stdout, proc.stdout + proc.stderr
        return
    proc = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, encoding="utf-8",
                          errors="replace", timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
