"""volume_loading_transforms on real files: NIfTI and DICOM series, and every way a file can be bad."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from transforms import (
    InputCheckedCompose,
    InputDataError,
    LoadVolumed,
    SlicesToVolumed,
    VolumeToSlicesd,
    find_input_error,
    volume_loading_transforms,
)
from transforms.validate import CheckImaged

SHAPE = (6, 7, 8)
# MONAI's LoadImage registers every reader, and the GPU DICOM one warns on CPU-only machines
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return str(path)


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 50.0, size=SHAPE).astype(np.float32)


def _box_mask() -> np.ndarray:
    m = np.zeros(SHAPE, dtype=np.uint8)
    m[1:5, 2:6, 2:7] = 1
    return m


def test_nifti_image_and_mask_load_checked_and_normalised(tmp_path: Path) -> None:
    data = _volume()
    image = _save(tmp_path / "t1.nii.gz", data)
    mask = _save(tmp_path / "mask.nii.gz", _box_mask())
    out = volume_loading_transforms(mask_keys=("mask",))({"image": image, "mask": mask})
    img = out["image"]
    assert isinstance(img, MetaTensor) and img.shape == (1, *SHAPE)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert img.meta["filename_or_obj"] == image
    assert torch.allclose(img.affine, torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)))
    assert torch.equal(out["mask"][0], torch.from_numpy(_box_mask()).float())
    lo, hi = np.percentile(data, [0.5, 99.5])  # the default percentile scaling, voxel by voxel
    assert np.allclose(img[0].numpy(), np.clip((data - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_lps_image_is_reoriented_and_accepts_mask_stored_in_another_axis_order(tmp_path: Path) -> None:
    data = _volume(1)
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [5.0, 6.0, 0.0]  # x_world = 5 - i: voxel i sits where RAS voxel 5 - i does
    image = _save(tmp_path / "lps.nii.gz", data, lps)
    # the same mask, written in RAS axis order: flip the first two axes and fix the affine
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    ras[:3, 3] = [0.0, 0.0, 0.0]
    mask = _save(tmp_path / "mask_ras.nii.gz", _box_mask()[::-1, ::-1].copy(), ras)
    out = volume_loading_transforms(mask_keys="mask", normalise=None)({"image": image, "mask": mask})
    assert torch.allclose(out["image"].affine, out["mask"].affine.to(out["image"].affine.dtype))
    assert float(out["image"].affine[0, 0]) > 0 and float(out["image"].affine[1, 1]) > 0  # RAS
    assert torch.equal(out["image"][0], torch.from_numpy(data[::-1, ::-1].copy()))
    assert torch.equal(out["mask"][0], torch.from_numpy(_box_mask()[::-1, ::-1].copy()).float())


def test_spacing_and_masked_zscore(tmp_path: Path) -> None:
    image = _save(tmp_path / "t1.nii.gz", _volume(2))
    mask = _save(tmp_path / "brain.nii.gz", _box_mask())
    xforms = volume_loading_transforms(
        mask_keys=["brain"], spacing=2.0, normalise="zscore", normalise_mask_key="brain"
    )
    out = xforms({"image": image, "brain": mask})
    assert torch.allclose(out["image"].pixdim, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    assert out["image"].shape == (1, 4, 4, 8) and out["brain"].shape == (1, 4, 4, 8)
    assert set(torch.unique(out["brain"]).tolist()) <= {0.0, 1.0}  # nearest-neighbour for masks
    inside = out["image"][out["brain"] > 0].double()
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std(correction=0)) - 1) < 1e-4
    assert bool((out["image"][out["brain"] == 0] == 0).all())


def _write_dicom_series(folder: Path, volume: np.ndarray) -> None:
    """Axial MR series, one file per z; ``volume`` is (z, rows, cols) uint16."""
    folder.mkdir()
    series = generate_uid()
    for k, plane in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = series, series, "MR"
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing, ds.SliceThickness = [1.0, 2.0], 3.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def test_dicom_series_folder(tmp_path: Path) -> None:
    volume = np.arange(3 * 5 * 4, dtype=np.uint16).reshape(3, 5, 4)
    folder = tmp_path / "series"
    _write_dicom_series(folder, volume)
    out = volume_loading_transforms(normalise=None)({"image": str(folder)})
    img = out["image"]
    assert img.shape == (1, 4, 5, 3)  # (columns, rows, slices)
    assert img.meta["filename_or_obj"] == str(folder)
    assert torch.allclose(img.pixdim, torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))
    # DICOM columns run right to left and rows anterior to posterior (LPS): both reversed in RAS
    expected = torch.from_numpy(volume.astype(np.float32)).permute(2, 1, 0).flip(0).flip(1)
    assert torch.equal(img[0], expected)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "missing.nii.gz"
    with pytest.raises(InputDataError, match=r"missing\.nii\.gz: file does not exist") as info:
        volume_loading_transforms()({"image": str(path)})
    assert info.value.path == str(path)


def test_truncated_nifti(tmp_path: Path) -> None:
    path = Path(_save(tmp_path / "truncated.nii.gz", _volume(3)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError, match=r"truncated\.nii\.gz: cannot be read as an image") as info:
        volume_loading_transforms()({"image": str(path)})
    assert info.value.path == str(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(InputDataError, match=r"notes\.nii\.gz: cannot be read"):
        volume_loading_transforms()({"image": str(path)})
    with pytest.raises(InputDataError, match=r"notes\.nii\.gz: cannot be read"):
        LoadVolumed("image")({"image": str(path)})  # also without a Compose around it


def test_nan_voxels_surface_as_input_error(tmp_path: Path) -> None:
    data = _volume(4)
    data[1, 1, 1] = np.nan
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputDataError, match=r"nan\.nii\.gz: contains 1 NaN and 0 Inf voxels"):
        volume_loading_transforms()({"image": path})


def test_plain_monai_compose_wraps_the_error() -> None:
    # why InputCheckedCompose exists: MONAI's Compose hides the InputDataError inside a RuntimeError
    img = MetaTensor(torch.full((1, 2, 2, 2), float("inf")), meta={"filename_or_obj": "inf.nii"})
    with pytest.raises(RuntimeError) as info:
        Compose([CheckImaged("image")])({"image": img})
    assert not isinstance(info.value, InputDataError)
    found = find_input_error(info.value)
    assert found is not None and found.path == "inf.nii"
    with pytest.raises(InputDataError, match=r"^inf\.nii: contains 0 NaN and 8 Inf"):
        InputCheckedCompose([CheckImaged("image")])({"image": img})
    with pytest.raises(RuntimeError):  # other errors pass through unchanged
        InputCheckedCompose([lambda d: d["missing"]])({"image": img})


def test_four_d_and_two_d_files(tmp_path: Path) -> None:
    four = _save(tmp_path / "bold.nii.gz", np.random.default_rng(7).random((4, 5, 6, 3), dtype=np.float32))
    with pytest.raises(InputDataError, match=r"bold\.nii\.gz: is 4D \(shape \(4, 5, 6, 3\) as stored\)"):
        volume_loading_transforms()({"image": four})
    out = volume_loading_transforms(expected_channels=None, normalise=None)({"image": four})
    assert out["image"].shape == (3, 4, 5, 6)
    two = _save(tmp_path / "slice.nii.gz", np.random.default_rng(8).random((4, 5), dtype=np.float32))
    with pytest.raises(InputDataError, match=r"slice\.nii\.gz: is 2D .*3D volume is expected"):
        volume_loading_transforms()({"image": two})


def test_mask_on_another_grid(tmp_path: Path) -> None:
    image = _save(tmp_path / "t1.nii.gz", _volume(5))
    small = _save(tmp_path / "small_mask.nii.gz", np.ones((6, 7, 9), dtype=np.uint8))
    with pytest.raises(InputDataError, match=r"small_mask\.nii\.gz: mask spatial shape \(6, 7, 9\) differs"):
        volume_loading_transforms(mask_keys="mask")({"image": image, "mask": small})
    moved = np.diag([1.0, 1.0, 2.0, 1.0])
    moved[:3, 3] = [0.0, 3.0, 0.0]
    shifted = _save(tmp_path / "shifted_mask.nii.gz", _box_mask(), moved)
    with pytest.raises(InputDataError, match=r"shifted_mask\.nii\.gz: mask affine differs.*t1\.nii\.gz"):
        volume_loading_transforms(mask_keys="mask")({"image": image, "mask": shifted})
    other = _save(tmp_path / "t2.nii.gz", np.ones((6, 7, 9), dtype=np.float32))
    with pytest.raises(InputDataError, match=r"t2\.nii\.gz: image spatial shape"):
        volume_loading_transforms(keys=["t1", "t2"])({"t1": image, "t2": other})


def test_loaded_volume_slices_round_trip(tmp_path: Path) -> None:
    image = _save(tmp_path / "t1.nii.gz", _volume(6))
    mask = _save(tmp_path / "mask.nii.gz", _box_mask())
    pipeline = Compose(
        [
            volume_loading_transforms(mask_keys="mask", spacing=(1.0, 1.0, 1.0)),
            VolumeToSlicesd(["image", "mask"], axis=1, min_foreground=0.05, foreground_key="mask"),
            SlicesToVolumed(["image", "mask"], fill_value=0.0),
        ]
    )
    full = volume_loading_transforms(mask_keys="mask", spacing=(1.0, 1.0, 1.0))(
        {"image": image, "mask": mask}
    )
    out = pipeline({"image": image, "mask": mask})
    kept = (full["mask"][0] > 0).any(dim=0).any(dim=-1)  # slices along axis 1 with mask voxels
    assert torch.equal(out["image"][:, :, kept], full["image"][:, :, kept])
    assert bool((out["image"][:, :, ~kept] == 0).all())
    assert torch.allclose(out["image"].affine, full["image"].affine)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="normalise"):
        volume_loading_transforms(normalise="minmax")
    with pytest.raises(ValueError, match="normalise_mask_key"):
        volume_loading_transforms(normalise_mask_key="brain")


def test_slice_loading_keeps_aspect_pads_with_zero_and_greys_rgb(tmp_path: Path) -> None:
    from PIL import Image

    from transforms import Greyscaled, slice_loading_transforms

    img = np.zeros((40, 20), np.float32)
    img[:, :] = 50.0
    img[10:20, 5:15] = 200.0
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "s.nii.gz")
    raw = slice_loading_transforms(image_size=32, normalise=False)({"image": str(tmp_path / "s.nii.gz")})[
        "image"
    ]
    assert raw.shape == (1, 32, 32) and isinstance(raw, torch.Tensor)
    # longest side 40 -> 32, the other 20 -> 16, centred: 8 zero columns either side, raw intensities kept
    assert float(raw[0, :, :8].abs().max()) == 0.0 and float(raw[0, :, 24:].abs().max()) == 0.0
    assert float(raw[0, 2:6, 10:22].mean()) == pytest.approx(50.0, abs=1.0) and float(raw.max()) > 150
    norm = slice_loading_transforms(image_size=32)({"image": str(tmp_path / "s.nii.gz")})["image"]
    assert float(norm.min()) == 0.0 and float(norm.max()) == 1.0
    # an RGB PNG of a grey picture: one channel equal to the grey values
    grey = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "rgb.png")
    out = slice_loading_transforms(image_size=64, normalise=False)({"image": str(tmp_path / "rgb.png")})[
        "image"
    ]
    assert out.shape == (1, 64, 64) and sorted(np.unique(out.numpy().round()).tolist()) == list(range(251))
    assert Greyscaled("image")({"image": torch.ones(1, 4, 4)})["image"].shape == (1, 4, 4)
    # a volume is not a slice: the error names the file
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(InputDataError, match=r"v\.nii\.gz"):
        slice_loading_transforms()({"image": str(tmp_path / "v.nii.gz")})
    with pytest.raises(ValueError, match="image_size"):
        slice_loading_transforms(image_size=4)
