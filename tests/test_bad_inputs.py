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
