"""bundle.settings.as_bool: flags as the monai.bundle command line delivers them."""

from __future__ import annotations

import pytest

from bundle.recon.inferers import make_inferer
from bundle.settings import as_bool


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False), (None, False),
     ("true", True), ("True", True), ("yes", True), ("on", True), ("1", True),
     ("false", False), ("False", False), ("no", False), ("off", False), ("0", False), (" false ", False)],
)
def test_values(value, expected):
    assert as_bool(value, "flag") is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, "tru", [True]])
def test_anything_else_is_an_error_naming_the_setting(value):
    with pytest.raises(ValueError, match=r"progress must be true or false, got"):
        as_bool(value, "progress")


def test_inferer_reads_command_line_flags():
    """``--progress false`` reaches the config as the string "false": no progress bar."""
    assert make_inferer("dbpp", progress="false", mixed_precision="false").progress is False
    assert make_inferer("dbpp", progress="true").progress is True
    with pytest.raises(ValueError, match="progress"):
        make_inferer("dbpp", progress="sometimes")
