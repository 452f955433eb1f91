"""IXI (healthy volunteers) → the healthy sections of ``anomaly.json``."""

from __future__ import annotations

import argparse
import os
import re
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

__all__ = ["ADAPTER", "IXI_MODALITIES", "ixi"]

IXI_MODALITIES = ("T1", "T2", "PD", "MRA")

#: IXI002-Guys-0828-T1.nii.gz → subject IXI002, site Guys, modality T1
_IXI_RE = re.compile(
    r"^(?P<subject>IXI\d{3})-(?P<site>[A-Za-z]+)-(?P<num>\d+)-(?P<mod>[A-Za-z0-9]+)\.nii(\.gz)?$"
)


def ixi(
    root: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    modality: str = "T1",
) -> list[Path]:
    """Write ``anomaly.json`` with IXI volumes of one modality as healthy training/validation/test items.

    Recognised layout: files named ``IXI<NNN>-<site>-<NNNN>-<modality>.nii[.gz]`` (e.g.
    ``IXI002-Guys-0828-T1.nii.gz``) anywhere below ``root`` (the official tarballs extract flat;
    ``IXI-T1/``, ``IXI-T2/`` sub-folders work too). The subject is the ``IXI<NNN>`` part and the site
    (Guys, HH, IOP) is kept as ``site``; the split is by subject and stratified by site, so every
    section sees every scanner where counts allow.

    Items are ``{"image", "subject", "site"}``; test items also carry ``"kind": "healthy"`` (and no
    ``label``): they are the healthy share of an anomaly-detection test set.

    Args:
        root: the IXI folder.
        out: output folder; ``anomaly.json`` is written there.
        seed: seed of the subject split.
        val_frac: fraction of subjects for ``validation``.
        test_frac: fraction of subjects for ``test``.
        modality: ``T1``, ``T2``, ``PD`` or ``MRA``.

    Returns:
        ``[out / "anomaly.json"]``.

    Raises:
        ValueError: unknown modality or bad fractions.
        InputDataError: no IXI file of that modality is found under ``root``.
    """
    if modality not in IXI_MODALITIES:
        raise ValueError(f"modality must be one of {IXI_MODALITIES}, got {modality!r}.")
    fractions = check_fractions(val_frac, test_frac)
    root = require_dir(root, "IXI root")
    items: list[dict[str, Any]] = []
    seen_modalities: set[str] = set()
    for p in sorted(root.rglob("IXI*.nii*")):
        m = _IXI_RE.match(p.name)
        if m is None or not p.is_file():
            continue
        seen_modalities.add(m["mod"])
        if m["mod"] == modality:
            items.append({"image": str(p), "subject": m["subject"], "site": m["site"]})
    if not items:
        found = f" (found modalities {sorted(seen_modalities)})" if seen_modalities else ""
        raise InputDataError(
            f"no IXI {modality} files named IXI<NNN>-<site>-<NNNN>-{modality}.nii[.gz] found below this folder{found}",
            root,
        )
    sections = split_sections(items, fractions, seed=seed, stratify_by="site")
    sections["test"] = [{**it, "kind": "healthy"} for it in sections["test"]]
    description = f"IXI {modality} healthy volumes, split by subject (stratified by site), seed {seed}."
    return [write_sections(out, "anomaly.json", sections, name="ixi", description=description)]


def _configure(p: argparse.ArgumentParser) -> None:
    add_common_args(p, val_frac=0.1, test_frac=0.1)
    p.add_argument("--modality", choices=IXI_MODALITIES, default="T1", help="volume to use (default: T1)")


def _run(a: argparse.Namespace) -> list[Path]:
    return ixi(a.root, a.out, seed=a.seed, val_frac=a.val_frac, test_frac=a.test_frac, modality=a.modality)


ADAPTER = Adapter(
    name="ixi",
    help="IXI healthy volumes -> anomaly.json training/validation (+ healthy test share)",
    configure=_configure,
    run=_run,
    func=ixi,
)
