"""Shared plumbing of the dataset adapters: argument checks, CSV reading, subject splits and writing.

Every adapter builds a list of item dicts with absolute paths and a ``subject`` key, hands it to
:func:`split_sections` (which calls :func:`data_prep.datalist.split_by_subject`) and writes the result
with :func:`write_sections` (which calls :func:`data_prep.datalist.write_datalist`). Nothing here
knows about a particular dataset.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import inspect
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.datalist import split_by_subject, write_datalist
from transforms.errors import InputDataError

__all__ = [
    "EXTRA_PATH_KEYS",
    "SECTIONS",
    "Adapter",
    "add_common_args",
    "check_fractions",
    "hashed_subject",
    "read_csv",
    "require_dir",
    "require_file",
    "split_sections",
    "write_sections",
]

#: the three sections every adapter writes (possibly empty, never all empty)
SECTIONS = ("training", "validation", "test")

#: path-valued item keys that :data:`data_prep.datalist.PATH_KEYS` does not list; written relative
#: to the datalist here (``load_datalist`` resolves them too, as they exist, but does not check them)
EXTRA_PATH_KEYS = ("neg_mask",)


@dataclass(frozen=True)
class Adapter:
    """One ``python -m data_prep <name>`` subcommand.

    Args:
        name: the subcommand name (also the adapter function's name).
        help: one line shown by ``python -m data_prep --help``.
        configure: adds the adapter's options to its subparser.
        run: calls the adapter function with the parsed arguments and returns the written paths.
        func: the adapter function; its docstring (up to ``Args:``) is the subcommand's description.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Path]]
    func: Callable[..., list[Path]]

    @property
    def description(self) -> str:
        """The adapter function's docstring up to its ``Args:`` block."""
        return inspect.cleandoc(self.func.__doc__ or self.help).split("\nArgs:")[0].strip()


def add_common_args(
    parser: argparse.ArgumentParser,
    seed: bool = True,
    val_frac: float | None = None,
    test_frac: float | None = None,
) -> None:
    """Add ``--root``, ``--out`` and, where the adapter splits, ``--seed``/``--val-frac``/``--test-frac``.

    Args:
        parser: the adapter's subparser.
        seed: add ``--seed``.
        val_frac: default of ``--val-frac``; ``None`` leaves the option out.
        test_frac: default of ``--test-frac``; ``None`` leaves the option out.
    """
    parser.add_argument("--root", required=True, type=Path, help="dataset folder as downloaded")
    parser.add_argument("--out", required=True, type=Path, help="folder the datalist JSON is written to")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the subject split (default: 0)")
    if val_frac is not None:
        parser.add_argument(
            "--val-frac",
            type=float,
            default=val_frac,
            help=f"fraction of subjects for validation (default: {val_frac})",
        )
    if test_frac is not None:
        parser.add_argument(
            "--test-frac",
            type=float,
            default=test_frac,
            help=f"fraction of subjects for test (default: {test_frac})",
        )


def check_fractions(val_frac: float, test_frac: float = 0.0) -> dict[str, float]:
    """Check split fractions and return the three section fractions.

    Args:
        val_frac: fraction of subjects for ``validation``.
        test_frac: fraction of subjects for ``test``.

    Returns:
        ``{"training": 1 - val - test, "validation": val_frac, "test": test_frac}``.

    Raises:
        ValueError: a fraction is negative or they sum to more than 1.
    """
    if val_frac < 0 or test_frac < 0 or val_frac + test_frac > 1:
        raise ValueError(
            f"need 0 <= val_frac, test_frac and val_frac + test_frac <= 1, got {val_frac}, {test_frac}."
        )
    return {"training": 1.0 - val_frac - test_frac, "validation": float(val_frac), "test": float(test_frac)}


def require_dir(path: str | os.PathLike, what: str = "dataset root") -> Path:
    """An absolute ``Path`` to an existing folder.

    Args:
        path: the folder.
        what: how the folder is named in the error.

    Returns:
        ``Path(path).absolute()``.

    Raises:
        InputDataError: the folder does not exist.
    """
    p = Path(path).absolute()
    if not p.is_dir():
        raise InputDataError(f"{what} folder does not exist", p)
    return p


def require_file(path: str | os.PathLike, referenced_by: str | os.PathLike | None = None) -> Path:
    """An absolute ``Path`` to an existing file or folder, else an error naming it and its referrer.

    Args:
        path: the file (or DICOM series folder).
        referenced_by: where the path came from (a CSV and row), for the message.

    Returns:
        ``Path(path).absolute()``.

    Raises:
        InputDataError: the path does not exist.
    """
    p = Path(path).absolute()
    if not p.exists():
        fault = "file does not exist"
        if referenced_by is not None:
            fault += f" (referenced by {os.fspath(referenced_by)})"
        raise InputDataError(fault, p)
    return p


def read_csv(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a CSV (``.csv`` or ``.csv.gz``) into row dicts, checking the required columns.

    Column names are stripped of surrounding spaces and a UTF-8 byte order mark; values are stripped.

    Args:
        path: the CSV file.
        required: columns that must be present.

    Returns:
        One dict per row, column → string value (``""`` for blanks).

    Raises:
        InputDataError: the file is missing, has no header, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("CSV file does not exist", path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    if reader.fieldnames is None:
        raise InputDataError("CSV file is empty (no header row)", path)
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    missing = [c for c in required if c not in reader.fieldnames]
    if missing:
        raise InputDataError(f"CSV lacks required column(s) {missing} (it has {reader.fieldnames})", path)
    return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def hashed_subject(key: str, prefix: str = "s") -> str:
    """A stable pseudonymous subject ID from a relative path (never from DICOM patient tags).

    Args:
        key: e.g. the item's path relative to the dataset root, in POSIX form.
        prefix: prefix of the ID.

    Returns:
        ``"<prefix>-<first 12 hex digits of SHA-256(key)>"``.
    """
    return f"{prefix}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def split_sections(
    items: Sequence[dict[str, Any]],
    fractions: Mapping[str, float],
    seed: int = 0,
    stratify_by: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Split items into sections by their ``subject`` (all items of a subject land in one section).

    Args:
        items: item dicts, each with a ``subject`` key.
        fractions: section → fraction of subjects (see :func:`check_fractions`).
        seed: seed of :func:`data_prep.datalist.split_by_subject`.
        stratify_by: item key whose value (e.g. the class) stratifies the split; a subject's stratum is
            the value of its first item.

    Returns:
        Section → items (in input order), with every section of ``fractions`` present.
    """
    strata: dict[str, str] | None = None
    if stratify_by is not None:
        strata = {}
        for it in items:
            strata.setdefault(it["subject"], str(it[stratify_by]))
    parts = split_by_subject([it["subject"] for it in items], fractions, seed=seed, strata=strata)
    where = {s: sec for sec, subs in parts.items() for s in subs}
    out: dict[str, list[dict[str, Any]]] = {sec: [] for sec in fractions}
    for it in items:
        out[where[it["subject"]]].append(it)
    return out


def _relative_extra_paths(item: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    return {
        k: (os.path.relpath(v, folder) if k in EXTRA_PATH_KEYS and isinstance(v, str) else v)
        for k, v in item.items()
    }


def write_sections(
    out: str | os.PathLike,
    filename: str,
    sections: Mapping[str, Iterable[Mapping[str, Any]]],
    name: str,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one datalist (never an empty one) and print a one-line summary of its section counts.

    Items are sorted by ``(subject, image)`` inside each section so the file depends only on the data,
    the options and the seed.

    Args:
        out: output folder (created if needed).
        filename: datalist file name inside ``out``.
        sections: section → items with absolute paths.
        name: dataset name stored in the file.
        description: free text stored in the file.
        extra: more top-level keys (``labels``, ``findings``...).

    Returns:
        The written path.

    Raises:
        InputDataError: all sections are empty, or a subject appears in two sections (a leak in a
            split that the dataset itself prescribes).
    """
    path = Path(out).absolute() / filename
    secs = {
        sec: sorted(
            (_relative_extra_paths(it, path.parent) for it in items),
            key=lambda it: (str(it.get("subject", "")), str(it.get("image", it.get("study", "")))),
        )
        for sec, items in sections.items()
    }
    if not any(secs.values()):
        raise InputDataError("refusing to write an empty datalist (no items in any section)", path)
    try:
        write_datalist(path, secs, name=name, description=description, extra=extra)
    except ValueError as e:  # a subject in two sections
        raise InputDataError(
            f"subject leak between sections: {str(e).removeprefix(f'{path}: ')}", path
        ) from e
    counts = ", ".join(f"{sec}={len(v)}" for sec, v in secs.items())
    n_subjects = len({it.get("subject") for v in secs.values() for it in v})
    print(f"{name}: wrote {path} ({counts}; {n_subjects} subjects)")
    return path
