"""VolumeToSlices / SlicesToVolume: exact round trips, metadata, foreground filter, errors."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged, Orientationd, Spacing

from transforms import (
    SLICE_META_KEYS,
    InputDataError,
    SlicesToVolume,
    SlicesToVolumed,
    VolumeToSlices,
    VolumeToSlicesd,
    slice_affine_2d,
    slice_affine_3d,
)

SHAPE = (5, 6, 7)
# MONAI's LoadImage registers every reader, and the GPU DICOM one warns on CPU-only machines
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = (k for k in range(3) if k != axis)
    m = np.eye(3)
    m[i, i] = m[j, j] = c
    m[i, j], m[j, i] = -s, s
    return m


def _affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    spacing = np.diag([1.5, 2.0, 2.5])
    if kind == "ras":
        a[:3, :3] = spacing
    elif kind == "lps":
        a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ spacing
    elif kind == "oblique":
        a[:3, :3] = _rotation(2, 30) @ _rotation(0, 20) @ spacing
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _load(path: str, orient: bool) -> MetaTensor:
    xforms = [LoadImaged("image"), EnsureChannelFirstd("image")]
    if orient:
        xforms.append(Orientationd("image", axcodes="RAS", labels=None))
    return Compose(xforms)({"image": path})["image"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("slicing")
    data = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    return {kind: _write(root / f"{kind}.nii.gz", data, _affine(kind)) for kind in ("ras", "lps", "oblique")}


@pytest.mark.parametrize("orient", [False, True], ids=["as-written", "orientation-ras"])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_round_trip_is_exact(volumes: dict[str, str], kind: str, axis: int, orient: bool) -> None:
    img = _load(volumes[kind], orient)
    if not orient:
        assert np.allclose(img.affine.numpy(), _affine(kind))  # the loaded affine is the written one
    slices = VolumeToSlices(axis=axis)(img)
    assert len(slices) == img.shape[axis + 1]
    in_plane = tuple(s for i, s in enumerate(img.shape[1:]) if i != axis)
    assert all(tuple(s.shape) == (1, *in_plane) for s in slices)

    vol = SlicesToVolume()(slices)  # geometry read back from the slices' metadata
    assert isinstance(vol, MetaTensor)
    assert vol.shape == img.shape
    assert torch.equal(vol.as_tensor(), img.as_tensor())
    assert torch.allclose(vol.affine, img.affine.to(torch.float64))
    assert vol.meta["filename_or_obj"] == volumes[kind]
    assert not set(SLICE_META_KEYS) & set(vol.meta)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_metadata(volumes: dict[str, str], axis: int) -> None:
    img = _load(volumes["oblique"], orient=False)
    slices = VolumeToSlices(axis=axis)(img)
    for i, s in enumerate(slices):
        assert s.meta["slice_index"] == i
        assert s.meta["slice_axis"] == axis
        assert tuple(s.meta["source_shape"]) == SHAPE
        assert torch.allclose(torch.as_tensor(s.meta["source_affine"]), img.affine.to(torch.float64))
        assert s.meta["filename_or_obj"] == volumes["oblique"]
        assert torch.equal(s.as_tensor(), img.as_tensor().select(axis + 1, i))
    # slices own their memory, so dropping the volume frees it
    assert slices[0].untyped_storage().nbytes() < img.untyped_storage().nbytes()


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_slice_affines_locate_the_voxels(kind: str, axis: int) -> None:
    a = torch.as_tensor(_affine(kind))
    index = 3
    e = slice_affine_3d(a, axis, index)
    hw = torch.tensor([[0, 0], [2, 1], [4, 5]], dtype=torch.float64)
    for h, w in hw:
        voxel = torch.zeros(4, dtype=torch.float64)
        voxel[[i for i in range(3) if i != axis]] = torch.stack([h, w])
        voxel[axis], voxel[3] = index, 1.0
        assert torch.allclose(e @ torch.tensor([h, w, 0.0, 1.0], dtype=torch.float64), a @ voxel)

    aff2 = slice_affine_2d(a, axis, index)
    assert aff2.shape == (3, 3) and abs(float(torch.linalg.det(aff2))) > 0
    true_cols = e[:3, :2]
    # pixel spacing and the angle between the pixel axes are the true in-plane ones
    assert torch.allclose(aff2[:2, :2].T @ aff2[:2, :2], true_cols.T @ true_cols)
    if kind != "oblique":  # axis-aligned: exactly the two world rows the plane spans
        rows = [r for r in range(3) if bool(true_cols[r].abs().sum() > 0)]
        assert torch.equal(aff2[:2, :2], true_cols[rows])
        assert torch.equal(aff2[:2, 2], e[rows, 3])


def test_sagittal_slice_works_with_monai_2d_spacing(volumes: dict[str, str]) -> None:
    img = _load(volumes["ras"], orient=True)
    s = VolumeToSlices(axis=0)(img)[2]
    assert torch.allclose(s.pixdim, torch.tensor([2.0, 2.5], dtype=torch.float64))
    out = Spacing(pixdim=(1.0, 1.0))(s)
    assert torch.allclose(out.pixdim, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert out.shape[1:] == (11, 16)  # 6 pixels at 2 mm and 7 at 2.5 mm, resampled to 1 mm


def _stripes() -> MetaTensor:
    """(1, 8, 6, 10) volume: slice z=3 has one bright voxel, z=4..6 are full, z=7 is dim (0.5)."""
    v = torch.zeros(1, 8, 6, 10)
    v[0, 0, 0, 3] = 5.0
    v[0, :, :, 4:7] = torch.arange(3, dtype=torch.float32) + 1.0
    v[0, :, :, 7] = 0.5
    return MetaTensor(
        v, affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])), meta={"filename_or_obj": "stripes.nii"}
    )


def test_foreground_filter_keeps_expected_slices_and_stacking_refills() -> None:
    vol = _stripes()
    assert [s.meta["slice_index"] for s in VolumeToSlices(axis=2)(vol)] == list(range(10))
    kept = VolumeToSlices(axis=2, min_foreground=0.1)(vol)
    assert [s.meta["slice_index"] for s in kept] == [4, 5, 6, 7]
    kept = VolumeToSlices(axis=2, min_foreground=0.1, foreground_threshold=0.75)(vol)
    assert [s.meta["slice_index"] for s in kept] == [4, 5, 6]
    kept = VolumeToSlices(axis=2, min_foreground=1e-3, foreground_threshold=0.75)(vol)
    assert [s.meta["slice_index"] for s in kept] == [3, 4, 5, 6]

    restored = SlicesToVolume(fill_value=-1.0)(
        VolumeToSlices(axis=2, min_foreground=0.1, foreground_threshold=0.75)(vol)
    )
    assert restored.shape == vol.shape
    assert torch.equal(restored[..., 4:7], vol[..., 4:7])
    dropped = [0, 1, 2, 3, 7, 8, 9]
    assert bool((restored[..., dropped] == -1.0).all())


def test_foreground_from_separate_mask() -> None:
    vol = MetaTensor(torch.ones(1, 4, 4, 6))  # every slice bright: the mask must decide
    mask = torch.zeros(1, 4, 4, 6)
    mask[0, 1:3, 1:3, [1, 4]] = 1
    kept = VolumeToSlices(axis=2, min_foreground=0.2)(vol, mask)
    assert [s.meta["slice_index"] for s in kept] == [1, 4]
    with pytest.raises(InputDataError, match=r"mask\.nii: foreground mask spatial shape"):
        VolumeToSlices(axis=2, min_foreground=0.2)(
            vol, MetaTensor(torch.ones(1, 4, 4, 5), meta={"filename_or_obj": "mask.nii"})
        )


def _subject() -> dict:
    img = _stripes()
    label = MetaTensor((img > 1.5).to(torch.uint8), affine=img.affine, meta={"filename_or_obj": "label.nii"})
    brain = MetaTensor(torch.zeros_like(img), affine=img.affine, meta={"filename_or_obj": "brain.nii"})
    brain[0, :, :, 5:8] = 1.0
    return {"image": img, "label": label, "brain": brain, "subject": "s01", "info": {"site": "A"}}


def test_dict_slicing_uses_foreground_key_and_copies_the_rest() -> None:
    data = _subject()
    out = VolumeToSlicesd(["image", "label", "brain"], axis=2, min_foreground=0.5, foreground_key="brain")(
        data
    )
    assert [d["slice_index"] for d in out] == [5, 6, 7]
    for d in out:
        i = d["slice_index"]
        for key in ("image", "label", "brain"):
            assert d[key].meta["slice_index"] == i
            assert torch.equal(d[key].as_tensor(), data[key].as_tensor()[..., i])
        assert d["label"].dtype == torch.uint8
        assert d["label"].meta["filename_or_obj"] == "label.nii"
        assert d["subject"] == "s01" and d["info"] == {"site": "A"}
    out[0]["info"]["site"] = "B"  # copies, not shared references
    assert out[1]["info"]["site"] == "A" and data["info"]["site"] == "A"
    # default foreground key is the first key (the image)
    out = VolumeToSlicesd(["image", "label"], axis=2, min_foreground=0.1)(data)
    assert [d["slice_index"] for d in out] == [4, 5, 6, 7]


def test_dict_round_trip_through_compose() -> None:
    data = _subject()
    pipeline = Compose(
        [
            VolumeToSlicesd(["image", "label"], axis=2, min_foreground=0.1, foreground_threshold=0.75),
            Lambdad("image", lambda x: x * 2),  # applied to each slice dictionary by Compose
            SlicesToVolumed(["image", "label"], fill_value=(-1.0, 0)),
        ]
    )
    out = pipeline(data)
    assert isinstance(out, dict) and "slice_index" not in out
    assert out["subject"] == "s01"
    assert torch.equal(out["image"][..., 4:7], data["image"][..., 4:7] * 2)
    assert bool((out["image"][..., [0, 1, 2, 3, 7, 8, 9]] == -1.0).all())
    expected_label = data["label"].as_tensor().clone()
    expected_label[..., [3, 7]] = 0
    assert torch.equal(out["label"].as_tensor(), expected_label)
    assert out["label"].dtype == torch.uint8
    assert torch.allclose(out["label"].affine, data["label"].affine.to(torch.float64))


def test_stack_from_batched_tensor_with_explicit_geometry() -> None:
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    batch = vol.movedim(2, 0)[[3, 0]]  # slices 3 and 0 along axis 1, shape (2, C, X, Z)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    out = SlicesToVolume(source_shape=(3, 4, 5), source_affine=affine, axis=1, fill_value=7.0)(batch, [3, 0])
    assert torch.equal(out[:, :, [0, 3]], vol[:, :, [0, 3]])
    assert bool((out[:, :, [1, 2]] == 7.0).all())
    assert torch.allclose(out.affine, affine.to(torch.float64))


def test_stack_from_collated_batch_reads_per_slice_metadata() -> None:
    vol = _stripes()
    batch = list_data_collate(VolumeToSlices(axis=0)(vol))  # what a DataLoader hands to a 2D network
    assert batch.shape == (8, 1, 6, 10) and batch.is_batch
    out = SlicesToVolume()(batch * 3)
    assert torch.equal(out.as_tensor(), vol.as_tensor() * 3)
    assert torch.allclose(out.affine, vol.affine.to(torch.float64))
    dicts = list_data_collate(VolumeToSlicesd("image", axis=0)({"image": vol}))
    plain = dicts["image"].as_tensor()  # e.g. a network output: no metadata, so geometry must be given
    with pytest.raises(ValueError, match="slice_axis"):
        SlicesToVolume()(plain, dicts["slice_index"].tolist())
    out = SlicesToVolume(source_shape=(8, 6, 10), axis=0)(plain, dicts["slice_index"].tolist())
    assert torch.equal(out.as_tensor(), vol.as_tensor())


def test_stacking_errors_name_the_source_file() -> None:
    slices = VolumeToSlices(axis=2)(_stripes())
    with pytest.raises(InputDataError, match=r"stripes\.nii.*shape"):
        SlicesToVolume()([*slices[:3], MetaTensor(torch.zeros(1, 8, 5), meta=dict(slices[3].meta))])
    with pytest.raises(InputDataError, match=r"stripes\.nii.*out of range"):
        SlicesToVolume()(slices[:2], [0, 10])
    with pytest.raises(InputDataError, match=r"stripes\.nii.*index 1 is given more than once"):
        SlicesToVolume()(slices[:3], [0, 1, 1])
    with pytest.raises(ValueError, match="slice_index"):
        SlicesToVolume(source_shape=(8, 6, 10), axis=2)([torch.zeros(1, 8, 6)])


def test_non_volume_input_is_rejected_with_file_name() -> None:
    img = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "flat.nii"})
    with pytest.raises(InputDataError, match=r"flat\.nii.*\(C, X, Y, Z\)"):
        VolumeToSlices()(img)
    with pytest.raises(ValueError, match="axis"):
        VolumeToSlices(axis=3)
