"""Dataset adapters on tiny fake layouts: valid datalists, subject-level splits, labels and errors."""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from data_prep.__main__ import main
from data_prep.adapters import (
    FINDINGS,
    brats,
    chexpert,
    encode_labels,
    fastmri_png,
    folder,
    ixi,
    kaggle_tumor,
)
from data_prep.datalist import load_datalist
from transforms.errors import InputDataError

SECTIONS = ("training", "validation", "test")


# ----------------------------------------------------------------------------- helpers


def _nii(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), path)
    return path


def _img(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), color=value).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if gz:
        gz_path = path.with_name(path.name + ".gz")
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        return gz_path
    return path


def _dicom(path: Path, patient: str = "Doe^Jane", patient_id: str = "SECRET123") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.save_as(path, enforce_file_format=True)
    return path


def _load(path: Path) -> dict[str, list[dict]]:
    """Every non-empty section through load_datalist (which checks that each path exists)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {
        sec: load_datalist(path, sec, required_keys=("subject",)) if doc.get(sec) else [] for sec in SECTIONS
    }


def _check(path: Path) -> dict[str, list[dict]]:
    """Load a datalist, check all paths exist and that no subject is in two sections."""
    secs = _load(path)
    owner: dict[str, str] = {}
    for sec, items in secs.items():
        for it in items:
            assert owner.setdefault(it["subject"], sec) == sec, f"subject {it['subject']} in two sections"
            for p in it.get("views", []):
                assert os.path.exists(p)
            if "neg_mask" in it:
                assert os.path.exists(it["neg_mask"])
    return secs


def _subjects(items: list[dict]) -> set[str]:
    return {it["subject"] for it in items}


def _counts(secs: dict[str, list[dict]], key=_subjects) -> tuple[int, ...]:
    return tuple(len(key(secs[s])) for s in SECTIONS)


# ----------------------------------------------------------------------------- brats


def _brats_subject(base: Path, name: str, mods=("t1", "t1ce", "t2", "flair", "seg"), ext=".nii.gz") -> Path:
    sep = "-" if name.startswith("BraTS-") else "_"
    for m in mods:
        _nii(base / name / f"{name}{sep}{m}{ext}")
    return base / name


def test_brats_2020_2021_2023_layouts(tmp_path):
    r20 = tmp_path / "b20"
    nested = r20 / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    for i in (1, 2):
        _brats_subject(nested, f"BraTS20_Training_00{i}", ext=".nii")
    # the misnamed segmentation of BraTS20_Training_355
    odd = _brats_subject(nested, "BraTS20_Training_355", mods=("t1", "t1ce", "t2", "flair"), ext=".nii")
    _nii(odd / "W39_1998.09.19_Segm.nii")
    (written,) = brats(r20, tmp_path / "o20", modality="t1ce")
    secs = _check(written)
    assert secs["training"] == [] and secs["validation"] == []
    assert len(secs["test"]) == 3
    for it in secs["test"]:
        assert it["kind"] == "glioma"
        assert it["image"].endswith(f"{it['subject']}_t1ce.nii")
    assert {Path(it["label"]).name for it in secs["test"]} == {
        "BraTS20_Training_001_seg.nii",
        "BraTS20_Training_002_seg.nii",
        "W39_1998.09.19_Segm.nii",
    }

    r21 = tmp_path / "b21"
    _brats_subject(r21, "BraTS2021_00000")
    _brats_subject(r21, "BraTS2021_00002")
    _brats_subject(r21, "BraTS-GLI-00003-000", mods=("t1n", "t1c", "t2w", "t2f", "seg"))
    secs = _check(brats(r21, tmp_path / "o21")[0])
    images = sorted(Path(it["image"]).name for it in secs["test"])
    assert images == [
        "BraTS-GLI-00003-000-t2f.nii.gz",
        "BraTS2021_00000_flair.nii.gz",
        "BraTS2021_00002_flair.nii.gz",
    ]


def _ixi_root(root: Path, n_per_site: int = 10, mods=("T1", "T2")) -> Path:
    k = 2
    for site in ("Guys", "HH"):
        for _ in range(n_per_site):
            for m in mods:
                _nii(root / f"IXI-{m}" / f"IXI{k:03d}-{site}-{1000 + k}-{m}.nii.gz")
            k += 1
    return root


def test_brats_merges_healthy_datalist(tmp_path):
    (healthy,) = ixi(_ixi_root(tmp_path / "ixi", n_per_site=5), tmp_path / "o_ixi", modality="T2")
    root = tmp_path / "brats"
    _brats_subject(root, "BraTS2021_00000")
    (written,) = brats(root, tmp_path / "out", healthy_datalist=healthy)
    secs = _check(written)
    ixi_secs = _load(healthy)
    assert _subjects(secs["training"]) == _subjects(ixi_secs["training"])
    assert _subjects(secs["validation"]) == _subjects(ixi_secs["validation"])
    kinds = sorted(it["kind"] for it in secs["test"])
    assert kinds == ["glioma"] + ["healthy"] * len(ixi_secs["test"])
    assert all(("label" in it) == (it["kind"] == "glioma") for it in secs["test"])


def test_brats_errors(tmp_path):
    (tmp_path / "root" / "not_brats").mkdir(parents=True)
    with pytest.raises(InputDataError, match="no BraTS subject folders") as e:
        brats(tmp_path / "root", tmp_path / "out")
    assert str(tmp_path / "root") in str(e.value)
    sub = _brats_subject(tmp_path / "r2", "BraTS2021_00001", mods=("t1", "seg"))
    with pytest.raises(InputDataError, match="no flair volume") as e:
        brats(tmp_path / "r2", tmp_path / "out")
    assert str(sub) in str(e.value)
    with pytest.raises(InputDataError, match="does not exist") as e:
        brats(tmp_path / "r2", tmp_path / "out", modality="t1", healthy_datalist=tmp_path / "nope.json")
    assert "nope.json" in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- ixi


def test_ixi_split_counts_and_determinism(tmp_path):
    root = _ixi_root(tmp_path / "ixi")
    (a,) = ixi(root, tmp_path / "a", seed=0, val_frac=0.1, test_frac=0.1, modality="T2")
    secs = _check(a)
    # 10 subjects per site, stratified by site: 8/1/1 per site
    assert _counts(secs) == (16, 2, 2)
    for sec in SECTIONS:
        assert {it["site"] for it in secs[sec]} == {"Guys", "HH"}
    assert all(it["image"].endswith("-T2.nii.gz") for s in SECTIONS for it in secs[s])
    assert all(it["subject"] == Path(it["image"]).name.split("-")[0] for s in SECTIONS for it in secs[s])
    assert all(it["kind"] == "healthy" and "label" not in it for it in secs["test"])
    (b,) = ixi(root, tmp_path / "b", seed=0, val_frac=0.1, test_frac=0.1, modality="T2")
    assert a.read_bytes() == b.read_bytes()
    (c,) = ixi(root, tmp_path / "c", seed=1, val_frac=0.1, test_frac=0.1, modality="T2")
    assert _subjects(_load(c)["training"]) != _subjects(secs["training"])


def test_ixi_errors(tmp_path):
    root = _ixi_root(tmp_path / "ixi", n_per_site=1, mods=("T1",))
    with pytest.raises(InputDataError, match=r"no IXI PD files.*found modalities \['T1'\]") as e:
        ixi(root, tmp_path / "out", modality="PD")
    assert str(root) in str(e.value)
    with pytest.raises(InputDataError, match="folder does not exist"):
        ixi(tmp_path / "missing", tmp_path / "out")


# ----------------------------------------------------------------------------- fastmri_png


def _fastmri_root(root: Path) -> Path:
    png = "data/fastMRI/brain_mid_png"
    splits = root / "data" / "splits"

    def images(names):
        return [_img(root / png / f"{n}.png") for n in names]

    def rows(names, folder=png):
        return [[i, f"./{folder}/{n}.png"] for i, n in enumerate(names)]

    header = ["", "filename"]  # pandas' to_csv writes an unnamed index column
    groups = {
        "normal_train": [f"file_brain_AXT1_202_60000{i:02d}" for i in range(10)],
        "normal_val": ["file_brain_AXT1_202_6000100", "file_brain_AXT1_202_6000101"],
        "normal_test": ["file_brain_AXT2_200_6000200", "file_brain_AXT2_200_6000201"],
    }
    for name, stems in groups.items():
        images(stems)
        _csv(splits / f"{name}.csv", header, rows(stems))
    for path, stems in {
        "edema": ["file_brain_AXFLAIR_1", "file_brain_AXFLAIR_2"],
        "mass": ["file_brain_AXT1_3"],
    }.items():
        images(stems)
        for sub in ("brain_mid_anno_pos_png", "brain_mid_anno_neg_png"):
            for n in stems:
                _img(root / "data/fastMRI" / sub / f"{n}.png", 255)
        _csv(splits / f"{path}.csv", header, rows(stems))
        _csv(splits / f"{path}_ann.csv", header, rows(stems, "data/fastMRI/brain_mid_anno_pos_png"))
        _csv(splits / f"{path}_neg.csv", header, rows(stems, "data/fastMRI/brain_mid_anno_neg_png"))
    return root


def test_fastmri_png(tmp_path):
    root = _fastmri_root(tmp_path / "mad")
    (written,) = fastmri_png(root, tmp_path / "out")
    secs = _check(written)
    assert _counts(secs, key=list) == (10, 2, 5)
    assert "file_brain_AXT1_202_6000005" in _subjects(secs["training"])
    assert _subjects(secs["validation"]) == {"file_brain_AXT1_202_6000100", "file_brain_AXT1_202_6000101"}
    by_subject = {it["subject"]: it for it in secs["test"]}
    assert sorted(it["kind"] for it in secs["test"]) == ["edema", "edema", "healthy", "healthy", "mass"]
    mass = by_subject["file_brain_AXT1_3"]
    assert mass["kind"] == "mass"
    assert mass["label"].endswith("brain_mid_anno_pos_png/file_brain_AXT1_3.png")
    assert mass["neg_mask"].endswith("brain_mid_anno_neg_png/file_brain_AXT1_3.png")
    assert "label" not in by_subject["file_brain_AXT2_200_6000200"]
    raw = json.loads(written.read_text())
    assert not any(os.path.isabs(it.get("neg_mask", "")) for it in raw["test"])

    # without a validation CSV: val_frac of the training subjects are held out
    (root / "data/splits/normal_val.csv").unlink()
    (again,) = fastmri_png(root, tmp_path / "out2", pathologies=["mass"], val_frac=0.1)
    secs = _check(again)
    assert _counts(secs, key=list) == (9, 1, 3)
    assert _subjects(secs["validation"]) < {f"file_brain_AXT1_202_60000{i:02d}" for i in range(10)}


def test_fastmri_png_errors(tmp_path):
    root = _fastmri_root(tmp_path / "mad")
    splits = root / "data/splits"
    bad = _csv(splits / "normal_val.csv", ["file"], [["x.png"]])
    with pytest.raises(InputDataError, match=r"lacks required column\(s\) \['filename'\]") as e:
        fastmri_png(root, tmp_path / "out")
    assert str(bad) in str(e.value)
    _csv(splits / "normal_val.csv", ["filename"], [["./data/fastMRI/brain_mid_png/gone.png"]])
    with pytest.raises(InputDataError, match="does not exist") as e:
        fastmri_png(root, tmp_path / "out")
    assert str(root / "data/fastMRI/brain_mid_png/gone.png") in str(e.value)
    (splits / "normal_val.csv").unlink()
    _csv(splits / "mass_neg.csv", ["filename"], [])
    with pytest.raises(InputDataError, match="row-aligned") as e:
        fastmri_png(root, tmp_path / "out")
    assert str(splits / "mass_ann.csv") in str(e.value)
    with pytest.raises(InputDataError, match="no split folder") as e:
        fastmri_png(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- kaggle_tumor


def _kaggle_root(root: Path, n_train: int = 10, n_test: int = 2) -> Path:
    for part, n, tag in (("Training", n_train, "Tr"), ("Testing", n_test, "Te")):
        for cls in ("glioma", "meningioma", "notumor", "pituitary"):
            for i in range(n):
                _img(root / part / cls / f"{tag}-{cls[:2]}_{i:04d}.jpg")
    return root


def test_kaggle_tumor(tmp_path):
    root = _kaggle_root(tmp_path / "kaggle")
    binary, multi = kaggle_tumor(root, tmp_path / "out", seed=0, val_frac=0.1)
    assert json.loads(multi.read_text())["labels"] == ["healthy", "glioma", "meningioma", "pituitary"]
    assert json.loads(binary.read_text())["labels"] == ["healthy", "tumour"]
    m, b = _check(multi), _check(binary)
    assert _counts(m) == (36, 4, 8)
    for sec in SECTIONS:
        assert _subjects(m[sec]) == _subjects(b[sec])  # both files share one split
    assert {it["class_name"] for it in m["validation"]} == {"healthy", "glioma", "meningioma", "pituitary"}
    assert all("/Testing/" in it["image"] for it in m["test"])
    assert not any("/Testing/" in it["image"] for it in m["training"] + m["validation"])
    expected = {"glioma": (1, 1), "meningioma": (2, 1), "notumor": (0, 0), "pituitary": (3, 1)}
    for sec in SECTIONS:
        for it_m, it_b in zip(m[sec], b[sec], strict=True):
            cls = Path(it_m["image"]).parent.name
            assert (it_m["label"], it_b["label"]) == expected[cls]
            assert it_m["class_name"] == ("healthy" if cls == "notumor" else cls)
            assert it_b["class_name"] == ("healthy" if cls == "notumor" else "tumour")


def test_kaggle_tumor_errors(tmp_path):
    with pytest.raises(InputDataError, match="no Training") as e:
        kaggle_tumor(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(e.value)
    odd = tmp_path / "k1" / "Training" / "cats"
    _img(odd / "a.jpg")
    with pytest.raises(InputDataError, match="unknown class folder") as e:
        kaggle_tumor(tmp_path / "k1", tmp_path / "out")
    assert str(odd) in str(e.value)
    (tmp_path / "k2" / "Training" / "glioma").mkdir(parents=True)
    with pytest.raises(InputDataError, match="no images"):
        kaggle_tumor(tmp_path / "k2", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # never an empty datalist


# ----------------------------------------------------------------------------- chexpert / MIMIC


def test_encode_labels_uncertain_policies():
    row = {f: "" for f in FINDINGS} | {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pneumonia": "0.0"}
    base = [0.0] * len(FINDINGS)
    base[FINDINGS.index("Cardiomegaly")] = 1.0
    for policy, edema in (("zeros", 0.0), ("ones", 1.0), ("ignore", -1.0)):
        want = list(base)
        want[FINDINGS.index("Edema")] = edema
        assert encode_labels(row, policy) == want
    with pytest.raises(ValueError, match="expected 1, 0, -1 or blank"):
        encode_labels(row | {"Fracture": "2"})


def _chexpert_root(root: Path) -> Path:
    """8 train patients (patient00003 has a 7-view study) + 2 valid patients."""
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
    for part, patients in (("train", range(1, 9)), ("valid", range(64541, 64543))):
        rows = []
        for p in patients:
            for s in (1, 2) if p % 2 else (1,):
                n_views = 7 if (p, s) == (3, 1) else 2
                for v in range(n_views, 0, -1):  # lateral rows first, to check the ordering
                    side = "Frontal" if v == 1 else "Lateral"
                    rel = f"CheXpert-v1.0-small/{part}/patient{p:05d}/study{s}/view{v}_{side.lower()}.jpg"
                    _img(root / rel)
                    labels = [""] * len(FINDINGS)
                    labels[FINDINGS.index("Edema")] = "-1.0" if p == 1 else "1.0"
                    rows.append([rel, "Female", 60, side, "PA" if v == 1 else "", *labels])
        _csv(base / f"{part}.csv", header, rows)
    return root


def test_chexpert_layout(tmp_path):
    root = _chexpert_root(tmp_path / "cx")
    (written,) = chexpert(root, tmp_path / "out", seed=0, val_frac=0.1, test_frac=0.2, uncertain="ignore")
    doc = json.loads(written.read_text())
    assert doc["findings"] == list(FINDINGS) and doc["uncertain_policy"] == "ignore"
    secs = _check(written)
    assert _counts(secs) == (7, 1, 2)  # 10 patients
    items = {it["study"]: it for s in SECTIONS for it in secs[s]}
    assert len(items) == 15
    for key, it in items.items():
        assert it["subject"] == key.split("/")[0]
        assert {Path(v).parent.name for v in it["views"]} == {key.split("/")[1]}
        assert {Path(v).parent.parent.name for v in it["views"]} == {it["subject"]}
        assert len(it["views"]) == len(it["view_names"]) <= 5
        assert it["view_names"][0] == "PA" and Path(it["views"][0]).name == "view1_frontal.jpg"
    assert len(items["patient00003/study1"]["views"]) == 5
    edema = FINDINGS.index("Edema")
    assert items["patient00001/study1"]["labels"][edema] == -1.0
    assert items["patient00002/study1"]["labels"][edema] == 1.0
    assert sum(items["patient00002/study1"]["labels"]) == 1.0


def test_mimic_layout(tmp_path):
    root = tmp_path / "mimic"
    lab_rows, meta_rows = [], []
    for k in range(10):
        sid = str(10000032 + k)
        for s in range(2 if k < 3 else 1):
            stid = str(50000000 + 10 * k + s)
            views = ["LATERAL", "AP", "PA", "LL", "PA", "AP"] if k == 0 and s == 0 else ["LATERAL", "PA"]
            for j, vp in enumerate(views):
                dicom = f"d{k}{s}{j}"
                _img(root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}" / f"{dicom}.jpg")
                meta_rows.append([dicom, sid, stid, "CHEST", vp])
            labels = ["1.0" if f == "No Finding" else "" for f in FINDINGS]
            lab_rows.append([sid, stid, *labels])
    meta_rows.append(["unlabelled", "10000032", "59999999", "CHEST", "PA"])  # a study without labels
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *FINDINGS], lab_rows, gz=True)
    _csv(
        root / "mimic-cxr-2.0.0-metadata.csv",
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"],
        meta_rows,
    )
    (written,) = chexpert(root, tmp_path / "out", val_frac=0.1, test_frac=0.2)
    secs = _check(written)
    assert _counts(secs) == (7, 1, 2)
    items = {it["study"]: it for s in SECTIONS for it in secs[s]}
    assert len(items) == 13
    big = items["p10000032/s50000000"]
    assert big["subject"] == "p10000032"
    assert big["view_names"] == ["PA", "PA", "AP", "AP", "LATERAL"]  # 6 views capped at 5, frontal first
    assert all(Path(v).parent.name == "s50000000" for v in big["views"])
    assert all(it["labels"] == [1.0] + [0.0] * 13 for it in items.values())


def test_chexpert_errors(tmp_path):
    with pytest.raises(InputDataError, match="neither MIMIC-CXR-JPG") as e:
        chexpert(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(e.value)
    root = _chexpert_root(tmp_path / "cx")
    train = root / "CheXpert-v1.0-small" / "train.csv"
    rows = list(csv.reader(train.open()))
    gone = root / rows[1][0]
    gone.unlink()
    with pytest.raises(InputDataError, match="does not exist") as e:
        chexpert(root, tmp_path / "out")
    assert str(gone) in str(e.value) and str(train) in str(e.value)
    (written,) = chexpert(root, tmp_path / "out", skip_missing=True)
    _check(written)
    drop = rows[0].index("Cardiomegaly")
    _csv(train, [c for i, c in enumerate(rows[0]) if i != drop], [r[:drop] + r[drop + 1 :] for r in rows[1:]])
    with pytest.raises(InputDataError, match=r"lacks required column\(s\) \['Cardiomegaly'\]") as e:
        chexpert(root, tmp_path / "out2")
    assert str(train) in str(e.value)


# ----------------------------------------------------------------------------- folder


def _folder_root(root: Path) -> Path:
    _nii(root / "a.nii.gz")
    _nii(root / "patA" / "b.nii")
    _nii(root / "patA" / "c.nii.gz")
    _dicom(root / "Doe_Jane" / "series1" / "IM0001.dcm")
    _dicom(root / "Doe_Jane" / "series1" / "IM0002.dcm")
    _dicom(root / "series2" / "IM0001")  # no extension: detected by the DICM preamble
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_without_csv(tmp_path):
    root = _folder_root(tmp_path / "f")
    (written,) = folder(root, tmp_path / "out")
    secs = _check(written)
    assert secs["training"] == [] and secs["validation"] == []
    images = sorted(os.path.relpath(it["image"], root) for it in secs["test"])
    assert images == ["Doe_Jane/series1", "a.nii.gz", "patA/b.nii", "patA/c.nii.gz", "series2"]
    assert all(it["subject"].startswith("s-") for it in secs["test"])
    assert len(_subjects(secs["test"])) == 5
    text = written.read_text()
    assert "SECRET123" not in text and "Doe^Jane" not in text  # DICOM tags are never read

    (grouped,) = folder(
        root, tmp_path / "out_g", as_healthy=True, subject_depth=1, val_frac=0.25, test_frac=0.25
    )
    secs = _check(grouped)
    by_image = {os.path.relpath(it["image"], root): it for s in SECTIONS for it in secs[s]}
    assert by_image["patA/b.nii"]["subject"] == by_image["patA/c.nii.gz"]["subject"]
    assert _counts(secs) == (2, 1, 1)  # 4 subjects: a.nii.gz, patA, Doe_Jane, series2
    assert all(it["kind"] == "healthy" for it in secs["test"])


def test_folder_csv_labels(tmp_path):
    root = tmp_path / "f"
    rows = []
    for i in range(12):
        cls = "tumor" if i % 2 else "normal"
        _nii(root / f"img{i:02d}.nii.gz")
        _nii(root / "masks" / f"img{i:02d}.nii.gz")
        rows.append([f"img{i:02d}.nii.gz", cls, f"masks/img{i:02d}.nii.gz"])
    table = _csv(tmp_path / "table.csv", ["path", "label", "mask"], rows)
    (written,) = folder(root, tmp_path / "out", csv=table, seed=0, val_frac=0.1, test_frac=0.2)
    assert json.loads(written.read_text())["labels"] == ["normal", "tumor"]
    secs = _check(written)
    assert _counts(secs) == (8, 2, 2)  # 6 per class: 4/1/1
    for s in SECTIONS:
        assert {it["class_name"] for it in secs[s]} == {"normal", "tumor"}
        for it in secs[s]:
            assert it["label"] == int(Path(it["image"]).name[3:5]) % 2
            assert Path(it["mask"]).name == Path(it["image"]).name

    ints = _csv(
        tmp_path / "ints.csv",
        ["path", "label", "subject"],
        [[f"img{i:02d}.nii.gz", i % 3, f"S{i // 2}"] for i in range(12)],
    )
    (written,) = folder(root, tmp_path / "out_i", csv=ints, val_frac=0.0, test_frac=0.5)
    doc = json.loads(written.read_text())
    assert "labels" not in doc
    secs = _check(written)
    assert {it["label"] for s in SECTIONS for it in secs[s]} == {0, 1, 2}
    with pytest.raises(ValueError, match="as_healthy"):
        folder(root, tmp_path / "out_x", csv=table, as_healthy=True)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no NIfTI files") as e:
        folder(tmp_path / "empty", tmp_path / "out")
    assert str(tmp_path / "empty") in str(e.value)
    root = tmp_path / "f"
    _nii(root / "a.nii.gz")
    bad = _csv(tmp_path / "bad.csv", ["file", "label"], [["a.nii.gz", 1]])
    with pytest.raises(InputDataError, match=r"lacks required column\(s\) \['path'\]") as e:
        folder(root, tmp_path / "out", csv=bad)
    assert str(bad) in str(e.value)
    ref = _csv(tmp_path / "ref.csv", ["path", "mask"], [["a.nii.gz", "masks/gone.nii.gz"]])
    with pytest.raises(InputDataError, match="does not exist") as e:
        folder(root, tmp_path / "out", csv=ref)
    assert str(root / "masks" / "gone.nii.gz") in str(e.value) and "ref.csv row 1" in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys, monkeypatch):
    root = _kaggle_root(tmp_path / "kaggle", n_train=5, n_test=1)
    out = tmp_path / "out"
    assert (
        main(["kaggle_tumor", "--root", str(root), "--out", str(out), "--seed", "3", "--val-frac", "0.2"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "training=16, validation=4, test=4" in lines[0]
    assert (out / "classification_binary.json").is_file() and (
        out / "classification_multiclass.json"
    ).is_file()
    assert (
        kaggle_tumor(root, tmp_path / "direct", seed=3, val_frac=0.2)[1].read_bytes()
        == (out / "classification_multiclass.json").read_bytes()
    )

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listing = capsys.readouterr().out
    for name in ("brats", "ixi", "fastmri_png", "kaggle_tumor", "chexpert", "folder", "demo", "preprocess"):
        assert name in listing

    with pytest.raises(SystemExit) as e:
        main(["ixi", "--root", str(tmp_path / "nowhere"), "--out", str(out)])
    assert e.value.code == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err

    calls = []
    fake = types.ModuleType("data_prep.demo")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "data_prep.demo", fake)
    assert main(["demo", "--out", "x", "--n", "2"]) == 0
    assert calls == [["--out", "x", "--n", "2"]]
