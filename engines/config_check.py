"""Early checks of the command-line overrides of ``python -m monai.bundle run``.

MONAI applies ``--key value`` overrides with ``ConfigParser.update``: a key it does not know is
silently added (``--epocs 3`` trains for the default number of epochs), no type is checked
(``--epochs abc`` fails late, deep inside Ignite) and a path is first opened when the data is
loaded. Every entry config of the bundles therefore starts its ``initialize`` list with
``"$engines.check_overrides()"``: it re-reads this run's command line and config files, *without*
evaluating any expression, and refuses an unknown key, a value of the wrong type or a missing input
file with one line naming the key, before anything is built or loaded.

The command line is read from ``sys.argv`` as ``fire`` parsed it for ``monai.bundle run``; outside
such a process (a workflow built in Python, a test) there is nothing to check.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "INPUT_PATH_NAMES",
    "INPUT_PATH_SUFFIXES",
    "RUN_ARGS",
    "ConfigOverrideError",
    "check_overrides",
    "cli_run_args",
    "is_input_path_key",
    "parse_run_args",
]

#: arguments that ``monai.bundle run`` / ``run_workflow`` consume themselves (``run``,
#: ``create_workflow`` and ``ConfigWorkflow.__init__``); everything else is a config override
RUN_ARGS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)

#: positional parameters of the ``monai.bundle`` commands that build a ``ConfigWorkflow``, in order
#: (fire fills the ones not given as ``--name`` from the positional arguments)
_POSITIONAL = {
    "run": (
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
    ),
    "run_workflow": ("workflow_name", "args_file"),
}

#: keys (last ``#`` component) whose value is an existing input file or folder; outputs that a run
#: creates (``output_dir``, ``ckpt_dir``, ``latent_scale_file`` while training the autoencoder) and
#: ``input``/``input_views`` (batch inference reports a missing input per input) are not checked
INPUT_PATH_NAMES = frozenset({"datalist", "dataset_dir", "checkpoint", "classifier_labels"})
#: suffixes of such keys: ``input_datalist``, ``diffusion_checkpoint``, ``resnet50_weights``...
INPUT_PATH_SUFFIXES = ("_datalist", "_checkpoint", "_weights")

#: first characters of a config value that MONAI evaluates instead of taking literally
_CODE_PREFIXES = ("$", "@", "%")
#: a ``@id`` reference inside a config string (ids are words joined by ``#`` or ``::``)
_REF = re.compile(r"@(\w+(?:(?:#|::)\w+)*)")
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
_MISSING = object()


class ConfigOverrideError(ValueError):
    """A command-line override of a bundle config that cannot be right: unknown key, wrong type, missing file."""


def is_input_path_key(key: str) -> bool:
    """Whether an override of ``key`` names an input file or folder that must already exist.

    Args:
        key: config id, nested with ``#`` or ``::``.

    Returns:
        ``True`` when the last component is in :data:`INPUT_PATH_NAMES` or ends with one of
        :data:`INPUT_PATH_SUFFIXES`.
    """
    name = _norm(key).rsplit("#", 1)[-1]
    return name in INPUT_PATH_NAMES or name.endswith(INPUT_PATH_SUFFIXES)


def cli_run_args(argv: Sequence[str] | None = None) -> tuple[str, list[str]] | None:
    """The command and its arguments when this process is ``python -m monai.bundle run ...``.

    Args:
        argv: a full command line (default ``sys.argv``); ``argv[0]`` is the program.

    Returns:
        ``(command, arguments after the command)`` for ``run`` and ``run_workflow``, else ``None``.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        return None
    prog = Path(argv[0])
    # ``python -m monai.bundle`` sets argv[0] to the path of monai/bundle/__main__.py (torchrun's
    # workers are started the same way)
    if prog.name != "__main__.py" or prog.parent.name != "bundle" or prog.parent.parent.name != "monai":
        return None
    if argv[1] not in _POSITIONAL:
        return None
    return argv[1], argv[2:]


def _is_flag(arg: str) -> bool:
    # fire.core._IsFlag: "-x", "-x=1", "--name", "-abc"; "-1" is a negative number, not a flag
    return bool(arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg))


