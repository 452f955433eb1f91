"""A plain folder of NIfTI files and/or DICOM series (optionally with a CSV) → ``folder.json``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydicom.misc import is_dicom

from data_prep.adapters._common import (
    Adapter,
    add_common_args,
    check_fractions,
    hashed_subject,
    read_csv,
    require_dir,
    require_file,
    split_sections,
    write_sections,
)
from transforms.errors import InputDataError

__all__ = ["ADAPTER", "find_images", "folder"]

_NIFTI = (".nii", ".nii.gz")


def _is_series_dir(folder: Path, filenames: list[str]) -> bool:
    """Whether a folder holds DICOM files: ``*.dcm``, or extension-less files with the DICM preamble."""
    if any(f.lower().endswith(".dcm") for f in filenames):
        return True
    for f in filenames:
        if "." in f or f.upper() == "DICOMDIR":
            continue
        try:
            if is_dicom(folder / f):
                return True
        except OSError:
            continue
    return False


def find_images(root: Path) -> list[Path]:
    """NIfTI files and DICOM series folders below ``root`` (hidden entries skipped), sorted.

    Args:
        root: the folder to search.

    Returns:
        One path per NIfTI file and one per folder that directly contains DICOM files.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = sorted(f for f in filenames if not f.startswith("."))
        here = Path(dirpath)
        found += [here / f for f in files if f.lower().endswith(_NIFTI)]
        if _is_series_dir(here, files):
            found.append(here)
    return sorted(found)


def _subject(path: Path, root: Path, depth: int | None) -> str:
    """Hash of the path relative to root (or of its first ``depth`` components): no names leak."""
    parts = Path(os.path.relpath(path, root)).parts
    if depth is not None and len(parts) > depth:
        parts = parts[:depth]
    return hashed_subject("/".join(parts))


def _from_csv(csv_path: Path, root: Path, depth: int | None) -> tuple[list[dict[str, Any]], bool]:
    rows = read_csv(csv_path, required=("path",))
    if not rows:
        raise InputDataError("CSV has a header but no data rows", csv_path)
    has_label = "label" in rows[0]
    items = []
    for i, row in enumerate(rows):
        where = f"{csv_path} row {i + 1}"
        if not row["path"]:
            raise InputDataError(f"empty 'path' in data row {i + 1}", csv_path)
        image = require_file(root / row["path"], where)
        it: dict[str, Any] = {
            "image": str(image),
            "subject": row.get("subject") or _subject(image, root, depth),
        }
        if row.get("mask"):
            it["mask"] = str(require_file(root / row["mask"], where))
        if has_label:
            if not row["label"]:
                raise InputDataError(f"empty 'label' in data row {i + 1}", csv_path)
            it["label"] = row["label"]
        items.append(it)
    return items, has_label


def _encode_labels(items: list[dict[str, Any]]) -> list[str] | None:
    """Integer labels stay ints; string labels map to their index in sorted order (returned)."""
    values = [it["label"] for it in items]
    try:
        ints = [int(v) for v in values]
    except ValueError:
        names = sorted(set(values))
        for it in items:
            it["class_name"] = it["label"]
            it["label"] = names.index(it["label"])
        return names
    for it, v in zip(items, ints, strict=True):
        it["label"] = v
    return None


def folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    csv: str | os.PathLike | None = None,
    as_healthy: bool = False,
    subject_depth: int | None = None,
) -> list[Path]:
    """Write ``folder.json`` for a plain folder of NIfTI files and/or DICOM series.

    Without ``csv``: every ``*.nii``/``*.nii.gz`` file below ``root`` is an item, and so is every folder
    that directly contains DICOM files (``*.dcm``, or extension-less files with the ``DICM`` preamble;
    one item per folder, the image being the folder, as MONAI's ``LoadImage`` reads a series from it).
    Items are unlabelled: all go to ``test`` (inference), or, with ``as_healthy``, they are split by
    subject into training/validation/test per the fractions (test items get ``"kind": "healthy"``).

    With ``csv`` (columns ``path`` relative to ``root``; optional ``label``, ``mask`` (relative path),
    ``subject``): the rows are the items. With a ``label`` column the items are split by subject per
    the fractions, stratified by label; integer labels are kept, string labels are mapped to indices in
    sorted order (stored as top-level ``labels``, and per item as ``class_name``). Without it, the
    unlabelled rules above apply.

    Subject IDs: DICOM tags (PatientName, PatientID...) are never read. A subject is the CSV's
    ``subject`` value if given, else ``s-<hash>`` of the item's path relative to ``root``, or of its
    first ``subject_depth`` components (``subject_depth=1`` groups everything under
    ``root/<folder>/`` as one subject, for a patient-per-folder layout).

    Args:
        root: the folder.
        out: output folder; ``folder.json`` is written there.
        seed: seed of the subject split.
        val_frac: fraction of subjects for ``validation`` (labelled or ``as_healthy`` only).
        test_frac: fraction of subjects for ``test`` (labelled or ``as_healthy`` only).
        csv: optional CSV file describing the items.
        as_healthy: treat unlabelled items as healthy training data (split per the fractions).
        subject_depth: group items into subjects by their first path components below ``root``.

    Returns:
        ``[out / "folder.json"]``.

    Raises:
        ValueError: ``as_healthy`` with a labelled CSV, or bad fractions / ``subject_depth``.
        InputDataError: no NIfTI file or DICOM series found, the CSV lacks ``path``, a value is empty,
            or a referenced file does not exist.
    """
    fractions = check_fractions(val_frac, test_frac)
    if subject_depth is not None and subject_depth < 1:
        raise ValueError(f"subject_depth must be >= 1, got {subject_depth}.")
    root = require_dir(root, "image")
    extra: dict[str, Any] = {}
    if csv is not None:
        items, labelled = _from_csv(Path(csv).absolute(), root, subject_depth)
    else:
        paths = find_images(root)
        if not paths:
            raise InputDataError(
                "no NIfTI files (*.nii, *.nii.gz) or DICOM series folders found below this folder", root
            )
        items = [{"image": str(p), "subject": _subject(p, root, subject_depth)} for p in paths]
        labelled = False
    if labelled and as_healthy:
        raise ValueError("as_healthy applies to unlabelled items; the CSV has a 'label' column.")
    if labelled:
        names = _encode_labels(items)
        if names is not None:
            extra["labels"] = names
        sections = split_sections(items, fractions, seed=seed, stratify_by="label")
        mode = f"labelled, split by subject (stratified), seed {seed}"
    elif as_healthy:
        sections = split_sections(items, fractions, seed=seed)
        sections["test"] = [{**it, "kind": "healthy"} for it in sections["test"]]
        mode = f"healthy, split by subject, seed {seed}"
    else:
        sections = {"training": [], "validation": [], "test": items}
        mode = "unlabelled, all in test (inference)"
    description = f"Folder {root.name} ({mode})."
    return [write_sections(out, "folder.json", sections, name="folder", description=description, extra=extra)]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, val_frac=0.1, test_frac=0.2)
    p.add_argument("--csv", type=Path, default=None, help="CSV with columns path [, label, mask, subject]")
    p.add_argument("--as-healthy", action="store_true", help="unlabelled items are healthy training data")
    p.add_argument(
        "--subject-depth",
        type=int,
        default=None,
        help="subject = hash of the first N path components below --root (default: one subject per item)",
    )


def _run(a: argparse.Namespace) -> list[Path]:
    return folder(
        a.root,
        a.out,
        seed=a.seed,
        val_frac=a.val_frac,
        test_frac=a.test_frac,
        csv=a.csv,
        as_healthy=a.as_healthy,
        subject_depth=a.subject_depth,
    )


ADAPTER = Adapter(
    name="folder",
    help="plain folder of NIfTI files / DICOM series (+ optional CSV) -> folder.json",
    configure=_configure,
    run=_run,
    func=folder,
)
