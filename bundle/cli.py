"""The ``python -m monai.bundle run`` command line: unknown settings stop the run, errors end in one line.

monai.bundle's fire-based command line merges every ``--name value`` it does not know into the
config, so a misspelled setting (``--view 4`` for ``--views 4``) is silently ignored; and an error
surfaces as 60-90 lines of chained tracebacks whose last line is MONAI's wrapper
``RuntimeError: Failed to evaluate ConfigExpression``. The configs' ``initialize`` step calls
:func:`initialize`, which

1. installs :func:`report_error` as ``sys.excepthook``: an uncaught error prints the traceback of its
   root cause (the chain unwrapped to the exception that bundle code raised; the whole chain with
   ``--debug true``) and then one line, ``error: <type>: <message>``; the exit status stays 1;
2. checks the command line against the ids that the config files define and raises, naming each
   unknown setting and the closest known one.

monai.bundle gives a config no view of its overrides (they are merged into the parser before
``initialize`` runs), so :func:`read_command_line` re-reads ``sys.argv`` as fire parses it for
``monai.bundle.scripts.run``: ``--name value``, ``--name=value``, a bare ``--name`` (``True``;
``--noname`` is ``False``), positional arguments bound to ``run``'s parameters in order, nested ids
(``--network_def#channels``), the flags after a lone ``--`` (fire's own) ignored, and the defaults of
``--args_file`` under the command line's. Both steps act only when the process is
``python -m monai.bundle run``: in-process ``monai.bundle.run`` calls (tests, scripts/benchmark.py,
MONAI Label) and errors raised before ``initialize`` (a config file that does not exist or is not
valid JSON) are MONAI's as before.
"""

from __future__ import annotations

import difflib
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bundle.settings import as_bool

__all__ = [
    "CommandLine",
    "check_settings",
    "defined_config",
    "initialize",
    "install_excepthook",
    "is_bundle_command_line",
    "read_command_line",
    "report_error",
    "root_cause",
    "unknown_settings",
]

BUNDLE_DIR = Path(__file__).resolve().parent
CLI_SETTINGS = ("debug",)  # settings read here, defined by no config
# the messages of MONAI's RuntimeErrors raised `from` the error of a config item or a transform
MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate component", "applying transform")


@dataclass(frozen=True)
class CommandLine:
    """What ``python -m monai.bundle run`` was given.

    Args:
        arguments: monai.bundle's own arguments (``config_file``, ``args_file``, ``run_id``, ...).
        overrides: config ids to override, each with its value as given (a string from the command
            line, any value from ``--args_file``).
        flags: how each override was written, for messages (``{"view": "--view"}``).
    """

    arguments: dict[str, Any]
    overrides: dict[str, Any]
    flags: dict[str, str]


def _monai_parameters() -> tuple[list[str], set[str]]:
    """``run``'s parameters in positional order, and every name monai.bundle consumes itself."""
    from monai.bundle import scripts, workflows

    def names(function: Callable) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name != "self"]

    positional = names(scripts.run)
    own = set(positional) | set(names(scripts.create_workflow)) | set(names(workflows.ConfigWorkflow.__init__))
    return positional, own


def _is_flag(argument: str) -> bool:
    """fire's rule: ``--name`` or ``-n...``, but not a negative number."""
    return argument.startswith("--") or (len(argument) > 1 and argument[0] == "-" and argument[1].isalpha())


def _parse_value(value: Any) -> Any:
    """A command-line string as fire hands it to ``run`` (``"['a.json','b.json']"`` -> a list)."""
    from fire.parser import DefaultParseValue

    return DefaultParseValue(value) if isinstance(value, str) else value


