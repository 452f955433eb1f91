"""SimpleITK preprocessing CLI: resampling, N4, DICOM conversion, errors and atomic outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import data_prep.dicom as dicom_mod
from data_prep.dicom import write_dicom_series
from data_prep.preprocess import BadArgumentError, main, n4_bias_correct, resample_image, run

REPO = Path(__file__).resolve().parents[2]


def _image(arr: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(-10.0, 5.0, 3.0)) -> sitk.Image:
    """``arr`` indexed (x, y, z) as a SimpleITK image with an oblique direction."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection([c, -s, 0, s, c, 0, 0, 0, 1])
    return img


def _extent_corner(img: sitk.Image) -> np.ndarray:
    return np.asarray(img.GetSize()) * np.asarray(img.GetSpacing())


def _ellipsoid(n: int = 32) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    c = (n - 1) / 2
    return ((x - c) / 13) ** 2 + ((y - c) / 11) ** 2 + ((z - c) / 9) ** 2 <= 1


def _cv(arr: np.ndarray, mask: np.ndarray) -> float:
    v = arr[mask]
    return float(v.std() / v.mean())


def test_resample_2mm_to_4mm_halves_shape_keeps_geometry(tmp_path):
    src = _image(np.random.default_rng(0).random((20, 16, 12)).astype(np.float32))
    sitk.WriteImage(src, tmp_path / "in.nii.gz")
    argv = ["resample", "--in", str(tmp_path / "in.nii.gz"), "--out", str(tmp_path / "out.nii.gz")]
    assert main([*argv, "--spacing", "4", "4", "4"]) == 0
    out = sitk.ReadImage(tmp_path / "out.nii.gz")
    assert out.GetSize() == (10, 8, 6)
    np.testing.assert_allclose(out.GetSpacing(), (4, 4, 4))
    np.testing.assert_allclose(_extent_corner(out), _extent_corner(src))
    np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), src.GetDirection(), atol=1e-5)
    assert out.GetPixelID() == sitk.sitkFloat32


def test_nearest_keeps_label_values(tmp_path):
    labels = np.random.default_rng(1).choice(np.array([0, 3, 7, 250], dtype=np.uint8), size=(15, 13, 11))
    lab = _image(labels)
    for spacing in ((3.0, 3.0, 3.0), (1.3, 1.3, 1.3)):
        out = resample_image(lab, spacing, interp="nearest")
        assert out.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 3, 7, 250}
    linear = resample_image(lab, (3.0, 3.0, 3.0), interp="linear")
    assert not set(np.unique(sitk.GetArrayFromImage(linear))) <= {0, 3, 7, 250}
    with pytest.raises(BadArgumentError, match="interp"):
        resample_image(lab, (3.0, 3.0, 3.0), interp="cubic")
    with pytest.raises(BadArgumentError, match="spacing"):
        resample_image(lab, (3.0, 3.0), interp="nearest")


def test_n4_flattens_a_bias_ramp(tmp_path):
    obj = _ellipsoid()
    ramp = np.linspace(0.6, 1.4, obj.shape[0])[:, None, None]  # smooth linear bias along x
    arr = (100.0 * obj * ramp).astype(np.float32)
    before = _cv(arr, obj)
    sitk.WriteImage(_image(arr), tmp_path / "biased.nii.gz")
    argv = ["n4", "--in", str(tmp_path / "biased.nii.gz"), "--out", str(tmp_path / "n4.nii.gz")]
    assert main([*argv, "--shrink", "2", "--iterations", "20", "20"]) == 0
    after = _cv(sitk.GetArrayFromImage(sitk.ReadImage(tmp_path / "n4.nii.gz")).transpose(2, 1, 0), obj)
    assert before > 0.1
    assert after <= 0.5 * before
    # an explicit mask gives the same kind of result, and a mask on another grid names the mask file
    mask = _image(obj.astype(np.uint8))
    corrected = n4_bias_correct(_image(arr), mask, shrink=2, iterations=(20, 20))
    assert _cv(sitk.GetArrayFromImage(corrected).transpose(2, 1, 0), obj) <= 0.5 * before
    sitk.WriteImage(_image(obj[:-2].astype(np.uint8)), tmp_path / "small_mask.nii.gz")
    assert main([*argv, "--mask", str(tmp_path / "small_mask.nii.gz")]) == 2


def test_run_on_dicom_folder_equals_convert(tmp_path):
    vol = np.random.default_rng(3).normal(50, 10, (12, 10, 8)).astype(np.float32)
    affine = np.diag([-1.2, 0.9, 2.5, 1.0])
    affine[:3, 3] = [4, -3, 2]
    write_dicom_series(vol, affine, tmp_path / "dcm", uid_seed=5)
    assert main(["convert", "--dicom", str(tmp_path / "dcm"), "--out", str(tmp_path / "convert.nii.gz")]) == 0
    assert main(["run", "--in", str(tmp_path / "dcm"), "--out", str(tmp_path / "run.nii.gz")]) == 0
    a, b = sitk.ReadImage(tmp_path / "convert.nii.gz"), sitk.ReadImage(tmp_path / "run.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)())
    # the full chain on the NIfTI: N4 then resampling
    out = run(
        tmp_path / "convert.nii.gz", tmp_path / "chain.nii.gz", n4=True, spacing=[2.4, 1.8, 5.0], shrink=2
    )
    assert sitk.ReadImage(out).GetSize() == (6, 5, 4)


def test_unreadable_input_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out.nii.gz"
    assert main(["resample", "--in", str(bad), "--out", str(out), "--spacing", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert main(["n4", "--in", str(tmp_path / "absent.nii.gz"), "--out", str(out)]) == 2
    assert "absent.nii.gz: no such file" in capsys.readouterr().err
    # through the real entry point: no traceback either
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.preprocess", "run", "--in", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_overwrite_the_input(tmp_path, capsys):
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(_image(np.ones((6, 5, 4), np.float32)), src)
    before = src.read_bytes()
    assert main(["resample", "--in", str(src), "--out", str(src), "--spacing", "1", "1", "1"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_failed_write_leaves_no_half_written_output(tmp_path, monkeypatch):
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(_image(np.ones((6, 5, 4), np.float32)), src)
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"previous complete output")
    real_write = sitk.WriteImage

    def crashing_write(image, path, *args):
        assert Path(path).name.endswith(".tmp.nii.gz") and Path(path).parent == tmp_path
        real_write(image, path, *args)
        with open(path, "r+b") as f:  # simulate a crash half-way through the write
            f.truncate(10)
        raise RuntimeError("disk full")

    monkeypatch.setattr(dicom_mod.sitk, "WriteImage", crashing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["resample", "--in", str(src), "--out", str(out), "--spacing", "1", "1", "1"])
    assert out.read_bytes() == b"previous complete output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "out.nii.gz"]


def test_n4_on_a_thin_slab_keeps_enough_voxels_per_axis() -> None:
    """Six slices shrunk by 4 would leave one: ITK then aborts on a zero-spacing B-spline domain."""
    from data_prep.preprocess import n4_bias_correct

    rng = np.random.default_rng(0)
    x = np.meshgrid(np.arange(6), np.arange(16), np.arange(16), indexing="ij")[2]
    arr = (100 + 50 * rng.random((6, 16, 16)) * (1 + x / 16)).astype(np.float32)  # a bias along x
    out = n4_bias_correct(sitk.GetImageFromArray(arr))
    res = sitk.GetArrayFromImage(out)
    assert res.shape == arr.shape and np.isfinite(res).all() and res.min() > 0
