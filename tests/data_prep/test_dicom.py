"""DICOM series writing/reading: geometry round trips through MONAI and SimpleITK, and input errors."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Orientation
from pydicom.data import get_testdata_file

from data_prep.dicom import dicom_to_nifti, read_dicom_series, write_dicom_series
from transforms.errors import InputDataError

SHAPE = (12, 10, 8)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear: np.ndarray, offset) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = offset
    return aff


AFFINES = {
    # RAS diagonal, non-unit anisotropic spacing, offset
    "ras": _affine(np.diag([1.2, 0.9, 2.5]), [-10.0, 20.0, 5.0]),
    # LPS-style: first two axes run R->L and A->P (DICOM-native storage order)
    "lps": _affine(np.diag([-1.2, -0.9, 2.5]), [10.0, -20.0, 5.0]),
    # radiological LAS (negative determinant): slices run against the DICOM slice normal
    "las": _affine(np.diag([-1.2, 0.9, 2.5]), [10.0, -20.0, 5.0]),
    # oblique: a rotation about all three axes
    "oblique": _affine(_rotation(20, -35, 50) @ np.diag([1.2, 0.9, 2.5]), [3.0, -7.0, 11.0]),
}


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 30.0, SHAPE).astype(np.float32)


def _load(path: Path, reader: str) -> MetaTensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's optional-decoder and deprecation chatter
        img = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(path)
        return Orientation(axcodes="RAS")(img)


def _sitk_ras(image: sitk.Image) -> MetaTensor:
    """A SimpleITK image as a channel-first MetaTensor with its RAS affine, oriented to RAS."""
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Orientation(axcodes="RAS")(MetaTensor(torch.as_tensor(arr[None].copy()), affine=ras))


def _write_pair(tmp_path: Path, vol: np.ndarray, affine: np.ndarray) -> tuple[Path, Path, float]:
    nii = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), nii)
    files = write_dicom_series(vol, affine, tmp_path / "dcm", series_description="t1", uid_seed=7)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    return nii, tmp_path / "dcm", slope


@pytest.mark.parametrize("case", sorted(AFFINES))
def test_monai_pydicom_reader_matches_nifti(tmp_path, case):
    vol = _volume()
    nii, folder, slope = _write_pair(tmp_path, vol, AFFINES[case])
    ref = _load(nii, "NibabelReader")
    got = _load(folder, "PydicomReader")
    assert got.shape == ref.shape == (1, *ref.shape[1:])
    assert 0 < slope < 0.01  # 16-bit quantisation of a ~250-wide range
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=slope)
    np.testing.assert_allclose(got.affine.numpy(), ref.affine.numpy(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", sorted(AFFINES))
def test_simpleitk_reader_matches_nifti(tmp_path, case):
    vol = _volume(1)
    nii, folder, slope = _write_pair(tmp_path, vol, AFFINES[case])
    ref = _load(nii, "NibabelReader")
    image = read_dicom_series(folder)
    assert image.GetSize() == SHAPE
    got = _sitk_ras(image)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=slope)
    np.testing.assert_allclose(got.affine.numpy(), ref.affine.numpy(), rtol=0, atol=1e-3)
    # and through NIfTI written by SimpleITK
    out = dicom_to_nifti(folder, tmp_path / "from_dicom.nii.gz")
    back = _load(out, "NibabelReader")
    np.testing.assert_allclose(back.numpy(), ref.numpy(), rtol=0, atol=slope)
    np.testing.assert_allclose(back.affine.numpy(), ref.affine.numpy(), rtol=0, atol=1e-3)


def test_integer_volume_round_trips_exactly(tmp_path):
    labels = np.random.default_rng(2).integers(-5, 300, SHAPE).astype(np.int32)
    files = write_dicom_series(labels, AFFINES["ras"], tmp_path / "dcm", uid_seed=1)
    ds = pydicom.dcmread(files[0])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    got = sitk.GetArrayFromImage(read_dicom_series(tmp_path / "dcm")).transpose(2, 1, 0)
    np.testing.assert_array_equal(got, labels)


def test_headers_are_anonymous_valid_and_deterministic(tmp_path):
    vol = _volume()
    files = write_dicom_series(vol, AFFINES["oblique"], tmp_path / "a", uid_seed=3, patient_id="sub-001")
    again = write_dicom_series(vol, AFFINES["oblique"], tmp_path / "b", uid_seed=3, patient_id="sub-001")
    other = write_dicom_series(vol, AFFINES["oblique"], tmp_path / "c", uid_seed=4, patient_id="sub-001")
    assert [f.name for f in files] == [f"IM{k:05d}.dcm" for k in range(1, SHAPE[2] + 1)]
    uid_tags = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    sop_uids = set()
    for k, (f, g, h) in enumerate(zip(files, again, other, strict=True)):
        ds = pydicom.dcmread(f)  # no force: preamble, "DICM" and file meta must be valid
        assert f.read_bytes()[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert str(ds.PatientName) == "ANONYMOUS" and ds.PatientID == "sub-001"
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert ds.InstanceNumber == k + 1 and (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
        assert ds.Modality == "MR" and ds.SeriesDescription == ""
        for elem in ds.iterall():  # no person name other than the placeholder(s)
            if elem.VR == "PN":
                assert str(elem.value) in ("ANONYMOUS", "")
        d2, d3 = pydicom.dcmread(g), pydicom.dcmread(h)
        for tag in uid_tags:
            assert ds[tag].value.is_valid
            assert ds[tag].value == d2[tag].value  # same seed: same UIDs
            assert ds[tag].value != d3[tag].value  # other seed: other UIDs
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(files)


def test_write_refuses_non_empty_folder_and_sheared_affine(tmp_path):
    vol = _volume()
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_dicom_series(vol, AFFINES["ras"], tmp_path / "dcm")
    sheared = AFFINES["ras"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="not orthogonal"):
        write_dicom_series(vol, sheared, tmp_path / "sheared")
    assert not (tmp_path / "sheared").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dcm"]  # no temporary folder left behind


# ------------------------------------------------------------------------------------------- errors


def test_truncated_pixel_data_names_the_file(tmp_path):
    src = get_testdata_file("MR_truncated.dcm")
    assert src is not None
    shutil.copy(src, tmp_path / "MR_truncated.dcm")
    with pytest.raises(InputDataError, match="truncated pixel data") as err:
        read_dicom_series(tmp_path)
    assert err.value.path == str(tmp_path / "MR_truncated.dcm")


def test_missing_middle_slice(tmp_path):
    files = write_dicom_series(_volume(), AFFINES["oblique"], tmp_path / "dcm", uid_seed=1)
    files[3].unlink()
    with pytest.raises(InputDataError, match="missing slice") as err:
        read_dicom_series(tmp_path / "dcm")
    assert err.value.path == str(tmp_path / "dcm")


def test_duplicated_slice(tmp_path):
    files = write_dicom_series(_volume(), AFFINES["ras"], tmp_path / "dcm", uid_seed=1)
    shutil.copy(files[2], tmp_path / "dcm" / "copy_of_slice3.dcm")
    with pytest.raises(InputDataError, match="duplicated slice position") as err:
        read_dicom_series(tmp_path / "dcm")
    assert err.value.path == str(tmp_path / "dcm")


def test_empty_folder_and_non_dicom_files(tmp_path):
    with pytest.raises(InputDataError, match="no DICOM files"):
        read_dicom_series(tmp_path)
    (tmp_path / "README.txt").write_text("not an image")
    with pytest.raises(InputDataError, match="no DICOM files") as err:
        read_dicom_series(tmp_path)
    assert err.value.path == str(tmp_path)
    with pytest.raises(InputDataError, match="no such folder"):
        read_dicom_series(tmp_path / "absent")


def test_mixed_orientations(tmp_path):
    files = write_dicom_series(_volume(), AFFINES["ras"], tmp_path / "dcm", uid_seed=1)
    ds = pydicom.dcmread(files[5])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[5], enforce_file_format=True)
    with pytest.raises(InputDataError, match="mixed orientations"):
        read_dicom_series(tmp_path / "dcm")


def test_several_series_need_a_choice(tmp_path):
    vol = _volume()
    write_dicom_series(vol, AFFINES["ras"], tmp_path / "a", series_description="T1", uid_seed=1)
    b = write_dicom_series(vol[:, :, :5], AFFINES["ras"], tmp_path / "b", series_description="T2", uid_seed=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a", mixed)
    for f in b:
        shutil.copy(f, mixed / f"b_{f.name}")
    with pytest.raises(InputDataError, match="2 series") as err:
        read_dicom_series(mixed)
    assert "8 files" in str(err.value) and "5 files" in str(err.value)
    uid = pydicom.dcmread(b[0]).SeriesInstanceUID
    assert read_dicom_series(mixed, series_uid=uid).GetSize() == (12, 10, 5)
    with pytest.raises(InputDataError, match="no series"):
        read_dicom_series(mixed, series_uid="1.2.3")
