"""bundle.cli: unknown settings stop ``python -m monai.bundle run``, and errors end with one line naming the problem."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import fire
import pytest
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser, scripts

from bundle import cli
from tests.conftest import subprocess_env, write_crop

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = "configs/inference.json"
TRAIN = "['configs/train.json','configs/train_augment.json']"


def bundle_run(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS`` in the repository root."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300)


def last_line(text: str) -> str:
    return text.rstrip().splitlines()[-1]


def fire_reads(args: list[str]) -> dict:
    """What fire hands ``monai.bundle.scripts.run`` for ``run ARGS``: its arguments and the overrides."""
    received: dict = {}

    def run(run_id=None, init_id=None, final_id=None, meta_file=None, config_file=None, logging_file=None,
            tracking=None, args_file=None, **override):
        received.update({k: v for k, v in locals().items() if v is not None and k not in ("override", "received")})
        received.update(override)

    assert list(inspect.signature(run).parameters) == list(inspect.signature(scripts.run).parameters)
    fire.Fire({"run": run}, command=["run", *args])
    return received


@pytest.mark.parametrize("args", [
    ["--config_file", INFERENCE, "--view", "4"],
    ["training", "--config_file", TRAIN, "--max-epochs=3", "--noprogress", "--seed", "-1"],
    ["--config_file=configs/inference.json", "--network_def#channels", "[8, 16]", "--debug"],
    ["run", "initialize", "finalize", "configs/metadata.json", INFERENCE, "--views", "2", "--", "--verbose"],
])
def test_command_line_is_read_as_fire_reads_it(args: list[str]) -> None:
    expected = fire_reads(args)
    own = inspect.signature(scripts.run).parameters
    command_line = cli.read_command_line(args)
    assert command_line.arguments == {k: v for k, v in expected.items() if k in own}
    assert {k: DefaultParseValue(v) for k, v in command_line.overrides.items()} == {
        k: v for k, v in expected.items() if k not in own}


def test_args_file_settings_are_checked_under_the_command_line(tmp_path: Path) -> None:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": INFERENCE, "views": 4, "veiws": 3}))
    command_line = cli.read_command_line(["--args_file", str(args_file), "--views", "2"])
    assert command_line.arguments["config_file"] == INFERENCE
    assert command_line.overrides == {"views": "2", "veiws": 3}
    with pytest.raises(ValueError, match=r"unknown setting veiws \(in .*args.json\) \(did you mean --views\?\)"):
        cli.check_settings(command_line)


def test_unknown_settings_of_the_real_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # train.json's macros name configs/inference.json relative to the bundle root
    inference = cli.defined_config(INFERENCE)
    known = ["debug", "config_file"]
    found = cli.unknown_settings(
        ["view", "views", "spacing#0", "network_def#dropout_cattn", "separations#5", "_meta_#version", "debug",
         "config_fle", "zzz"], inference, known)
    assert list(found) == ["view", "separations#5", "config_fle", "zzz"]
    assert found["view"] == " (did you mean --views?)" and found["config_fle"] == " (did you mean --config_file?)"
    assert found["separations#5"].startswith(" (did you mean --separations#") and found["zzz"] == ""
    train = cli.defined_config(DefaultParseValue(TRAIN))
    assert cli.unknown_settings(["network_def#channels", "max_epochs", "max_epoch"], train) == {
        "max_epoch": " (did you mean --max_epochs?)"}


def test_root_cause_is_the_error_bundle_code_raised(capsys: pytest.CaptureFixture) -> None:
    config = {"imports": ["$import bundle", "$import bundle.settings"], "x": "$bundle.settings.as_bool('maybe', '-x')"}
    parser = ConfigParser(config)
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:
        parser.get_parsed_content("x")
    assert isinstance(cli.root_cause(info.value), ValueError)
    cli.report_error(info.type, info.value, info.tb)
    short = capsys.readouterr().err
    assert last_line(short) == "error: ValueError: -x must be true or false, got 'maybe'"
    assert "Failed to evaluate" not in short and "bundle/settings.py" in short
    cli.report_error(info.type, info.value, info.tb, debug=True)
    full = capsys.readouterr().err
    assert "Failed to evaluate" in full and last_line(full) == last_line(short)


@pytest.mark.parametrize("expression, message", [
    ("$int('z')", "invalid literal for int"),  # under MONAI's "Failed to evaluate" wrapper
    ("$str(@nowhere)", "`@nowhere` is not defined"),  # MONAI's message, over its look-up's "Unsupported option"
])
def test_root_cause_of_a_library_error_is_the_outermost_that_is_no_wrapper(expression: str, message: str) -> None:
    with pytest.raises(Exception) as info:
        ConfigParser({"x": expression}).get_parsed_content("x")
    assert len(cli._chain(info.value)) == 2
    cause = cli.root_cause(info.value)
    assert isinstance(cause, ValueError) and message in str(cause)


def test_keyboard_interrupt_keeps_the_previous_hook(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc_info: seen.append(exc_info[0]))
    cli.install_excepthook()
    cli.install_excepthook()  # installing twice does not chain the report to itself
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    sys.excepthook(ValueError, ValueError("bad"), None)
    assert seen == [KeyboardInterrupt]
    assert last_line(capsys.readouterr().err) == "error: ValueError: bad"


def test_unknown_flag_stops_inference_before_anything_is_written(tmp_path: Path) -> None:
    crop = write_crop(tmp_path / "crop.nii.gz")
    out = tmp_path / "out"
    proc = bundle_run("--config_file", INFERENCE, "--input_path", str(crop), "--output_dir", str(out),
                      "--method", "fbp", "--device", "cpu", "--view", "4")
    assert proc.returncode != 0
    assert "unknown setting --view (did you mean --views?)" in last_line(proc.stderr)
    assert "Failed to evaluate" not in proc.stderr  # the short form: the root cause's traceback only
    assert not out.exists()


def test_unknown_flag_stops_training_and_debug_prints_the_whole_chain(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = bundle_run("training", "--config_file", TRAIN, "--output_dir", str(out), "--max_epoch", "1",
                      "--debug", "true")
    assert proc.returncode != 0
    assert "unknown setting --max_epoch (did you mean --max_epochs?)" in last_line(proc.stderr)
    assert "Failed to evaluate" in proc.stderr and "direct cause" in proc.stderr
    assert not out.exists()


def test_missing_input_ends_with_a_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "ct.nii.gz"
    out = tmp_path / "out"
    proc = bundle_run("--config_file", INFERENCE, "--input_path", str(missing), "--output_dir", str(out),
                      "--method", "fbp", "--device", "cpu")
    assert proc.returncode != 0
    line = last_line(proc.stderr)
    assert line.startswith("error: ") and str(missing) in line, proc.stderr[-2000:]
    assert "Failed to evaluate" not in proc.stderr


def test_known_flags_in_every_form_still_work(tmp_path: Path) -> None:
    crop = write_crop(tmp_path / "crop.nii.gz")
    out = tmp_path / "out"
    proc = bundle_run("--config_file", INFERENCE, "--input_path", str(crop), f"--output_dir={out}",
                      "--method", "fbp", "--device", "cpu", "--views=4", "--noprogress", "--debug", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["geometry"]["angles"]) == 4
