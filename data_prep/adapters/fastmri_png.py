"""fastMRI+ mid-slice PNGs with the CSV splits of the anomaly-detection seminar → ``anomaly.json``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.adapters._common import (
    Adapter,
    add_common_args,
    check_fractions,
    read_csv,
    require_dir,
    require_file,
    split_sections,
    write_sections,
)
from transforms.errors import InputDataError

__all__ = ["ADAPTER", "fastmri_png"]

_TRAIN_CSVS = ("normal_train.csv", "ixi_normal_train.csv")
_SPLITS_DIRS = ("splits", "data/splits")


def _files(csv_path: Path, root: Path) -> list[Path]:
    """The ``filename`` column of a split CSV, resolved against ``root`` and checked to exist."""
    rows = read_csv(csv_path, required=("filename",))
    out = []
    for i, row in enumerate(rows):
        if not row["filename"]:
            raise InputDataError(f"empty 'filename' in data row {i + 1}", csv_path)
        out.append(require_file(root / row["filename"], f"{csv_path} row {i + 1}"))
    return out


def _pick(splits: Path, name: str | None, defaults: Sequence[str]) -> Path | None:
    """The named CSV (must exist) or the first existing default (may be none)."""
    if name is not None:
        p = splits / name
        if not p.is_file():
            raise InputDataError("split CSV does not exist", p)
        return p
    return next((splits / d for d in defaults if (splits / d).is_file()), None)


def fastmri_png(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.0,
    splits_dir: str | None = None,
    train_csv: str | None = None,
    val_csv: str | None = None,
    test_csv: str | None = None,
    pathologies: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``anomaly.json`` from the fastMRI+ mid-slice PNG layout of the compai-lab ``mad_seminar``.

    Recognised layout: ``root`` holds a split folder (``splits/`` or ``data/splits/``, or
    ``splits_dir``) of CSV files with a ``filename`` column of paths relative to ``root`` (e.g.
    ``./data/fastMRI/brain_mid_png/file_brain_AXT1_202_6000392.png``):

    - healthy: ``normal_train.csv`` (or ``ixi_normal_train.csv``), optional ``normal_val.csv`` and
      ``normal_test.csv``. Without a validation CSV, ``val_frac`` of the training subjects are held out
      (and ``test_frac`` of them as healthy test items when there is no test CSV);
    - per pathology ``<p>``: ``<p>.csv`` (images), ``<p>_ann.csv`` (positive masks) and ``<p>_neg.csv``
      (negative masks, i.e. annotated healthy regions), row-aligned. Pathologies are discovered from
      the ``*_ann.csv`` files.

    The subject is the file-name stem (``file_brain_AXT1_202_6000392``: one mid slice per fastMRI
    volume). Healthy items are ``{"image", "subject"}`` (test ones with ``"kind": "healthy"``);
    pathology items are ``{"image", "subject", "kind": <p>, "label": positive mask, "neg_mask":
    negative mask}``, all in ``test``.

    Args:
        root: folder the CSV paths are relative to.
        out: output folder; ``anomaly.json`` is written there.
        seed: seed of the held-out split (only used without a validation/test CSV).
        val_frac: fraction of training subjects held out for validation when there is no validation CSV.
        test_frac: fraction of training subjects held out as healthy test items when there is no test CSV.
        splits_dir: split folder relative to ``root`` (default: ``splits`` or ``data/splits``).
        train_csv: healthy training CSV name (default: ``normal_train.csv`` or ``ixi_normal_train.csv``).
        val_csv: healthy validation CSV name (default: ``normal_val.csv`` if present).
        test_csv: healthy test CSV name (default: ``normal_test.csv`` if present).
        pathologies: pathologies to include (default: all ``*_ann.csv``).

    Returns:
        ``[out / "anomaly.json"]``.

    Raises:
        InputDataError: no split folder or training CSV, a CSV without ``filename``, a referenced PNG
            that does not exist, a missing or row-misaligned pathology CSV, or an unknown pathology.
    """
    root = require_dir(root, "fastMRI PNG root")
    if splits_dir is not None:
        splits = require_dir(root / splits_dir, "split")
    else:
        found = [root / d for d in _SPLITS_DIRS if (root / d).is_dir()]
        if not found:
            raise InputDataError(f"no split folder ({' or '.join(_SPLITS_DIRS)}) with CSV files found", root)
        splits = found[0]
    train_path = _pick(splits, train_csv, _TRAIN_CSVS)
    if train_path is None:
        raise InputDataError(
            f"no healthy training CSV ({' or '.join(_TRAIN_CSVS)}) in the split folder", splits
        )
    val_path = _pick(splits, val_csv, ("normal_val.csv",))
    test_path = _pick(splits, test_csv, ("normal_test.csv",))

    def healthy(path: Path) -> list[dict[str, Any]]:
        return [{"image": str(p), "subject": p.stem} for p in _files(path, root)]

    fractions = check_fractions(0.0 if val_path else val_frac, 0.0 if test_path else test_frac)
    sections = split_sections(healthy(train_path), fractions, seed=seed)
    if val_path:
        sections["validation"] = healthy(val_path)
    if test_path:
        sections["test"] = healthy(test_path)
    sections["test"] = [{**it, "kind": "healthy"} for it in sections["test"]]

    found_paths = sorted(p.name[: -len("_ann.csv")] for p in splits.glob("*_ann.csv"))
    if pathologies is not None:
        unknown = sorted(set(pathologies) - set(found_paths))
        if unknown:
            raise InputDataError(
                f"pathologies {unknown} have no <pathology>_ann.csv (found {found_paths})", splits
            )
        found_paths = [p for p in found_paths if p in set(pathologies)]
    for name in found_paths:
        csvs = [splits / f"{name}{suffix}.csv" for suffix in ("", "_ann", "_neg")]
        images, pos, neg = (_files(c, root) for c in csvs)
        if not len(images) == len(pos) == len(neg):
            raise InputDataError(
                f"pathology {name!r}: {len(images)} images, {len(pos)} positive and {len(neg)} negative masks; "
                "the three CSVs must be row-aligned",
                csvs[1],
            )
        sections["test"] += [
            {"image": str(i), "subject": i.stem, "kind": name, "label": str(p), "neg_mask": str(n)}
            for i, p, n in zip(images, pos, neg, strict=True)
        ]
    listed = ", ".join(found_paths) or "none"
    description = f"fastMRI+ mid-slice PNGs from {splits.name}/ ({train_path.name}); pathologies: {listed}."
    return [write_sections(out, "anomaly.json", sections, name="fastmri_png", description=description)]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, val_frac=0.1, test_frac=0.0)
    p.add_argument(
        "--splits-dir", default=None, help="split folder relative to --root (default: splits or data/splits)"
    )
    p.add_argument("--train-csv", default=None, help="default: normal_train.csv or ixi_normal_train.csv")
    p.add_argument(
        "--val-csv", default=None, help="default: normal_val.csv if present, else --val-frac of training"
    )
    p.add_argument(
        "--test-csv", default=None, help="default: normal_test.csv if present, else --test-frac of training"
    )
    p.add_argument(
        "--pathologies",
        default=None,
        help="comma-separated pathologies to include (default: every *_ann.csv)",
    )


def _run(a: argparse.Namespace) -> list[Path]:
    return fastmri_png(
        a.root,
        a.out,
        seed=a.seed,
        val_frac=a.val_frac,
        test_frac=a.test_frac,
        splits_dir=a.splits_dir,
        train_csv=a.train_csv,
        val_csv=a.val_csv,
        test_csv=a.test_csv,
        pathologies=[s.strip() for s in a.pathologies.split(",") if s.strip()] if a.pathologies else None,
    )


ADAPTER = Adapter(
    name="fastmri_png",
    help="fastMRI+ mid-slice PNGs with mad_seminar split CSVs -> anomaly.json",
    configure=_configure,
    run=_run,
    func=fastmri_png,
)
