"""CheXpert and MIMIC-CXR-JPG chest radiographs → multi-view ``studies.json`` with the 14 CheXpert labels."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from data_prep.adapters._common import (
    Adapter,
    add_common_args,
    check_fractions,
    read_csv,
    require_dir,
    split_sections,
    write_sections,
)
from transforms.errors import InputDataError

__all__ = ["ADAPTER", "FINDINGS", "UNCERTAIN_POLICIES", "chexpert", "encode_labels"]

#: the 14 CheXpert observations, in this (index) order in every ``labels`` vector
FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
MAX_VIEWS = 5

_MIMIC_LABELS = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz")
_MIMIC_META = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
#: views sorted frontal first (PA, AP), then lateral, then anything else
_VIEW_RANK = {"PA": 0, "AP": 1, "FRONTAL": 2, "LATERAL": 3, "LL": 4, "RL": 5}


def encode_labels(row: dict[str, str], uncertain: str = "zeros") -> list[float]:
    """The 14-finding label vector of one CSV row.

    Args:
        row: column → value as read from the CSV (``"1.0"``, ``"0.0"``, ``"-1.0"`` or blank).
        uncertain: policy for ``-1`` (uncertain): ``zeros`` → 0, ``ones`` → 1, ``ignore`` → keep ``-1``
            as a masked value (the training loss must then mask entries equal to ``-1``).

    Returns:
        One float per :data:`FINDINGS`: blank (not mentioned) → 0, positive → 1, negative → 0,
        uncertain per the policy.

    Raises:
        ValueError: unknown policy or a value that is not 1, 0, -1 or blank.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}.")
    out = []
    for f in FINDINGS:
        v = row.get(f, "").strip()
        x = float(v) if v else 0.0
        if x == -1.0:
            x = {"zeros": 0.0, "ones": 1.0, "ignore": -1.0}[uncertain]
        elif x not in (0.0, 1.0):
            raise ValueError(f"label {f!r} has value {v!r}; expected 1, 0, -1 or blank.")
        out.append(x)
    return out


def _first_existing(base: Path, names: Iterable[str]) -> Path | None:
    return next((base / n for n in names if (base / n).is_file()), None)


def _view_key(view: tuple[str, Path]) -> tuple[int, str]:
    return _VIEW_RANK.get(view[0].upper(), len(_VIEW_RANK)), view[1].name


def _row_labels(row: dict[str, str], uncertain: str, csv_path: Path, i: int) -> list[float]:
    try:
        return encode_labels(row, uncertain)
    except ValueError as e:
        raise InputDataError(f"data row {i + 1}: {e}", csv_path) from e


def _chexpert_studies(
    csv_paths: list[Path], root: Path, uncertain: str, skip_missing: bool
) -> tuple[dict, int]:
    """CheXpert ``train.csv``/``valid.csv`` → study key → study dict (views not yet capped)."""
    studies: dict[str, dict[str, Any]] = {}
    missing = 0
    for csv_path in csv_paths:
        rows = read_csv(csv_path, required=("Path", *FINDINGS))
        for i, row in enumerate(rows):
            rel = PurePosixPath(row["Path"])
            # CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
            parts = [p for p in rel.parts if p.startswith(("patient", "study"))]
            if len(parts) < 2 or not parts[0].startswith("patient") or not parts[1].startswith("study"):
                raise InputDataError(
                    f"data row {i + 1}: Path {row['Path']!r} has no patientNNNNN/studyN part", csv_path
                )
            candidates = [root / rel, csv_path.parent / rel, csv_path.parent.parent / rel]
            if len(rel.parts) > 1:
                candidates.append(csv_path.parent / PurePosixPath(*rel.parts[1:]))
            image = next((c for c in candidates if c.is_file()), None)
            if image is None:
                if skip_missing:
                    missing += 1
                    continue
                raise InputDataError(
                    f"file does not exist (referenced by {csv_path} row {i + 1})", candidates[0]
                )
            key = f"{parts[0]}/{parts[1]}"
            if key not in studies:
                studies[key] = {
                    "subject": parts[0],
                    "study": key,
                    "labels": _row_labels(row, uncertain, csv_path, i),
                    "_views": [],
                }
            side = row.get("Frontal/Lateral") or ("Lateral" if "lateral" in rel.name.lower() else "Frontal")
            view = (row.get("AP/PA") or "FRONTAL") if side.lower() == "frontal" else "LATERAL"
            studies[key]["_views"].append((view.upper(), image.absolute()))
    return studies, missing


