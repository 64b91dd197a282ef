"""Reading configuration values as the command line delivers them.

``python -m monai.bundle run ... --progress false`` hands the config the *string* ``"false"``
(fire turns only ``False`` into a boolean), and ``bool("false")`` is ``True``. Flags that users
set from the command line go through :func:`as_bool`.
"""

from __future__ import annotations

from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "", "none", "null"}


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a boolean: booleans, 0 / 1, ``None``, and the strings true/false, yes/no, on/off, 1/0.

    Args:
        value: the configured value.
        name: the setting's name, for the error message.

    Raises:
        ValueError: for anything else (``"maybe"``, ``2``), naming the setting.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")
