"""configs/metadata.json validates against the offline copy of the bundle metadata schema."""

from __future__ import annotations

import json
import logging.config
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
SCHEMA = ROOT / "configs" / "schema" / "meta_schema.json"


def test_metadata_valid():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    meta = json.loads(META.read_text())
    jsonschema.validate(meta, schema)
    assert meta["version"] in meta["changelog"]
    assert set(meta["network_data_format"]["inputs"]) == {"image", "timesteps", "separation"}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert "optional_packages_version" not in meta  # deprecated by MONAI for required_packages_version
    assert meta["eval_metrics"], "eval_metrics must carry the model card's held-out numbers"


def test_one_version_string() -> None:
    """The version lives in metadata.json; the package and pyproject read it from there."""
    import bundle

    meta = json.loads(META.read_text())
    assert bundle.__version__ == meta["version"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def _bundle_cli(*args: str) -> subprocess.CompletedProcess:
    from tests.conftest import subprocess_env

    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def test_monai_verify_metadata_and_net_in_out() -> None:
    """MONAI's own checks: the metadata against the (offline) schema, the network against its declared inputs/outputs."""
    meta = _bundle_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "configs/schema/meta_schema.json")
    assert meta.returncode == 0, meta.stderr[-2000:]
    assert "metadata is verified with no error" in meta.stderr + meta.stdout
    net = _bundle_cli(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--extra_forward_args", "{'timesteps': 500, 'separation': 1}", "--device", "cpu",
    )
    assert net.returncode == 0, net.stderr[-2000:]
    assert "data shape of network is verified with no error" in net.stderr + net.stdout


def test_schema_rejects_missing_fields():
    schema = json.loads(SCHEMA.read_text())
    meta = json.loads(META.read_text())
    del meta["monai_version"]
    with pytest.raises(jsonschema.ValidationError, match="monai_version"):
        jsonschema.validate(meta, schema)


def test_logging_conf_loads():
    logging.config.fileConfig(str(ROOT / "configs" / "logging.conf"), disable_existing_loggers=False)
