"""Reading configuration values as the command line delivers them.

``python -m monai.bundle run ... --progress false`` hands the config the *string* ``"false"``
(fire turns only ``False`` into a boolean), and ``bool("false")`` is ``True``. Flags that users
set from the command line go through :func:`as_bool`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

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


def setting_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    open_maximum: bool = False,
    open_minimum: bool = False,
) -> float | int:
    """``value`` as a number in range, or a ValueError naming the setting ``name`` and the rule.

    Args:
        name: the setting, for the message.
        value: the configured value (numbers, or strings as the command line may give them).
        minimum: the smallest allowed value (None: unbounded).
        maximum: the largest allowed value (None: unbounded).
        integer: the value must be a whole number (returned as int).
        open_maximum: ``maximum`` itself is not allowed.
        open_minimum: ``minimum`` itself is not allowed.
    """
    low = "" if minimum is None else f"{'>' if open_minimum else '>='} {minimum:g}"
    high = "" if maximum is None else f"{'<' if open_maximum else '<='} {maximum:g}"
    rule = f"{'an integer' if integer else 'a number'}{' ' + low if low else ''}{' and ' + high if low and high else ' ' + high if high else ''}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (integer and number != int(number)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if minimum is not None and (number < minimum or (open_minimum and number == minimum)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if maximum is not None and (number > maximum or (open_maximum and number == maximum)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(number) if integer else number


def check_device(device: torch.device | str | None) -> torch.device:
    """The device, refused in one line naming the setting ``device`` when it does not exist here.

    ``None`` / empty means the CPU; ``"auto"`` means CUDA when available, else the CPU.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cpu" if device in (None, "", "null", "None", "none") else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} was requested, but CUDA is not available on this machine; set device to 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(dev)!r} is not supported; set device to 'cpu' or 'cuda'")
    return dev
