"""The bad-input catalogue (issue 8): faulty files built from good demo inputs, shared by the bundle tests.

Each builder writes one faulty input under a folder and returns it with a fragment of the fault the error
must state. Volume kinds (:func:`bad_volumes`) feed the 3D inference of anoddpm_simplex,
ddim_classifier_guidance and latent_robust_classifier; view kinds (:func:`bad_views`) feed the 2D views of
diffusion_mae studies. :data:`PLANTED` are patient identifiers written into a DICOM series
(:func:`planted_dicom`) that must never reach any output.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

#: identifier tag → planted value; the values are unusual enough that any occurrence is a leak
PLANTED: dict[str, str] = {
    "PatientName": "Zyxwarble^Quentaline",
    "PatientID": "PIDQX7781236",
    "PatientBirthDate": "19370419",
    "AccessionNumber": "ACCQX99017",
    "InstitutionName": "Quorvale Planted Infirmary",
}


def planted_values() -> list[str]:
    """The planted identifier strings, plus the name's parts (a writer may split ``Family^Given``)."""
    values = list(PLANTED.values())
    values += PLANTED["PatientName"].split("^")
    return values


def _nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), path)
    return path


def _copy_series(src: Path, dst: Path) -> list[Path]:
    shutil.copytree(src, dst)
    return sorted(p for p in dst.iterdir() if p.suffix == ".dcm")


def planted_dicom(src_series: Path, dst: Path) -> Path:
    """A copy of a DICOM series with :data:`PLANTED` identifiers written into every slice.

    Args:
        src_series: a good series folder.
        dst: the folder to create.

    Returns:
        ``dst``.
    """
    for f in _copy_series(src_series, dst):
        ds = pydicom.dcmread(f)
        for tag, value in PLANTED.items():
            setattr(ds, tag, value)
        ds.save_as(f)
    return dst


