"""The embedded demo cohort: the acceptance properties of issue 2, checked on the default build."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.datalist import load_datalist
from data_prep.demo import CLASSES, FINDINGS, KINDS, DemoConfig, build_demo_cohort


def _manifest(root: Path) -> list[dict]:
    return json.loads((root / "manifest.json").read_text())["subjects"]


def test_manifest_counts_and_kinds(demo_cohort: Path) -> None:
    rows = _manifest(demo_cohort)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("healthy") >= 24
    assert sum(k != "healthy" for k in kinds) >= 24
    assert set(kinds) == {"healthy", *KINDS}
    with open(demo_cohort / "manifest.csv", newline="") as f:
        assert [r["subject"] for r in csv.DictReader(f)] == [r["subject"] for r in rows]
    # every pathological subject has a lesion volume, healthy ones none
    for r in rows:
        assert (r["lesion_volume_ml"] > 0) == (r["kind"] != "healthy"), r


def test_lesion_masks_nonempty_and_inside_brain(demo_cohort: Path) -> None:
    for r in _manifest(demo_cohort):
        sdir = demo_cohort / "subjects" / r["subject"]
        lesion = np.asanyarray(nib.load(sdir / f"{r['subject']}_lesion.nii.gz").dataobj) > 0
        brain = np.asanyarray(nib.load(sdir / f"{r['subject']}_brainmask.nii.gz").dataobj) > 0
        if r["kind"] == "healthy":
            assert not lesion.any(), r["subject"]
            continue
        assert lesion.sum() == r["lesion_voxels"] > 0, r["subject"]
        assert not (lesion & ~brain).any(), f"{r['subject']}: lesion voxels outside the brain mask"


DATALISTS = {
    "anomaly_t1w.json": ("training", "validation", "test"),
    "anomaly_flair.json": ("training", "validation", "test"),
    "anomaly_supervised_t1w.json": ("training", "validation", "test"),
    "classification_binary.json": ("training", "validation", "test"),
    "classification_multiclass.json": ("training", "validation", "test"),
    "studies.json": ("training", "validation", "test"),
    "dicom.json": ("test",),
}


@pytest.mark.parametrize("name", sorted(DATALISTS))
def test_datalists_paths_exist_and_no_subject_in_two_splits(demo_cohort: Path, name: str) -> None:
    path = demo_cohort / "datalists" / name
    owner: dict[str, str] = {}
    for sec in DATALISTS[name]:
        keys = ("views", "labels") if name == "studies.json" else ("image",)
        items = load_datalist(path, sec, check_files=True, required_keys=keys)  # raises on a missing file
        for it in items:
            assert owner.setdefault(it["subject"], sec) == sec, (
                f"{it['subject']} in {owner[it['subject']]} and {sec}"
            )
    # one split for the anomaly and study datalists, one for the classification datalists (manifest columns)
    column = "classification_split" if name.startswith("classification") else "split"
    split = {r["subject"]: r[column] for r in _manifest(demo_cohort)}
    assert all(split[s] == sec for s, sec in owner.items())


def test_classification_validation_and_test_splits_have_the_same_kinds(demo_cohort: Path) -> None:
    """The classifiers' conformal calibration split (validation) must be exchangeable with the test split:
    the same number of subjects of every kind in both, up to the rounding of a kind's share (one subject)."""
    rows = _manifest(demo_cohort)
    for kind in ("healthy", *KINDS):
        n = [
            sum(r["kind"] == kind and r["classification_split"] == sec for r in rows)
            for sec in ("validation", "test")
        ]
        assert min(n) >= 2 and abs(n[0] - n[1]) <= 1, (kind, n)


def test_anomaly_datalist_content(demo_cohort: Path) -> None:
    dl = demo_cohort / "datalists" / "anomaly_t1w.json"
    train = load_datalist(dl, "training")
    test = load_datalist(dl, "test", required_keys=("image", "label", "brain_mask", "kind"))
    assert {it["kind"] for it in train} == {"healthy"}
    assert set(KINDS) <= {it["kind"] for it in test} and "healthy" in {it["kind"] for it in test}
    sup = load_datalist(demo_cohort / "datalists" / "anomaly_supervised_t1w.json", "training")
    assert {it["kind"] for it in sup} == {"healthy", *KINDS}


def test_classification_labels(demo_cohort: Path) -> None:
    doc = json.loads((demo_cohort / "datalists" / "classification_multiclass.json").read_text())
    assert doc["labels"] == list(CLASSES)
    kind = {r["subject"]: r["kind"] for r in _manifest(demo_cohort)}
    for sec in ("training", "validation", "test"):
        for it in doc[sec]:
            assert CLASSES[it["label"]] == kind[it["subject"]]
            # a tumour slice shows the lesion
            assert (it["lesion_fraction"] > 0) == (it["label"] != 0)
    binary = json.loads((demo_cohort / "datalists" / "classification_binary.json").read_text())
    assert {it["label"] for it in binary["training"]} == {0, 1}