def read_command_line(args: Sequence[str]) -> CommandLine:
    """The arguments of ``python -m monai.bundle run ARGS`` as fire and monai.bundle read them.

    Args:
        args: the words after ``run``, e.g. ``sys.argv[2:]``.

    Returns:
        monai.bundle's own arguments (parsed as fire parses them), the overrides and their spelling.
    """
    args = list(args)
    if "--" in args:  # fire's own flags (--help, --trace, ...) follow the last lone "--"
        args = args[: len(args) - 1 - args[::-1].index("--")]
    positional_names, own = _monai_parameters()
    given: dict[str, Any] = {}
    flags: dict[str, str] = {}
    positional: list[str] = []
    index = 0
    while index < len(args):
        argument = args[index]
        index += 1
        if not _is_flag(argument):
            positional.append(argument)
            continue
        key, equals, value = argument.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not equals and (index == len(args) or _is_flag(args[index])):
            key, value = (key[2:], "False") if key not in own and key.startswith("no") else (key, "True")
        elif not equals:
            value = args[index]
            index += 1
        given[key] = value
        flags[key] = argument.partition("=")[0]
    for name in [n for n in positional_names if n not in given][: len(positional)]:
        given[name] = positional.pop(0)
    args_file = given.get("args_file")
    if args_file is not None:
        from monai.bundle import ConfigParser

        defaults = ConfigParser.load_config_file(_parse_value(args_file))
        flags = {**{key: f"{key} (in {args_file})" for key in defaults}, **flags}
        given = {**defaults, **given}
    arguments = {key: _parse_value(value) for key, value in given.items() if key in own}
    overrides = {key: value for key, value in given.items() if key not in own}
    return CommandLine(arguments=arguments, overrides=overrides, flags={k: flags[k] for k in overrides})


def defined_config(config_file: str | Sequence[str], meta_file: str | Sequence[str] | None = None) -> Any:
    """The config that the files define, before any override: macros resolved, metadata under ``_meta_``.

    Args:
        config_file: one path, a comma-separated string or a list of paths, merged in order.
        meta_file: the metadata file(s); by default ``metadata.json`` beside the first config file.

    Returns:
        a ``monai.bundle.ConfigParser`` holding the merged config.
    """
    from monai.bundle import ConfigParser
    from monai.utils import ensure_tuple

    parser = ConfigParser()
    parser.read_config(config_file)
    if meta_file is None:
        first = ensure_tuple(config_file)[0]
        meta_file = str(Path(str(first).split(",")[0]).parent / "metadata.json")
    if all(Path(f).is_file() for f in ensure_tuple(meta_file)):
        parser.read_meta(meta_file)
    parser.resolve_macro_and_relative_ids()
    return parser


def _close(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean --NAME?)`` for the closest candidate, or nothing."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean --{match[0]}?)" if match else ""


def unknown_settings(overrides: Iterable[str], config: Any, known: Iterable[str] = ()) -> dict[str, str]:
    """The overrides that ``config`` does not define, each with the closest defined id.

    A nested id (``network_def#channels``) must exist in the config; a new keyword of a
    ``_target_`` component (``network_def#dropout``) is accepted, since the component's
    constructor rejects a wrong one.

    Args:
        overrides: config ids given on the command line (``#`` or ``::`` between levels).
        config: a ``monai.bundle.ConfigParser`` over the config files (see :func:`defined_config`).
        known: further top-level names that are not config ids (monai.bundle's own arguments).

    Returns:
        ``{id: suggestion}``, the suggestion `` (did you mean --views?)`` or empty.
    """
    from monai.bundle.utils import ID_SEP_KEY

    top_level = [*config.get(), *known]
    unknown: dict[str, str] = {}
    for override in overrides:
        parts = override.replace("#", ID_SEP_KEY).split(ID_SEP_KEY)
        if parts[0] not in top_level:
            unknown[override] = _close(parts[0], top_level)
            continue
        if len(parts) == 1 or override in config:
            continue
        parent = ID_SEP_KEY.join(parts[:-1])
        value = config.get(parent) if parent in config else None
        if isinstance(value, dict) and "_target_" in value:
            continue
        keys = value if isinstance(value, dict) else range(len(value)) if isinstance(value, list) else ()
        siblings = [f"{parent.replace(ID_SEP_KEY, '#')}#{key}" for key in keys]
        unknown[override] = _close(override.replace(ID_SEP_KEY, "#"), siblings)
    return unknown


