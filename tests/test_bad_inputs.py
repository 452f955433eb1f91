"""The bad-input catalogue of issue 2 through the public entry points: every fault names the file.

Each case builds one faulty input in ``tmp_path`` and feeds it where a user's data would enter:
``transforms.volume_loading_transforms`` (the bundles' loading pipeline), ``data_prep.dicom`` and
``data_prep.datalist.load_datalist``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from transforms import volume_loading_transforms
from transforms.errors import InputDataError

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def _nifti(path: Path, arr: np.ndarray, affine: np.ndarray = AFF) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), path)
    return path


def _brain(shape: tuple[int, ...] = (12, 12, 8)) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.uniform(100, 200, shape)
    return a


def _load(image: Path, mask: Path | None = None) -> None:
    keys = {"image": str(image)}
    if mask is not None:
        keys["brain_mask"] = str(mask)
    volume_loading_transforms(("image",), ("brain_mask",) if mask is not None else ())(keys)


def case_truncated_nifti(tmp: Path) -> tuple[Path, Callable[[], None]]:
    p = _nifti(tmp / "truncated.nii.gz", _brain())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, lambda: _load(p)


def case_dicom_without_pixel_data(tmp: Path) -> tuple[Path, Callable[[], None]]:
    from pydicom.data import get_testdata_file

    from data_prep.dicom import read_dicom_series

    d = tmp / "series"
    d.mkdir()
    p = d / "MR_truncated.dcm"
    shutil.copy(get_testdata_file("MR_truncated.dcm"), p)
    return p, lambda: read_dicom_series(d)


def case_nan_voxels(tmp: Path) -> tuple[Path, Callable[[], None]]:
    a = _brain()
    a[3, 4, 5] = np.nan
    p = _nifti(tmp / "nan.nii.gz", a)
    return p, lambda: _load(p)


def case_inf_voxels(tmp: Path) -> tuple[Path, Callable[[], None]]:
    a = _brain()
    a[1, 1, 1] = np.inf
    p = _nifti(tmp / "inf.nii.gz", a)
    return p, lambda: _load(p)


def case_4d_volume(tmp: Path) -> tuple[Path, Callable[[], None]]:
    p = _nifti(tmp / "fmri_4d.nii.gz", np.stack([_brain()] * 3, axis=-1))
    return p, lambda: _load(p)


def case_2d_where_3d_expected(tmp: Path) -> tuple[Path, Callable[[], None]]:
    p = _nifti(tmp / "slice_2d.nii.gz", _brain((12, 12)))
    return p, lambda: _load(p)


def case_mask_shape_mismatch(tmp: Path) -> tuple[Path, Callable[[], None]]:
    img = _nifti(tmp / "img.nii.gz", _brain())
    m = _nifti(tmp / "mask_wrong_shape.nii.gz", np.ones((12, 12, 7)))
    return m, lambda: _load(img, m)


def case_mask_affine_mismatch(tmp: Path) -> tuple[Path, Callable[[], None]]:
    img = _nifti(tmp / "img.nii.gz", _brain())
    shifted = AFF.copy()
    shifted[0, 3] = 10.0
    m = _nifti(tmp / "mask_shifted.nii.gz", np.ones((12, 12, 8)), shifted)
    return m, lambda: _load(img, m)


def case_missing_file(tmp: Path) -> tuple[Path, Callable[[], None]]:
    p = tmp / "does_not_exist.nii.gz"
    return p, lambda: _load(p)


def case_empty_datalist(tmp: Path) -> tuple[Path, Callable[[], None]]:
    from data_prep.datalist import load_datalist

    p = tmp / "empty_datalist.json"
    p.write_text(json.dumps({"training": []}))
    return p, lambda: load_datalist(p, "training")


def case_datalist_missing_file(tmp: Path) -> tuple[Path, Callable[[], None]]:
    from data_prep.datalist import load_datalist

    p = tmp / "datalist.json"
    p.write_text(json.dumps({"training": [{"image": "missing_volume.nii.gz", "subject": "s1"}]}))
    return tmp / "missing_volume.nii.gz", lambda: load_datalist(p, "training")


CASES = {k[5:]: v for k, v in dict(globals()).items() if k.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_names_the_file(tmp_path: Path, name: str) -> None:
    path, feed = CASES[name](tmp_path)
    with pytest.raises(InputDataError) as e:
        feed()
    assert str(path) in str(e.value) or path.name in str(e.value), str(e.value)
    assert e.value.fault  # the fault is stated, not just the file


def test_catalogue_is_complete() -> None:
    """The issue's list: truncated NIfTI, DICOM without pixel data, NaN/Inf, 4D, mask shape, empty datalist, missing file."""
    assert {
        "truncated_nifti",
        "dicom_without_pixel_data",
        "nan_voxels",
        "inf_voxels",
        "4d_volume",
        "mask_shape_mismatch",
        "empty_datalist",
        "missing_file",
    } <= set(CASES)


# --------------------------------------------------------------------------------------------------------
# Issue 8: the whole catalogue through data_prep's datalist check, and the checkpoint faults
# --------------------------------------------------------------------------------------------------------