def test_studies_views_and_findings(demo_cohort: Path) -> None:
    doc = json.loads((demo_cohort / "datalists" / "studies.json").read_text())
    assert doc["findings"] == list(FINDINGS)
    kind = {r["subject"]: r["kind"] for r in _manifest(demo_cohort)}
    counts = set()
    for sec in ("training", "validation", "test"):
        for st in doc[sec]:
            counts.add(len(st["views"]))
            assert 1 <= len(st["views"]) <= 5 and len(st["view_names"]) == len(st["views"])
            lab = dict(zip(FINDINGS, st["labels"], strict=True))
            assert lab["no_finding"] == float(kind[st["subject"]] == "healthy")
            if kind[st["subject"]] != "healthy":
                assert lab[kind[st["subject"]]] == 1.0
            for v in st["views"]:
                assert nib.load(demo_cohort / "datalists" / v).ndim == 2
    assert len(counts) >= 3  # studies of different view counts


def test_lesions_not_simply_brightest(demo_cohort: Path) -> None:
    """Some lesions are hypo- or iso-intense: intensity thresholding alone cannot find them."""
    rows = _manifest(demo_cohort)
    found = {"hypo": 0, "iso": 0}
    for r in rows:
        if r["kind"] != "glioma" or r["appearance"] not in found:
            continue
        sdir = demo_cohort / "subjects" / r["subject"]
        fl = np.asanyarray(nib.load(sdir / f"{r['subject']}_FLAIR.nii.gz").dataobj).astype(np.float32)
        lesion = np.asanyarray(nib.load(sdir / f"{r['subject']}_lesion.nii.gz").dataobj) > 0
        brain = np.asanyarray(nib.load(sdir / f"{r['subject']}_brainmask.nii.gz").dataobj) > 0
        # the lesion's median sits below the brain's 90th percentile in FLAIR
        if np.median(fl[lesion]) < np.percentile(fl[brain], 90):
            found[r["appearance"]] += 1
    assert found["hypo"] >= 1 and found["iso"] >= 1, found


def test_deterministic_and_cached(tmp_path: Path) -> None:
    cfg = DemoConfig(subjects=6, seed=3, n_dicom=0, slices_per_subject=2)
    a = build_demo_cohort(tmp_path / "a", cfg, verbose=False)
    b = build_demo_cohort(tmp_path / "b", cfg, verbose=False)
    for f in sorted((a / "subjects").rglob("*.nii.gz")):
        g = b / f.relative_to(a)
        assert np.array_equal(np.asanyarray(nib.load(f).dataobj), np.asanyarray(nib.load(g).dataobj)), f.name
    # the datalists are identical too (relative paths)
    assert (a / "datalists" / "studies.json").read_text() == (b / "datalists" / "studies.json").read_text()
    # a second build with the same parameters reuses the cache: nothing is rewritten
    stamp = (a / ".complete").stat().st_mtime_ns
    t1 = (a / "subjects" / "sub-001" / "sub-001_T1w.nii.gz").stat().st_mtime_ns
    build_demo_cohort(a, cfg, verbose=False)
    assert (a / ".complete").stat().st_mtime_ns == stamp
    assert (a / "subjects" / "sub-001" / "sub-001_T1w.nii.gz").stat().st_mtime_ns == t1
    # another seed gives other subjects
    c = build_demo_cohort(
        tmp_path / "c", DemoConfig(subjects=6, seed=4, n_dicom=0, slices_per_subject=2), verbose=False
    )
    f = "subjects/sub-001/sub-001_T1w.nii.gz"
    assert not np.array_equal(np.asanyarray(nib.load(a / f).dataobj), np.asanyarray(nib.load(c / f).dataobj))


def test_interrupted_build_keeps_existing_cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.demo as demo

    cfg = DemoConfig(subjects=6, seed=0, n_dicom=0, slices_per_subject=1)
    out = build_demo_cohort(tmp_path / "cohort", cfg, verbose=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_datalist", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_cohort(out, DemoConfig(subjects=6, seed=1, n_dicom=0, slices_per_subject=1), verbose=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]  # no temporary folder left behind


def test_cli_rejects_too_few_subjects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_prep.demo import main

    assert main(["--out", str(tmp_path / "x"), "--subjects", "2"]) == 2
    assert "at least 6" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
