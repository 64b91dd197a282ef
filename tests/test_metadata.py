"""configs/metadata.json validates against the offline copy of the bundle metadata schema."""

from __future__ import annotations

import json
import logging.config
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
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3


def test_schema_rejects_missing_fields():
    schema = json.loads(SCHEMA.read_text())
    meta = json.loads(META.read_text())
    del meta["monai_version"]
    with pytest.raises(jsonschema.ValidationError, match="monai_version"):
        jsonschema.validate(meta, schema)


def test_logging_conf_loads():
    logging.config.fileConfig(str(ROOT / "configs" / "logging.conf"), disable_existing_loggers=False)
