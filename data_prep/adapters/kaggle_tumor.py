"""Kaggle "Brain Tumor MRI Dataset" (2D JPEG slices in class folders) → classification datalists."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from data_prep.adapters._common import (
    Adapter,
    add_common_args,
    check_fractions,
    require_dir,
    split_sections,
    write_sections,
)
from transforms.errors import InputDataError

__all__ = ["ADAPTER", "BINARY_LABELS", "MULTICLASS_LABELS", "kaggle_tumor"]

#: class index order of ``classification_multiclass.json`` (fixed: 0 is the healthy class)
# "healthy" (not the folder name "notumor"), so class names match the demo cohort's datalists
MULTICLASS_LABELS = ("healthy", "glioma", "meningioma", "pituitary")
#: class index order of ``classification_binary.json``
BINARY_LABELS = ("healthy", "tumour")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _class_of(folder_name: str) -> str | None:
    """Canonical class of a class folder: ``glioma``, ``glioma_tumor``, ``no_tumor``, ``notumor``..."""
    n = folder_name.strip().lower().replace(" ", "_").replace("-", "_")
    n = n.removesuffix("_tumor").removesuffix("_tumour")
    if n in ("no", "notumor", "notumour", "no_tumor", "no_tumour", "healthy", "normal"):
        return "healthy"
    return n if n in MULTICLASS_LABELS else None


def _find_parts(root: Path) -> tuple[Path | None, Path | None]:
    """The ``Training`` and ``Testing`` folders (any case) in ``root`` or one level below."""
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        subs = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
        if "training" in subs:
            return subs["training"], subs.get("testing")
    return None, None


def _items(part: Path, tag: str) -> list[dict[str, Any]]:
    items = []
    for folder in sorted(p for p in part.iterdir() if p.is_dir()):
        cls = _class_of(folder.name)
        if cls is None:
            raise InputDataError(
                f"unknown class folder (expected one of {list(MULTICLASS_LABELS)} or *_tumor)", folder
            )
        for img in sorted(folder.iterdir()):
            if img.is_file() and img.suffix.lower() in _IMAGE_SUFFIXES:
                # no subject IDs in this dataset: every image is its own subject
                subject = f"kaggle-{tag}-{cls}-{img.stem}"
                items.append({"image": str(img), "class_name": cls, "subject": subject})
    if not items:
        raise InputDataError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) found in class folders", part)
    return items


def kaggle_tumor(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    val_frac: float = 0.1,
) -> list[Path]:
    """Write ``classification_binary.json`` and ``classification_multiclass.json`` from the Kaggle set.

    Recognised layout: ``Training/<class>/*.jpg`` and ``Testing/<class>/*.jpg`` in ``root`` (or one
    folder below it), classes ``glioma``, ``meningioma``, ``notumor``, ``pituitary`` (the older
    ``*_tumor``/``no_tumor`` folder names are accepted too).

    Class indices (fixed):

    - multiclass: 0 ``healthy`` (folder ``notumor``), 1 ``glioma``, 2 ``meningioma``, 3 ``pituitary``;
    - binary: 0 ``healthy`` (``notumor``), 1 ``tumour`` (the three tumour classes).

    The dataset has no subject IDs, so every image is its own subject (``kaggle-<part>-<class>-<stem>``).
    ``Testing/`` is kept as the ``test`` section; ``Training/`` is split into training/validation with
    ``seed``, stratified by class. Both files share the same split. Caveat: the public dataset is known
    to contain near-duplicate (and exactly duplicated) images within and across its Training and
    Testing folders, and slices of one patient in several images; that leak cannot be fixed without
    subject IDs, so test scores on it are optimistic. Deduplicate by image hash upstream if it matters.

    Items are ``{"image", "label": int, "class_name", "subject"}``; the top-level ``labels`` lists the
    class names in index order.

    Args:
        root: the dataset folder.
        out: output folder for the two datalists.
        seed: seed of the training/validation split.
        val_frac: fraction of ``Training/`` images for ``validation``.

    Returns:
        ``[out / "classification_binary.json", out / "classification_multiclass.json"]``.

    Raises:
        InputDataError: no ``Training`` folder, an unknown class folder, or no images.
    """
    fractions = check_fractions(val_frac)
    root = require_dir(root, "Kaggle brain-tumour root")
    train_dir, test_dir = _find_parts(root)
    if train_dir is None:
        raise InputDataError("no Training/<class>/ folders found (Kaggle Brain Tumor MRI layout)", root)
    sections = split_sections(_items(train_dir, "train"), fractions, seed=seed, stratify_by="class_name")
    sections["test"] = _items(test_dir, "test") if test_dir is not None else []
    if test_dir is None:
        print(f"kaggle_tumor: note: no Testing/ folder next to {train_dir}; the test section is empty")

    def labelled(to_name: dict[str, str], names: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        return {
            sec: [
                {
                    **it,
                    "class_name": to_name[it["class_name"]],
                    "label": names.index(to_name[it["class_name"]]),
                }
                for it in items
            ]
            for sec, items in sections.items()
        }

    multi = {c: c for c in MULTICLASS_LABELS}
    binary = {c: BINARY_LABELS[0] if c == "healthy" else BINARY_LABELS[1] for c in MULTICLASS_LABELS}
    note = " Each image is its own subject; the public set contains near-duplicate images across folders."
    return [
        write_sections(
            out,
            "classification_binary.json",
            labelled(binary, BINARY_LABELS),
            name="kaggle_tumor_binary",
            description="Kaggle Brain Tumor MRI, healthy (notumor) vs tumour." + note,
            extra={"labels": list(BINARY_LABELS)},
        ),
        write_sections(
            out,
            "classification_multiclass.json",
            labelled(multi, MULTICLASS_LABELS),
            name="kaggle_tumor_multiclass",
            description="Kaggle Brain Tumor MRI, 4 classes." + note,
            extra={"labels": list(MULTICLASS_LABELS)},
        ),
    ]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, val_frac=0.1)


def _run(a: argparse.Namespace) -> list[Path]:
    return kaggle_tumor(a.root, a.out, seed=a.seed, val_frac=a.val_frac)


ADAPTER = Adapter(
    name="kaggle_tumor",
    help="Kaggle Brain Tumor MRI Training|Testing/<class>/ -> classification_{binary,multiclass}.json",
    configure=_configure,
    run=_run,
    func=kaggle_tumor,
)