def parse_run_args(args: Sequence[str], command: str = "run") -> tuple[dict[str, Any], dict[str, str]]:
    """Parse the arguments of ``monai.bundle run`` as ``fire`` does.

    ``--name value`` and ``--name=value`` give ``name`` (``-`` in a name becomes ``_``); a flag
    followed by another flag or by nothing is ``True``, and such a bare ``--noname`` is
    ``name=False``. Values are parsed by ``fire.parser.DefaultParseValue``: ``3`` is an int, ``1e-3``
    a float, ``True`` a bool, ``[1, 2]`` a list, while ``true``, ``abc`` and ``/a/b.json`` stay text.
    Positional arguments fill the command's parameters that were not named; everything after a last
    lone ``--`` belongs to fire itself.

    Args:
        args: the arguments after the command.
        command: ``"run"`` or ``"run_workflow"``.

    Returns:
        ``(values, origins)``: every argument by name (``monai`` arguments and overrides alike), and
        for each name the command-line token it came from.
    """
    from fire.parser import DefaultParseValue

    args = list(args)
    if "--" in args:
        args = args[: len(args) - 1 - args[::-1].index("--")]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    positional: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if not _is_flag(arg):
            positional.append(arg)
            continue
        stripped = arg.lstrip("-")
        has_eq = "=" in arg
        key, raw = stripped.split("=", 1) if has_eq else (stripped, None)
        key = key.replace("-", "_")
        if raw is None:
            if i + 1 == len(args) or _is_flag(args[i + 1]):
                # fire's boolean syntax: a bare --name is True, a bare --noname sets name to False
                # (run's own parameters never start with "no")
                if key.startswith("no") and key not in _POSITIONAL[command]:
                    key, raw = key[2:], "False"
                else:
                    raw = "True"
            else:
                raw = args[i + 1]
                skip = True
        values[key] = DefaultParseValue(raw)
        origins[key] = arg
    for name in _POSITIONAL[command]:
        if name not in values and positional:
            values[name] = DefaultParseValue(positional.pop(0))
            origins[name] = str(values[name])
    return values, origins


def _norm(key: str) -> str:
    return key.replace("::", "#")


def _config_files(config_file: Any) -> list[str]:
    # the forms ConfigParser.load_config_files accepts: a list, or one path / comma-separated paths
    if isinstance(config_file, (list, tuple)):
        return [str(f) for f in config_file]
    text = str(config_file)
    if not Path(text).is_file() and "," in text:
        return [f.strip() for f in text.split(",")]
    return [text]


def _display_names(files: Sequence[str]) -> list[str]:
    names = [Path(f).name for f in files]
    return names if len(set(names)) == len(names) else [str(f) for f in files]


def _defined(parser: Any, key: str) -> bool:
    try:
        parser[key]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def _ids(config: Any, prefix: str = "") -> list[str]:
    """Every id of a config, nested ids joined with ``#``."""
    items: Any = (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    )
    out = []
    for k, v in items:
        id_ = f"{prefix}#{k}" if prefix else str(k)
        out.append(id_)
        out += _ids(v, id_)
    return out


def _references(config: Any) -> set[str]:
    """The ids that the config refers to with ``@id`` (in references and inside expressions)."""
    if isinstance(config, str):
        return {_norm(m) for m in _REF.findall(config)}
    if isinstance(config, dict):
        return set().union(set(), *(_references(v) for v in config.values()))
    if isinstance(config, list):
        return set().union(set(), *(_references(v) for v in config))
    return set()


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_code(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_CODE_PREFIXES)


def _type_hint(key: str, default: Any, value: Any) -> str | None:
    """``None`` when ``value`` may replace the literal ``default`` of ``key``, else a hint (maybe "")."""
    if default is None or value is None or _is_code(default) or _is_code(value):
        return None  # null defaults take anything; expressions, references and macros are not literals
    hint = _literal_hint(key, default, value)
    if hint is not None and isinstance(value, str) and value.lower() in ("null", "none"):
        # fire keeps null as text, and monai drops a None override: only an expression sets null
        return f" (for null write --{key} '$None')"
    return hint