def _file_and_voxel_faults(
    good: Path, out: Path
) -> tuple[dict[str, tuple[Path, str]], np.ndarray, np.ndarray]:
    """The kinds any image input can have (2D or 3D), built from a good NIfTI file.

    Returns:
        kind → (faulty file, fault fragment), and the good file's array and affine.
    """
    out.mkdir(parents=True, exist_ok=True)
    img = nib.load(good)
    arr = np.squeeze(np.asarray(img.dataobj, dtype=np.float32))
    aff = img.affine
    cases: dict[str, tuple[Path, str]] = {}
    p = out / "unreadable.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a NIfTI header " * 40))
    cases["unreadable_nifti"] = (p, "cannot be read")
    p = out / "truncated.nii.gz"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    cases["truncated_nifti"] = (p, "cannot be read")
    a = arr.copy()
    a[tuple(s // 2 for s in a.shape)] = np.nan
    cases["nan_voxels"] = (_nifti(out / "nan.nii.gz", a, aff), "nan")
    a = arr.copy()
    a[(0,) * a.ndim] = np.inf
    cases["inf_voxels"] = (_nifti(out / "inf.nii.gz", a, aff), "inf")
    cases["all_zero"] = (_nifti(out / "zeros.nii.gz", np.zeros_like(arr), aff), "constant")
    cases["constant"] = (_nifti(out / "constant.nii.gz", np.full_like(arr, 250.0), aff), "constant")
    # CT in Hounsfield units: air -1024 .. bone 3071, what a CT export fed to an MRI bundle looks like
    lo, hi = float(arr.min()), float(arr.max())
    ct = -1024.0 + (arr - lo) / max(hi - lo, 1e-6) * 4095.0
    cases["ct_hounsfield"] = (_nifti(out / "ct_hu.nii.gz", ct, aff), "hounsfield")
    cases["missing_file"] = (out / "not_there.nii.gz", "does not exist")
    return cases, arr, aff


def bad_volumes(good_nifti: Path, good_series: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """Faulty 3D inputs built from a good NIfTI volume and a good DICOM series.

    Args:
        good_nifti: a good 3D NIfTI volume.
        good_series: a good DICOM series folder.
        out: folder to write into (created).

    Returns:
        kind → (faulty input, a lower-case fragment the error message must contain).
    """
    cases, arr, aff = _file_and_voxel_faults(good_nifti, out)
    cases["2d_where_3d"] = (_nifti(out / "flat2d.nii.gz", arr[:, :, arr.shape[2] // 2], aff), "2d")
    cases["4d_where_3d"] = (_nifti(out / "series4d.nii.gz", np.stack([arr, arr], -1), aff), "4d")

    d = out / "dicom_no_pixels"
    files = _copy_series(good_series, d)
    ds = pydicom.dcmread(files[len(files) // 2])
    del ds.PixelData
    ds.save_as(files[len(files) // 2])
    cases["dicom_without_pixel_data"] = (d, "no pixel data")

    d = out / "dicom_missing_slice"
    files = _copy_series(good_series, d)
    files[len(files) // 2].unlink()
    cases["dicom_missing_slice"] = (d, "missing slice")

    d = out / "dicom_duplicated_slice"
    files = _copy_series(good_series, d)
    ds = pydicom.dcmread(files[len(files) // 2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(d / "IM_copy.dcm")
    cases["dicom_duplicated_slice"] = (d, "duplicated slice")

    d = out / "dicom_mixed_orientation"
    files = _copy_series(good_series, d)
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # a sagittal slice in an axial series
    ds.save_as(files[1])
    cases["dicom_mixed_orientation"] = (d, "mixed orientations")
    return cases


def bad_views(good_view: Path, out: Path) -> dict[str, tuple[Path, str]]:
    """Faulty 2D views (diffusion_mae studies) built from a good 2D NIfTI view.

    Args:
        good_view: a good 2D view (NIfTI).
        out: folder to write into (created).

    Returns:
        kind → (faulty view, a lower-case fragment the error message must contain).
    """
    cases, arr, aff = _file_and_voxel_faults(good_view, out)
    cases["3d_where_2d"] = (_nifti(out / "volume3d.nii.gz", np.stack([arr] * 4, -1), aff), "3d")
    cases["4d_where_2d"] = (
        _nifti(out / "series4d.nii.gz", np.stack([arr] * 4, -1)[..., None].repeat(2, -1), aff),
        "4d",
    )
    from pydicom.data import get_testdata_file

    p = out / "no_pixels.dcm"
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(p)
    cases["dicom_without_pixel_data"] = (p, "cannot be read")
    return cases


def _texts_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out = [data]
    if path.name.endswith(".gz"):
        try:
            out.append(gzip.decompress(data))  # NIfTI headers live inside the compressed stream
        except OSError:
            pass
    return out


def find_identifiers(roots: list[Path], texts: list[str] = ()) -> list[str]:
    """Every place a planted identifier occurs: file names, file contents (decompressed too), given texts.

    Args:
        roots: files or folders to scan recursively (outputs, MLflow stores and artifact folders).
        texts: captured logs (stdout, stderr).

    Returns:
        ``"<where>: <value>"`` for each occurrence; empty when nothing leaked.
    """
    values = planted_values()
    needles = {v: {v.encode(), v.upper().encode(), v.lower().encode()} for v in values}
    hits: list[str] = []
    files: list[Path] = []
    for root in roots:
        files += [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            hits += [f"name {p}: {v}" for v in values if v.lower() in p.name.lower()]
    for f in files:
        for blob in _texts_of(f):
            hits += [f"{f}: {v}" for v, forms in needles.items() if any(n in blob for n in forms)]
    for i, t in enumerate(texts):
        hits += [f"log {i}: {v}" for v in values if v.lower() in t.lower()]
    return sorted(set(hits))


def check_failure_report(report: Path, cases: dict[str, tuple[Path, str]], n_inputs: int) -> dict[str, str]:
    """Assert that a batch's ``failures.json`` names every faulty input with its fault.

    Args:
        report: the ``failures.json`` a batch inference wrote.
        cases: kind → (faulty input, fault fragment), as built by :func:`bad_volumes` / :func:`bad_views`.
        n_inputs: how many inputs the batch had.

    Returns:
        kind → the reported error line.

    Raises:
        AssertionError: a kind missing from the report, an error not naming its file or not stating its fault.
    """
    import json

    body = json.loads(report.read_text())
    assert body["n_inputs"] == n_inputs and body["n_failed"] == len(cases), body
    errors = [f["error"] for f in body["failures"]]
    found: dict[str, str] = {}
    for kind, (path, fragment) in cases.items():
        # the error names the faulty file: the input itself, or the slice file inside a DICOM folder
        mine = [e for e in errors if f"/{path.name}" in e]
        assert len(mine) == 1, (kind, path, errors)
        assert fragment in mine[0].lower(), (kind, fragment, mine[0])
        found[kind] = mine[0]
    return found
