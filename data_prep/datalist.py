"""MONAI datalist JSON files: subject-level splits, atomic writing and checked loading.

A datalist here is MONAI's decathlon layout: ``{"name": ..., "training": [...], "validation": [...],
"test": [...]}`` where each item is a dict with at least ``image`` and a ``subject`` key. Paths are
written relative to the datalist file, so a cohort folder can be moved or mounted elsewhere, and are
resolved again by :func:`monai.data.load_decathlon_datalist` on loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from data_prep.atomic import atomic_write_bytes, atomic_write_text
from transforms.errors import InputDataError

__all__ = [
    "PATH_KEYS",
    "atomic_write_bytes",
    "atomic_write_text",
    "datalist_hash",
    "load_datalist",
    "read_datalist_json",
    "split_by_subject",
    "write_datalist",
]

#: item keys whose values are file paths (made relative on writing, checked on loading)
PATH_KEYS = ("image", "label", "mask", "brain_mask", "neg_mask", "images", "views")


def split_by_subject(
    subjects: Sequence[str],
    fractions: Mapping[str, float],
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Split subject IDs (never slices or images) into named parts with a fixed seed.

    Args:
        subjects: subject IDs; duplicates are collapsed (a subject lands in exactly one part).
        fractions: part name → fraction, e.g. ``{"training": 0.7, "validation": 0.1, "test": 0.2}``.
            Fractions are normalised to sum to 1.
        seed: seed of the permutation, so the same inputs always give the same split.
        strata: optional subject → stratum (e.g. class); each stratum is split separately with the
            same fractions, so every part sees every class where counts allow.

    Returns:
        Part name → sorted subject IDs.

    Raises:
        ValueError: when no subjects or no positive fraction is given.
    """
    uniq = sorted(set(subjects))
    if not uniq:
        raise ValueError("split_by_subject: no subjects to split.")
    names = [k for k, v in fractions.items() if v > 0]
    if not names:
        raise ValueError(f"split_by_subject: fractions must contain a positive value, got {dict(fractions)}.")
    total = float(sum(fractions[k] for k in names))
    groups: dict[str, list[str]] = defaultdict(list)
    for s in uniq:
        groups[strata.get(s, "") if strata else ""].append(s)
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {k: [] for k in fractions}
    for g in sorted(groups):
        members = [groups[g][i] for i in rng.permutation(len(groups[g]))]
        # largest-remainder rounding keeps the part sizes as close to the fractions as possible
        raw = np.array([fractions[k] / total * len(members) for k in names])
        counts = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - counts), kind="stable")[: len(members) - counts.sum()]:
            counts[i] += 1
        start = 0
        for k, c in zip(names, counts, strict=True):
            out[k].extend(members[start : start + c])
            start += c
    return {k: sorted(v) for k, v in out.items()}


def _relativise(value: Any, root: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return [_relativise(v, root) for v in value]
    if isinstance(value, (str, os.PathLike)):
        p = Path(value)
        if p.is_absolute():
            try:
                return os.path.relpath(p, root)
            except ValueError:  # another drive on Windows
                return os.fspath(p)
        return os.fspath(p)
    return value


def write_datalist(
    path: str | os.PathLike,
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    name: str = "",
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a MONAI decathlon-style datalist with paths relative to the datalist's folder.

    Args:
        path: the JSON file to write (atomically).
        sections: section name (``training``, ``validation``, ``test``, ...) → items.
        name: dataset name stored in the file.
        description: free text stored in the file.
        extra: more top-level keys (e.g. ``labels``: class names).

    Returns:
        The written path.

    Raises:
        ValueError: if a subject appears in two sections (a split leak).
    """
    path = Path(path).absolute()
    seen: dict[str, str] = {}
    for sec, items in sections.items():
        for it in items:
            sub = it.get("subject")
            if sub is None:
                continue
            if seen.setdefault(sub, sec) != sec:
                raise ValueError(f"{path}: subject {sub!r} appears in sections {seen[sub]!r} and {sec!r}.")
    doc: dict[str, Any] = {"name": name, "description": description}
    if extra:
        doc.update(extra)
    for sec, items in sections.items():
        doc[sec] = [
            {k: (_relativise(v, path.parent) if k in PATH_KEYS else v) for k, v in it.items()} for it in items
        ]
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def datalist_hash(path: str | os.PathLike) -> str:
    """A short content hash of a datalist file, logged with every run so results trace to data.

    Args:
        path: the datalist JSON.

    Returns:
        The first 12 hex digits of the SHA-256 of the file's bytes.
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _paths_of(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_of(v)]
    return [value] if isinstance(value, str) else []


def read_datalist_json(path: str | os.PathLike) -> dict:
    """The parsed JSON object of a datalist file.

    Args:
        path: datalist JSON file.

    Returns:
        The top-level object (section name → items, plus any metadata keys).

    Raises:
        InputDataError: the file is missing, not valid JSON or not a JSON object; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("datalist file does not exist", path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputDataError(f"datalist is not valid JSON ({e})", path) from e
    if not isinstance(doc, dict):
        raise InputDataError("datalist is not a JSON object of sections", path)
    return doc


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    required_keys: Sequence[str] = ("image",),
) -> list[dict]:
    """Load one section of a datalist and check it before any training starts.

    Args:
        path: datalist JSON file.
        section: the section to load (``training``, ``validation``, ``test``...).
        base_dir: folder that relative paths are resolved against (default: the datalist's folder).
        check_files: check that every path under :data:`PATH_KEYS` exists.
        required_keys: keys every item must have (e.g. ``("image", "label")``).

    Returns:
        The items, with absolute paths.

    Raises:
        InputDataError: the file is missing or not valid JSON, the section is missing or empty,
            an item lacks a required key, or a referenced file does not exist. The message names
            the datalist and, for a missing file, the item's path.
    """
    path = Path(path)
    doc = read_datalist_json(path)
    if section not in doc:
        raise InputDataError(f"datalist has no section {section!r} (it has {sorted(doc)})", path)
    if not isinstance(doc[section], list) or not doc[section]:
        raise InputDataError(f"datalist section {section!r} is empty", path)
    items = load_decathlon_datalist(path, data_list_key=section, base_dir=base_dir)
    for i, it in enumerate(items):
        missing = [k for k in required_keys if k not in it]
        if missing:
            raise InputDataError(f"item {i} of section {section!r} lacks key(s) {missing}", path)
        if check_files:
            for k in PATH_KEYS:
                for p in _paths_of(it.get(k)):
                    if not os.path.exists(p):
                        raise InputDataError(
                            f"file {p!r} (key {k!r}, item {i}, section {section!r}) does not exist", path
                        )
    return items
