"""BraTS (glioma) → the ``test`` section of ``anomaly.json``.

BraTS contains no healthy subjects, so on its own it only gives anomalous test items. The healthy
``training``/``validation`` sections (and healthy test items) must come from another adapter, e.g.
:func:`data_prep.adapters.ixi` on IXI, and are merged in with ``healthy_datalist``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from data_prep.adapters._common import SECTIONS, Adapter, add_common_args, require_dir, write_sections
from data_prep.datalist import load_datalist
from transforms.errors import InputDataError

__all__ = ["ADAPTER", "MODALITIES", "brats"]

#: user-facing modality → file suffix in the 2020/2021 layouts and in the 2023 (``BraTS-GLI-...``) layout
MODALITIES = {"flair": ("flair", "t2f"), "t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w")}

#: BraTS20_Training_001, BraTS20_Validation_001, BraTS2021_00000, BraTS-GLI-00000-000
_SUBJECT_RE = re.compile(r"^BraTS(20_(Training|Validation)_\d+|2021_\d+|-[A-Za-z]+-\d+-\d+)$")
_NII = (".nii.gz", ".nii")


def _find_subject_dirs(root: Path, max_depth: int = 3) -> list[Path]:
    """Subject folders at the shallowest depth (1..max_depth) below ``root`` where any exist."""
    pattern = "*"
    for _ in range(max_depth):
        found = sorted(p for p in root.glob(pattern) if p.is_dir() and _SUBJECT_RE.match(p.name))
        if found:
            return found
        pattern += "/*"
    return []


def _volume(folder: Path, suffix: str) -> Path | None:
    sep = "-" if folder.name.startswith("BraTS-") else "_"
    for ext in _NII:
        p = folder / f"{folder.name}{sep}{suffix}{ext}"
        if p.is_file():
            return p
    return None


def _segmentation(folder: Path) -> Path | None:
    seg = _volume(folder, "seg")
    if seg is not None:
        return seg
    # BraTS 2020 has a misnamed file (BraTS20_Training_355/W39_1998.09.19_Segm.nii): accept a single
    # NIfTI whose name contains "seg"
    cands = [p for p in folder.iterdir() if "seg" in p.name.lower() and p.name.lower().endswith(_NII)]
    return cands[0] if len(cands) == 1 else None


def _load_healthy(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The non-empty sections of a healthy anomaly datalist, with absolute (checked) paths."""
    if not path.is_file():
        raise InputDataError("healthy datalist does not exist", path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputDataError(f"healthy datalist is not valid JSON ({e})", path) from e
    out = {sec: load_datalist(path, sec) if doc.get(sec) else [] for sec in SECTIONS}
    if not out["training"]:
        raise InputDataError("healthy datalist has no training items", path)
    for it in out["test"]:
        it.setdefault("kind", "healthy")
    return out


def brats(
    root: str | os.PathLike,
    out: str | os.PathLike,
    modality: str = "flair",
    healthy_datalist: str | os.PathLike | None = None,
) -> list[Path]:
    """Write ``anomaly.json`` whose ``test`` section holds every BraTS subject as a glioma case.

    Recognised layouts (subject folders directly under ``root`` or up to three levels below, e.g. the
    Kaggle ``BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/`` nesting):

    - BraTS 2020: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii(.gz)``
      (the one misnamed segmentation of subject 355 is found as well);
    - BraTS 2021: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``;
    - BraTS 2023 glioma: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
      (``flair``/``t1``/``t1ce``/``t2`` map to ``t2f``/``t1n``/``t1c``/``t2w``).

    Test items are ``{"image", "label": segmentation, "subject": folder name, "kind": "glioma"}``.
    The segmentation holds tumour sub-region labels (1, 2, 4 or 1, 2, 3); the anomaly mask is
    ``label > 0``, to be binarised by the evaluation transforms.

    BraTS has no healthy subjects: the ``training``/``validation`` sections stay empty unless
    ``healthy_datalist`` (an ``anomaly.json`` written by e.g. the ``ixi`` adapter, ideally of the same
    modality and preprocessed alike) is given; its training/validation sections and its healthy test
    items are merged in.

    Args:
        root: the BraTS folder.
        out: output folder; ``anomaly.json`` is written there.
        modality: one of ``flair``, ``t1``, ``t1ce``, ``t2``.
        healthy_datalist: optional healthy ``anomaly.json`` to merge.

    Returns:
        ``[out / "anomaly.json"]``.

    Raises:
        ValueError: unknown modality.
        InputDataError: ``root`` holds no BraTS subject folders, a subject lacks the modality or the
            segmentation file (the message names the folder), or the healthy datalist is bad.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}.")
    root = require_dir(root, "BraTS root")
    folders = _find_subject_dirs(root)
    if not folders:
        raise InputDataError(
            "no BraTS subject folders (BraTS20_Training_NNN, BraTS2021_NNNNN or BraTS-GLI-NNNNN-NNN) found "
            "under this folder or up to three levels below",
            root,
        )
    tests: list[dict[str, Any]] = []
    for folder in folders:
        suffix = MODALITIES[modality][1 if folder.name.startswith("BraTS-") else 0]
        image = _volume(folder, suffix)
        if image is None:
            raise InputDataError(
                f"BraTS subject folder has no {modality} volume (*{suffix}.nii[.gz])", folder
            )
        seg = _segmentation(folder)
        if seg is None:
            raise InputDataError("BraTS subject folder has no segmentation (*seg.nii[.gz])", folder)
        tests.append({"image": str(image), "label": str(seg), "subject": folder.name, "kind": "glioma"})

    sections: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": tests}
    description = f"BraTS {modality} volumes as anomalous test cases (kind 'glioma'; mask = label > 0)."
    if healthy_datalist is not None:
        healthy = _load_healthy(Path(healthy_datalist).absolute())
        sections = {sec: healthy[sec] + sections[sec] for sec in SECTIONS}
        description += f" Healthy sections merged from {Path(healthy_datalist).name}."
    else:
        description += " No healthy subjects: training/validation are empty (merge a healthy datalist)."
    return [write_sections(out, "anomaly.json", sections, name="brats", description=description)]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, seed=False)
    p.add_argument(
        "--modality", choices=sorted(MODALITIES), default="flair", help="volume to use (default: flair)"
    )
    p.add_argument(
        "--healthy-datalist",
        type=Path,
        default=None,
        help="anomaly.json of healthy subjects (e.g. from the ixi adapter) whose sections are merged in",
    )


def _run(a: argparse.Namespace) -> list[Path]:
    return brats(a.root, a.out, modality=a.modality, healthy_datalist=a.healthy_datalist)


ADAPTER = Adapter(
    name="brats",
    help="BraTS 2020/2021/2023 glioma volumes -> anomaly.json test section (+ merged healthy datalist)",
    configure=_configure,
    run=_run,
    func=brats,
)