def _literal_hint(key: str, default: Any, value: Any) -> str | None:
    """The type rules of :func:`_type_hint` for a literal default and value."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return None
        if isinstance(value, str) and value.lower() == "true":
            return None  # fire keeps a lower-case true as text, which acts as true everywhere
        if isinstance(value, str) and value.lower() == "false":
            # ...but the text "false" acts as true as well
            return f" (fire reads false as text, which counts as true: write False or --no{key})"
        return " (write True or False)"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else ""
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    if isinstance(default, str):
        return None if isinstance(value, str) else f" (quote it for fire: --{key} '\"{value}\"')"
    if isinstance(default, list):
        return None if isinstance(value, (list, tuple)) else ' (a list, e.g. "[1, 2]")'
    if isinstance(default, dict):
        return None if isinstance(value, dict) else ""
    return None


def _defining_file(files: Sequence[str], names: Sequence[str], key: str) -> str:
    """The last of ``files`` that sets ``key`` (files are merged in order, later ones win)."""
    from monai.bundle import ConfigParser

    where, before = names[-1], _MISSING
    for i, name in enumerate(names):
        parser = ConfigParser(ConfigParser.load_config_files(list(files[: i + 1])))
        now = parser[key] if _defined(parser, key) else _MISSING
        if now is not _MISSING and (before is _MISSING or now != before):
            where = name
        before = now
    return where


def _merge(base: dict, new: dict) -> dict:
    """``new`` over ``base``, dicts merged recursively and ``None`` dropped (monai's ``update_kwargs``)."""
    out = dict(base)
    for k, v in new.items():
        if v is None:
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_overrides(argv: Sequence[str] | None = None, command: str = "run") -> dict[str, Any]:
    """Refuse command-line overrides of a bundle config that cannot be right, naming the key.

    Called as the first entry of a config's ``initialize`` list (``"$engines.check_overrides()"``),
    so a bad override fails before any model, dataset or loader is built. The run's config files
    (``--config_file`` as a list, comma-separated paths or one path; ``--args_file`` defaults
    included) and metadata are read again with ``ConfigParser`` without evaluating anything, and
    every override (an argument that ``monai.bundle run`` does not consume itself, see
    :data:`RUN_ARGS`) must:

    - name a key of the merged configs (nested ids with ``#`` included), or one they refer to
      with ``@key``; keys starting with ``_`` too;
    - keep the type of a literal default (the last config file's value): an int for an int, an int
      or a float for a float, a bool for a bool (``True``/``False``, a bare ``--key`` or ``--nokey``;
      fire's text ``true`` is accepted, ``false`` is not, because as text it acts as true), text for
      text, a list for a list, a dict for a dict. Null defaults, ``$`` expressions, ``@``
      references and ``%`` macros (as default or as value) are not checked;
    - for an input path key (:func:`is_input_path_key`: ``datalist``, ``dataset_dir``,
      ``checkpoint``, ``classifier_labels``, ``*_datalist``, ``*_checkpoint``, ``*_weights``), be
      a path that exists (relative paths from the working folder, as the run sees them).

    Args:
        argv: the arguments of ``command`` (what follows ``run`` on the command line); default:
            taken from ``sys.argv`` when this process is ``python -m monai.bundle run``, otherwise
            nothing is checked.
        command: ``"run"`` or ``"run_workflow"`` (ignored when ``argv`` is taken from ``sys.argv``).

    Returns:
        The overrides that were checked, by key (empty when there were none).

    Raises:
        ConfigOverrideError: one line naming each bad key (unknown: the files searched and close
            matches; wrong type: the expected and given type and value; missing: the path).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if argv is None:
        found = cli_run_args()
        if found is None:
            return {}
        command, argv = found
    values, origins = parse_run_args(argv, command)
    # the same merge as monai's create_workflow: args_file first, the command line over it
    args_file = values.pop("args_file", None)
    merged = _merge(ConfigParser.load_config_file(args_file) if args_file else {}, values)
    overrides = {k: v for k, v in merged.items() if k not in RUN_ARGS}
    if not overrides or merged.get("config_file") is None:
        return {}  # nothing to check, or monai itself refuses the run for lack of a config

    files = _config_files(merged["config_file"])
    names = _display_names(files)
    parser = ConfigParser(ConfigParser.load_config_files(files))
    meta = merged.get("meta_file") or str(Path(files[0]).parent / "metadata.json")
    if isinstance(meta, (list, tuple)) or Path(str(meta)).is_file():
        parser.read_meta(meta)
    # a key the configs only refer to (@key) is one the caller is expected to set
    known_extra = _references(parser.get())
    tracking = merged.get("tracking")
    if tracking:  # monai adds the tracking settings' keys to the config when they are missing
        settings = (
            DEFAULT_EXP_MGMT_SETTINGS[tracking]
            if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS
            else ConfigParser.load_config_files(tracking)
        )
        known_extra |= set(settings.get("configs", {}))

    problems = []
    for key, value in overrides.items():
        id_ = _norm(key.lstrip("+"))  # "+key" (merge syntax) reaches the config as "key"
        origin = origins.get(key, f"--{key}")
        if not (_defined(parser, id_) or id_ in known_extra):
            depth = id_.count("#")
            same_depth = sorted({c for c in [*_ids(parser.get()), *known_extra] if c.count("#") == depth})
            close = difflib.get_close_matches(id_, same_depth, n=3, cutoff=0.6)
            msg = f"unknown config key {key!r} (not in {', '.join(names)})"
            if origin.lstrip("-").split("=", 1)[0].replace("-", "_") != key:
                msg += f" from {origin!r}"  # e.g. a bare --nosuch that fire read as such=False
            if close:
                msg += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
            problems.append(msg)
        elif is_input_path_key(id_) and value is not None and not _is_code(value):
            if not isinstance(value, str):
                problems.append(
                    f"config key {key!r} expects a path (str), got {_type_name(value)} {_short(value)}"
                )
            elif not os.path.exists(value):
                problems.append(f"config key {key!r}: no such file or folder {value!r}")
        else:
            default = parser[id_] if _defined(parser, id_) else None
            hint = _type_hint(key, default, value)
            if hint is not None:  # name the file only now: finding it re-reads the configs
                problems.append(
                    f"config key {key!r} expects {_type_name(default)} (default {_short(default)} in "
                    f"{_defining_file(files, names, id_)}), got {_type_name(value)} {_short(value)}{hint}"
                )
    if problems:
        raise ConfigOverrideError("; ".join(problems))
    return overrides