def _tracking_settings(tracking: Any) -> list[str]:
    """The ids that ``--tracking`` adds to the config (and that may then be overridden)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if tracking is None:
        return []
    settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else None
    settings = settings or ConfigParser.load_config_files(tracking)
    return list(settings.get("configs", {}))


def check_settings(command_line: CommandLine) -> None:
    """Stop when a setting on the command line is defined by none of its config files.

    Args:
        command_line: see :func:`read_command_line`.

    Raises:
        ValueError: naming every unknown setting, the closest known one and the config files.
    """
    config_file = command_line.arguments.get("config_file")
    if config_file is None:
        return  # monai.bundle itself refuses a run without configs
    config = defined_config(config_file, command_line.arguments.get("meta_file"))
    _, own = _monai_parameters()
    known = [*own, *CLI_SETTINGS, *_tracking_settings(command_line.arguments.get("tracking"))]
    unknown = unknown_settings(command_line.overrides, config, known)
    if unknown:
        names = "; ".join(f"unknown setting {command_line.flags.get(key, key)}{hint}" for key, hint in unknown.items())
        files = ", ".join(str(f) for f in (config_file if isinstance(config_file, (list, tuple)) else [config_file]))
        raise ValueError(f"{names}: not defined in {files}")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return chain


def _raised_by_bundle(exc: BaseException) -> bool:
    """Whether the ``raise`` of ``exc`` is in this package's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    filename = frames[-1].filename if frames else "<none>"
    return not filename.startswith("<") and Path(filename).resolve().is_relative_to(BUNDLE_DIR)


def _is_wrapper(exc: BaseException) -> bool:
    """Whether ``exc`` is one of MONAI's ``RuntimeError``s that only say where their cause was raised."""
    return type(exc) is RuntimeError and exc.__cause__ is not None and str(exc).startswith(MONAI_WRAPPERS)


def root_cause(exc: BaseException) -> BaseException:
    """The exception of ``exc``'s chain that says what went wrong.

    The outermost one that bundle code raised (bundle code wraps a library's error to name the file
    or setting), else the outermost that is not one of MONAI's wrappers (MONAI too names the file or
    the config id over a library's error), else the innermost.
    """
    chain = _chain(exc)
    return next((e for e in chain if _raised_by_bundle(e)), next((e for e in chain if not _is_wrapper(e)), chain[-1]))


def _one_line(exc: BaseException) -> str:
    """``error: <type>: <message>``, the message's lines joined."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"error: {type(exc).__name__}: {message}" if message else f"error: {type(exc).__name__}"


def report_error(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, debug: bool = False
) -> None:
    """Print an uncaught error: a traceback, then one line with the root cause's type and message.

    Args:
        exc_type: the exception's type (``sys.excepthook``'s signature).
        exc: the exception.
        tb: its traceback.
        debug: print the whole chain of tracebacks, not only the root cause's.
    """
    cause = root_cause(exc)
    if debug:
        lines = traceback.format_exception(exc_type, exc, tb)
    else:
        header = "Traceback of the root cause (most recent call last; --debug true prints the whole chain):\n"
        lines = [header, *traceback.format_tb(cause.__traceback__)]
    sys.stderr.write("".join(lines) + _one_line(cause) + "\n")
    sys.stderr.flush()


def install_excepthook(debug: bool = False) -> None:
    """Make :func:`report_error` print uncaught errors; ``KeyboardInterrupt`` and the like keep the previous hook.

    Args:
        debug: print the whole chain of tracebacks.
    """
    previous = getattr(sys.excepthook, "previous", sys.excepthook)

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(exc_type, Exception):
            previous(exc_type, exc, tb)
            return
        try:
            report_error(exc_type, exc, tb, debug=debug)
        except Exception:  # never hide the error behind a failure to report it
            previous(exc_type, exc, tb)

    hook.previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook


def is_bundle_command_line() -> bool:
    """Whether this process is ``python -m monai.bundle run ...`` (or ``torchrun -m monai.bundle run``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__" and sys.argv[1:2] == ["run"]


def initialize() -> None:
    """The configs' ``initialize`` step: install the error report and check the command line's settings.

    Does nothing unless the process is ``python -m monai.bundle run`` (see :func:`is_bundle_command_line`).

    Raises:
        ValueError: a setting that no config defines, or ``--debug`` not true or false.
    """
    if not is_bundle_command_line():
        return
    install_excepthook()
    command_line = read_command_line(sys.argv[2:])
    install_excepthook(debug=as_bool(command_line.overrides.get("debug", False), "--debug"))
    check_settings(command_line)