def _mimic_studies(
    labels_csv: Path, meta_csv: Path, root: Path, uncertain: str, skip_missing: bool
) -> tuple[dict, int]:
    """MIMIC-CXR-JPG label and metadata CSVs → study key → study dict (views not yet capped)."""
    labels = {
        (r["subject_id"], r["study_id"]): (r, i)
        for i, r in enumerate(read_csv(labels_csv, required=("subject_id", "study_id", *FINDINGS)))
    }
    files = root / "files"
    studies: dict[str, dict[str, Any]] = {}
    missing = 0
    for i, row in enumerate(
        read_csv(meta_csv, required=("dicom_id", "subject_id", "study_id", "ViewPosition"))
    ):
        sid, stid = row["subject_id"], row["study_id"]
        if (sid, stid) not in labels:
            continue  # a study without CheXpert labels
        image = files / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}" / f"{row['dicom_id']}.jpg"
        if not image.is_file():
            if skip_missing:
                missing += 1
                continue
            raise InputDataError(f"file does not exist (referenced by {meta_csv} row {i + 1})", image)
        key = f"p{sid}/s{stid}"
        if key not in studies:
            lab_row, j = labels[(sid, stid)]
            studies[key] = {
                "subject": f"p{sid}",
                "study": key,
                "labels": _row_labels(lab_row, uncertain, labels_csv, j),
                "_views": [],
            }
        studies[key]["_views"].append(((row["ViewPosition"] or "UNKNOWN").upper(), image.absolute()))
    return studies, missing