def _demo_like(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """A small brain-like volume with brain and lesion masks, and a DICOM series of it."""
    from data_prep.dicom import write_dicom_series

    shape = (24, 24, 12)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    brain = (zz**2 + yy**2 + xx**2) < 0.7
    rng = np.random.default_rng(1)
    vol = np.where(brain, rng.uniform(300, 600, shape), rng.uniform(0, 20, shape)).astype(np.float32)
    lesion = brain & ((zz - 0.2) ** 2 + yy**2 + xx**2 < 0.05)
    img = _nifti(tmp / "sub-001_T1w.nii.gz", vol)
    bm = _nifti(tmp / "sub-001_brainmask.nii.gz", brain.astype(np.float32))
    les = _nifti(tmp / "sub-001_lesion.nii.gz", lesion.astype(np.float32))
    series = tmp / "series_good"
    write_dicom_series(vol, AFF, series)
    return img, bm, les, series


def test_catalogue_through_data_prep_check(tmp_path: Path) -> None:
    """Every kind of the catalogue in one datalist: ``data_prep.check`` reports each, naming the file, and goes
    on to the next item; the good item passes."""
    from data_prep.check import check_datalist
    from tests._catalogue import bad_volumes

    img, bm, les, series = _demo_like(tmp_path)
    volumes = bad_volumes(img, series, tmp_path / "bad")
    good = {"image": str(img), "brain_mask": str(bm), "label": str(les), "kind": "tumour", "subject": "s0"}
    items = [good] + [
        {**good, "image": str(p), "subject": f"s{i + 1}"} for i, (p, _) in enumerate(volumes.values())
    ]
    wrong_shape = _nifti(tmp_path / "mask_wrong_shape.nii.gz", np.ones((24, 24, 11)))
    shifted = AFF.copy()
    shifted[0, 3] = 10.0
    wrong_affine = _nifti(tmp_path / "mask_shifted.nii.gz", nib.load(bm).get_fdata(), shifted)
    empty_brain = _nifti(tmp_path / "empty_brainmask.nii.gz", np.zeros((24, 24, 12)))
    empty_lesion = _nifti(tmp_path / "empty_lesion.nii.gz", np.zeros((24, 24, 12)))
    dataset_cases = {
        "mask_shape_mismatch": ({**good, "brain_mask": str(wrong_shape)}, wrong_shape, "shape"),
        "mask_affine_mismatch": ({**good, "brain_mask": str(wrong_affine)}, wrong_affine, "affine"),
        "empty_brain_mask": ({**good, "brain_mask": str(empty_brain)}, empty_brain, "empty"),
        "empty_lesion_mask_in_test_set": ({**good, "label": str(empty_lesion)}, empty_lesion, "empty"),
        "missing_label": ({k: v for k, v in good.items() if k != "label"}, None, "lacks ['label']"),
    }
    items += [it for it, _, _ in dataset_cases.values()]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": items, "validation": []}))

    report = check_datalist(datalist, min_value=-200)
    assert report.n_items == len(items)
    by_item = {f.item: f.error for f in report.faults if f.section == "test"}
    assert 0 not in by_item, by_item.get(0)  # the good item passes
    for i, (kind, (path, fragment)) in enumerate(volumes.items(), start=1):
        assert path.name in by_item[i] and fragment in by_item[i].lower(), (kind, by_item.get(i))
    for j, (kind, (_, path, fragment)) in enumerate(dataset_cases.items(), start=1 + len(volumes)):
        named = datalist if path is None else path
        assert named.name in by_item[j] and fragment in by_item[j], (kind, by_item.get(j))
    # the empty section is reported against the datalist
    (empty,) = [f for f in report.faults if f.section == "validation"]
    assert str(datalist) in empty.error and "empty" in empty.error
    kinds = {*volumes, *dataset_cases, "empty_datalist", "corrupt_checkpoint", "pickled_code_checkpoint"}
    assert len(kinds) >= 14


def test_data_prep_check_cli_lists_faults_and_exits_1(tmp_path: Path) -> None:
    import subprocess
    import sys

    img, bm, _, _ = _demo_like(tmp_path)
    nan = _brain((24, 24, 12))
    nan[2, 2, 2] = np.nan
    bad = _nifti(tmp_path / "nan_volume.nii.gz", nan)
    datalist = tmp_path / "dl.json"
    datalist.write_text(
        json.dumps({"training": [{"image": str(img), "brain_mask": str(bm)}, {"image": str(bad)}]})
    )
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "check", str(datalist), "--report", str(report)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "nan_volume.nii.gz: contains 1 NaN" in proc.stderr
    assert "2 item(s) checked, 1 fault(s)" in proc.stdout
    assert [f["item"] for f in json.loads(report.read_text())["faults"]] == [1]
    datalist.write_text(json.dumps({"training": []}))
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "check", str(datalist)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 1 and "section 'training' is empty" in proc.stderr


class _Payload:
    """Pickled by reference: loading it would import and call code."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


@pytest.mark.parametrize("fault", ["corrupt", "pickled_code", "wrong_network"])
def test_inference_checkpoint_loaders_refuse_bad_checkpoints(tmp_path: Path, fault: str) -> None:
    """The loaders every inference.json uses (SafeCheckpointLoader for the anomaly bundles, load_weights for the
    classifiers) refuse a corrupt file, a file with pickled code and weights of another network, naming it."""
    import torch

    from engines import SafeCheckpointLoader, UnsafeCheckpointError, load_weights

    net = torch.nn.Linear(3, 2)
    ckpt = tmp_path / f"{fault}.pt"
    if fault == "corrupt":
        torch.save(net.state_dict(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:100])
        expected, fragment = InputDataError, "truncated or corrupt"
    elif fault == "pickled_code":
        torch.save({"model": net.state_dict(), "extra": _Payload()}, ckpt)
        expected, fragment = UnsafeCheckpointError, "pickled code"
    else:
        torch.save(torch.nn.Linear(4, 2).state_dict(), ckpt)
        expected, fragment = InputDataError, "do not fit"
    for load in (
        lambda: SafeCheckpointLoader(ckpt, {"model": net}),
        lambda: load_weights(net, ckpt),
    ):
        with pytest.raises(expected) as e:
            load()
        assert str(ckpt) in str(e.value) and fragment in str(e.value)