def chexpert(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    uncertain: str = "zeros",
    max_views: int = MAX_VIEWS,
    skip_missing: bool = False,
) -> list[Path]:
    """Write ``studies.json``: one item per radiograph study with its views and 14 CheXpert labels.

    Recognised layouts (checked in this order):

    - MIMIC-CXR-JPG: ``root`` holds ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (``subject_id``,
      ``study_id``, the 14 findings), ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (``dicom_id``,
      ``subject_id``, ``study_id``, ``ViewPosition``) and ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.
      Subject ``p<subject_id>``, study ``p<subject_id>/s<study_id>``. Studies without labels are skipped.
    - CheXpert: ``train.csv`` and/or ``valid.csv`` in ``root`` or one folder below (e.g.
      ``CheXpert-v1.0-small/``), with ``Path`` like
      ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` (resolved against ``root``,
      the CSV's folder or its parent). Subject ``patientNNNNN``, study ``patientNNNNN/studyN``. Both
      CSVs are pooled and re-split by patient (the official split is not kept).

    Subject IDs are the datasets' public pseudonyms; the split is by patient, never by study or image.
    Views are ordered PA, AP, lateral, others (then by file name); studies with more than
    ``max_views`` views are truncated (a note gives how many). Labels: blank → 0, 1 → 1, 0 → 0 and
    uncertain (-1) per ``uncertain``: ``zeros``, ``ones`` or ``ignore`` (kept as -1: the loss must
    mask entries equal to -1, e.g. ``BCE * (labels >= 0)``).

    Items are ``{"views": [paths], "view_names": [...], "labels": [14 floats], "subject", "study"}``;
    the top-level ``findings`` lists the label names in order and ``uncertain_policy`` the policy.

    Args:
        root: the dataset folder.
        out: output folder; ``studies.json`` is written there.
        seed: seed of the patient split.
        val_frac: fraction of patients for ``validation``.
        test_frac: fraction of patients for ``test``.
        uncertain: ``zeros``, ``ones`` or ``ignore``.
        max_views: views kept per study (1..5).
        skip_missing: skip images that are listed but not on disk (a partial download) instead of
            raising; the summary says how many.

    Returns:
        ``[out / "studies.json"]``.

    Raises:
        ValueError: unknown policy, bad ``max_views`` or fractions.
        InputDataError: neither layout is found, a CSV lacks a column, a label value is invalid, or a
            listed image does not exist (unless ``skip_missing``).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}.")
    if not 1 <= max_views <= MAX_VIEWS:
        raise ValueError(f"max_views must be in 1..{MAX_VIEWS}, got {max_views}.")
    fractions = check_fractions(val_frac, test_frac)
    root = require_dir(root, "chest X-ray root")
    labels_csv, meta_csv = _first_existing(root, _MIMIC_LABELS), _first_existing(root, _MIMIC_META)
    if labels_csv is not None or meta_csv is not None:
        if labels_csv is None or meta_csv is None:
            raise InputDataError(
                f"MIMIC-CXR-JPG needs both {_MIMIC_LABELS[0]} and {_MIMIC_META[0]} (.gz allowed); one is missing",
                root,
            )
        name = "mimic_cxr"
        studies, missing = _mimic_studies(labels_csv, meta_csv, root, uncertain, skip_missing)
    else:
        csvs: list[Path] = []
        for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            csvs = [base / n for n in ("train.csv", "valid.csv") if (base / n).is_file()]
            if csvs:
                break
        if not csvs:
            raise InputDataError(
                "neither MIMIC-CXR-JPG (mimic-cxr-2.0.0-chexpert.csv + metadata) nor CheXpert (train.csv/valid.csv) "
                "found in this folder or one level below",
                root,
            )
        name = "chexpert"
        studies, missing = _chexpert_studies(csvs, root, uncertain, skip_missing)
    if not studies:
        raise InputDataError("no study with labels and images found", root)

    items = []
    truncated = 0
    for st in studies.values():
        views = sorted(st.pop("_views"), key=_view_key)
        truncated += len(views) > max_views
        views = views[:max_views]
        items.append({"views": [str(p) for _, p in views], "view_names": [v for v, _ in views], **st})
    if truncated:
        print(
            f"{name}: note: {truncated} studies had more than {max_views} views; kept the first {max_views}"
        )
    if missing:
        print(f"{name}: note: skipped {missing} listed images that are not on disk")
    sections = split_sections(items, fractions, seed=seed)
    description = (
        f"{name} studies (<= {max_views} views), 14 CheXpert labels, uncertain -> {uncertain}"
        + (" (-1 = masked: the loss must ignore it)" if uncertain == "ignore" else "")
        + f"; split by patient, seed {seed}."
    )
    extra = {"findings": list(FINDINGS), "uncertain_policy": uncertain}
    return [write_sections(out, "studies.json", sections, name=name, description=description, extra=extra)]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, val_frac=0.1, test_frac=0.2)
    p.add_argument(
        "--uncertain",
        choices=UNCERTAIN_POLICIES,
        default="zeros",
        help="uncertain (-1) labels -> 0, 1, or kept as -1 for a masked loss (default: zeros)",
    )
    p.add_argument("--max-views", type=int, default=MAX_VIEWS, help=f"views kept per study, 1..{MAX_VIEWS}")
    p.add_argument(
        "--skip-missing", action="store_true", help="skip listed images not on disk (partial download)"
    )


def _run(a: argparse.Namespace) -> list[Path]:
    return chexpert(
        a.root,
        a.out,
        seed=a.seed,
        val_frac=a.val_frac,
        test_frac=a.test_frac,
        uncertain=a.uncertain,
        max_views=a.max_views,
        skip_missing=a.skip_missing,
    )


ADAPTER = Adapter(
    name="chexpert",
    help="MIMIC-CXR-JPG or CheXpert CSVs -> studies.json (multi-view, 14 labels)",
    configure=_configure,
    run=_run,
    func=chexpert,
)
