"""DICOM series I/O: write a NIfTI-style volume as an anonymous MR series, read a series back checked.

Conventions (the source of most DICOM geometry bugs, so spelled out once):

* A volume here is a ``(X, Y, Z)`` array with a 4x4 **RAS** affine, exactly as nibabel (and MONAI's
  ``NibabelReader``) give it: voxel ``(i, j, k)`` sits at ``affine @ (i, j, k, 1)`` in RAS millimetres.
* DICOM patient coordinates are **LPS**: ``lps = diag(-1, -1, 1) @ ras``. So the LPS affine is the RAS
  affine with its first two rows negated.
* A DICOM slice is a 2D pixel array indexed ``(row, column)``. ``ImageOrientationPatient`` holds the
  *row* direction cosine (the way the **column index** grows along a row) followed by the *column*
  direction cosine (the way the **row index** grows down a column); ``PixelSpacing`` is
  ``[spacing between rows, spacing between columns]``. Pixel ``(r, c)`` sits at
  ``ImagePositionPatient + c * PixelSpacing[1] * row_cosine + r * PixelSpacing[0] * col_cosine``.

:func:`write_dicom_series` maps array axis ``i`` to the DICOM column index and axis ``j`` to the row
index, so slice ``k`` stores ``volume[:, :, k].T`` (shape ``(Rows, Columns) = (Y, X)``), with
``row_cosine = e_i / |e_i|``, ``col_cosine = e_j / |e_j|``, ``PixelSpacing = [|e_j|, |e_i|]`` and
``ImagePositionPatient = o + k * e_k`` (``e_*`` and ``o`` the columns of the LPS affine). This is the
layout MONAI's ``PydicomReader`` undoes (it stacks slices by ``InstanceNumber``, swaps the first two axes
and flips LPS to RAS), and that SimpleITK reads after sorting the slices along the slice normal.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from data_prep.atomic import atomic_path
from transforms.errors import InputDataError

__all__ = [
    "check_dicom_series",
    "dicom_to_nifti",
    "image_suffix",
    "read_dicom_series",
    "write_dicom_series",
    "write_image_atomic",
]

#: SOP classes written per modality (both carry the Image Plane module the geometry needs)
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}
#: Media Storage Directory Storage (a DICOMDIR): skipped when scanning a folder
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: largest stored value used when quantising float data to int16 with a slope (headroom for DS rounding)
_QMAX = 32000
#: |cosine| above which two directions count as non-orthogonal / orientations as different
_ORTHO_TOL = 1e-4
#: a gap between neighbouring slices larger than this times the median spacing is a missing slice
_GAP_FACTOR = 1.5


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A float as a valid DICOM Decimal String (at most 16 characters)."""
    return format_number_as_ds(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0


def _quantise(volume: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
    """Stored 16-bit integers plus the (slope, intercept) that map them back to ``volume``.

    Integer-valued data that fits ``int16`` / ``uint16`` is stored as is (slope 1, intercept 0), so label
    maps and CT numbers round-trip exactly. Other float data (``rescale=True``) is stored as ``int16``
    spanning +-``_QMAX`` around the data mid-range; the slope and intercept are the values *as written*
    (parsed back from their Decimal String), so the read-back error is at most ``slope / 2``.
    """
    vol = np.asarray(volume)
    if vol.dtype == bool:
        vol = vol.astype(np.uint8)
    if not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise ValueError(f"volume must be real numeric, got dtype {vol.dtype}")
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values, which DICOM cannot store")
    lo, hi = (float(vol.min()), float(vol.max())) if vol.size else (0.0, 0.0)
    integral = np.issubdtype(vol.dtype, np.integer) or bool(np.all(vol == np.round(vol)))
    if integral or not rescale:
        rounded = np.round(vol) if not np.issubdtype(vol.dtype, np.integer) else vol
        for dtype in (np.int16, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return rounded.astype(dtype), 1.0, 0.0
        if not rescale:
            raise ValueError(
                f"values span [{lo}, {hi}], beyond 16-bit integers; use rescale=True to store them with a slope"
            )
    intercept = float(_ds((hi + lo) / 2.0))
    half = max(hi - intercept, intercept - lo)
    slope = float(_ds(half / _QMAX)) if half > 0 else 1.0
    if slope == 0.0:  # a range so small that the slope rounds to zero in 16 characters
        slope = float(_ds(np.finfo(np.float64).tiny * 1e10))
    stored = np.clip(np.round((vol.astype(np.float64) - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept


def _uid(uid_seed: int | None, *parts: object) -> str:
    """A UID: random when ``uid_seed`` is None, else a deterministic hash of the seed and ``parts``."""
    if uid_seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(uid_seed), *(str(p) for p in parts)])


def _lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns ``e_i, e_j, e_k`` and origin of the LPS affine for a RAS ``affine``; checks orthogonality."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # RAS -> LPS: negate the first two rows
    e_i, e_j, e_k, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    norms = [float(np.linalg.norm(v)) for v in (e_i, e_j, e_k)]
    if min(norms) <= 0:
        raise ValueError(f"affine has a zero-length axis: {aff[:3, :3].tolist()}")
    u = [v / n for v, n in zip((e_i, e_j, e_k), norms, strict=True)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(float(u[a] @ u[b])) > _ORTHO_TOL:
            raise ValueError(
                "affine axes are not orthogonal (sheared or tilted grid); a DICOM series of parallel "
                f"slices cannot represent it exactly: {aff[:3, :3].tolist()}"
            )
    return e_i, e_j, e_k, origin


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    series_description: str = "",
    modality: str = "MR",
    rescale: bool = True,
    uid_seed: int | None = None,
    patient_id: str = "anon",
) -> list[Path]:
    """Write a 3D volume as an anonymous DICOM series, one file per slice along the third array axis.

    The files are written with pydicom rather than SimpleITK's ``ImageSeriesWriter``: the writer then
    controls every geometry tag directly (SimpleITK writes per-slice ``ImagePositionPatient`` only when the
    caller sets it slice by slice, and stores float data without the slope/intercept quantisation
    needed here), and the output is a plain single-frame series that both SimpleITK/GDCM and MONAI's
    ``PydicomReader`` read back. See the module docstring for the axis and LPS/RAS conventions.

    The series is written into a temporary sibling folder and renamed into place, so ``out_dir`` either
    holds the complete series or nothing. Only placeholder patient data is written (PatientName
    ``ANONYMOUS``, PatientID ``patient_id``, no dates, names or institutions).

    Args:
        volume: ``(X, Y, Z)`` array (e.g. ``nibabel.load(f).get_fdata()``). Integer-valued data within
            16-bit range is stored exactly; other data needs ``rescale=True``.
        affine: 4x4 RAS voxel-to-world affine (nibabel convention); its axes must be orthogonal.
        out_dir: folder to create (or an existing empty folder).
        series_description: SeriesDescription; also enters the SeriesInstanceUID hash.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
        rescale: store non-integer data as ``int16`` with RescaleSlope/RescaleIntercept (values come back
            within ``slope / 2``); when False such data is rounded to integers.
        uid_seed: when given, Study/Series/SOP/FrameOfReference UIDs are derived deterministically from
            it (``generate_uid(entropy_srcs=...)``); when None they are random.
        patient_id: pseudonymous PatientID to write (never a real identifier).

    Returns:
        The slice files, in slice order (``InstanceNumber`` 1..Z).

    Raises:
        ValueError: the volume is not 3D or not finite, the affine is not an orthogonal 4x4 matrix, the
            modality is unsupported, or values do not fit 16 bits with ``rescale=False``.
        FileExistsError: ``out_dir`` exists and is not an empty folder.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"volume must be a non-empty 3D (X, Y, Z) array, got shape {vol.shape}")
    nx, ny, nz = vol.shape
    if max(nx, ny) > 65535:
        raise ValueError(f"in-plane size {nx}x{ny} exceeds DICOM's 16-bit Rows/Columns")
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    e_i, e_j, e_k, origin = _lps_geometry(affine)
    stored, slope, intercept = _quantise(vol, rescale)

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    di, dj, dk = (float(np.linalg.norm(v)) for v in (e_i, e_j, e_k))
    row_cos, col_cos = e_i / di, e_j / dj
    normal = np.cross(row_cos, col_cos)
    iop = [_ds(v) for v in (*row_cos, *col_cos)]
    pixel_spacing = [_ds(dj), _ds(di)]  # [between rows (along j), between columns (along i)]
    signed = stored.dtype == np.int16

    study_uid = _uid(uid_seed, "study", patient_id)
    series_uid = _uid(uid_seed, "series", patient_id, series_description)
    frame_uid = _uid(uid_seed, "frame-of-reference", patient_id)
    sop_class = _SOP_CLASS[modality]

    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    names = []
    try:
        for k in range(nz):
            meta = FileMetaDataset()
            meta.FileMetaInformationVersion = b"\x00\x01"
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = _uid(uid_seed, "sop", series_uid, k)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

            name = f"IM{k + 1:05d}.dcm"
            ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.Modality = modality
            # patient / study: anonymous placeholders only
            ds.PatientName = "ANONYMOUS"
            ds.PatientID = str(patient_id)
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.PatientIdentityRemoved = "YES"
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = ""
            ds.StudyTime = ""
            ds.StudyID = ""
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.Manufacturer = ""
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1
            ds.SeriesDescription = series_description
            ds.InstanceNumber = k + 1
            if modality == "MR":
                ds.ScanningSequence = "RM"  # research mode: no acquisition is claimed
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""
                ds.MRAcquisitionType = ""
            # geometry (Frame of Reference + Image Plane modules)
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            position = origin + k * e_k
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = iop
            ds.PixelSpacing = pixel_spacing
            ds.SliceThickness = _ds(dk)
            ds.SpacingBetweenSlices = _ds(dk)
            ds.SliceLocation = _ds(float(position @ normal))
            # pixels: (Rows, Columns) = (Y, X), little endian
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ny
            ds.Columns = nx
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            if modality == "CT":
                ds.RescaleType = "HU" if (slope, intercept) == (1.0, 0.0) else "US"
            plane = np.ascontiguousarray(stored[:, :, k].T)
            ds.PixelData = plane.astype("<i2" if signed else "<u2").tobytes()
            ds.save_as(tmp_dir / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace cannot replace a folder on every OS
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The first informative line of an exception message (SimpleITK's are multi-line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR:" in ln:
            return ln.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(err).__name__


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of native (uncompressed) pixel data the header promises."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    bits = int(ds.BitsAllocated)
    return (n + 7) // 8 if bits == 1 else n * ((bits + 7) // 8)


def _check_pixel_data(ds: pydicom.Dataset, path: Path) -> None:
    """InputDataError naming ``path`` when the file has no (or truncated) pixel data."""
    if "PixelData" not in ds or ds.PixelData is None or len(ds.PixelData) == 0:
        raise InputDataError("DICOM file has no pixel data", path)
    for tag in ("Rows", "Columns", "BitsAllocated"):
        if tag not in ds:
            raise InputDataError(f"DICOM image lacks {tag}", path)
    ts = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    if not pydicom.uid.UID(ts).is_compressed:
        have, want = len(ds.PixelData), _expected_pixel_bytes(ds)
        if have < want:
            raise InputDataError(f"truncated pixel data ({have} of {want} bytes)", path)


def _scan_folder(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """DICOM image files directly in ``folder`` (headers only), grouped by SeriesInstanceUID."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # not DICOM (README, .json side car, ...)
        except Exception as err:
            raise InputDataError(f"unreadable DICOM header ({_one_line(err)})", path) from err
        if str(ds.get("SOPClassUID", "")) == _DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            continue
        series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    return series


def _sorted_slices(folder: Path, items: list[tuple[Path, pydicom.Dataset]]) -> list[Path]:
    """Check one series' geometry and return its files sorted along the slice normal."""
    iops, positions = [], []
    for path, ds in items:
        for tag, vm in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3)):
            if tag not in ds or ds.data_element(tag).VM != vm:
                raise InputDataError(f"missing or malformed {tag}", path)
        iops.append(np.asarray([float(v) for v in ds.ImageOrientationPatient]))
        positions.append(np.asarray([float(v) for v in ds.ImagePositionPatient]))
    sizes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for _, ds in items)
    if len(sizes) > 1:
        raise InputDataError(f"mixed slice sizes (rows, columns) {dict(sizes)}", folder)
    iop0 = iops[0]
    odd = [
        p.name
        for (p, _), iop in zip(items, iops, strict=True)
        if np.max(np.abs(iop - iop0)) > _ORTHO_TOL * 10
    ]
    if odd:
        raise InputDataError(
            f"mixed orientations: {len(odd)} of {len(items)} slices differ from {items[0][0].name} "
            f"(e.g. {', '.join(odd[:3])})",
            folder,
        )
    normal = np.cross(iop0[:3], iop0[3:])
    dist = np.asarray([float(p @ normal) for p in positions])
    order = np.argsort(dist, kind="stable")
    dist, files = dist[order], [items[i][0] for i in order]
    if len(files) > 1:
        gaps = np.diff(dist)
        positive = gaps[gaps > 1e-4]
        scale = float(np.median(positive)) if positive.size else 0.0
        dup = np.flatnonzero(gaps <= max(1e-4, 1e-3 * scale))
        if dup.size:
            i = int(dup[0])
            raise InputDataError(
                f"duplicated slice position {dist[i]:.4g} mm ({files[i].name}, {files[i + 1].name}; "
                f"{dup.size} duplicate(s) in all)",
                folder,
            )
        big = np.flatnonzero(gaps > _GAP_FACTOR * float(np.median(gaps)))
        if big.size:
            i = int(big[0])
            raise InputDataError(
                f"missing slice(s): gap of {gaps[i]:.4g} mm between {files[i].name} and {files[i + 1].name} "
                f"(median spacing {np.median(gaps):.4g} mm; {big.size} gap(s) in all)",
                folder,
            )
    return files


def check_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> list[Path]:
    """Check that a folder holds one complete, consistent DICOM series; return its slices in order.

    The folder's files (not sub-folders) are scanned with pydicom; non-DICOM files and a DICOMDIR are
    ignored. The selected series' slices must share one orientation and size, sit at distinct positions
    along the slice normal, and have no gap larger than 1.5 times the median slice spacing; every slice
    must carry complete pixel data. Used before any reader (SimpleITK here, MONAI's ``PydicomReader`` in
    the bundles' loading transforms), neither of which notices a missing or duplicated slice.

    Args:
        folder: folder holding the series.
        series_uid: SeriesInstanceUID to check when the folder holds several series.

    Returns:
        The slice files sorted along the slice normal.

    Raises:
        InputDataError: naming the folder when it is missing, holds no DICOM images, holds several series
            and none was chosen (or the chosen one is absent), or has missing / duplicated slices, mixed
            orientations or sizes; naming the file when a slice has no or truncated pixel data or lacks its
            position/orientation.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputDataError("not a folder" if folder.exists() else "no such folder", folder)
    series = _scan_folder(folder)
    if not series:
        raise InputDataError("no DICOM files", folder)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(
                f"{uid or '<no SeriesInstanceUID>'} ({len(items)} files, "
                f"{str(items[0][1].get('SeriesDescription', '')) or 'no description'!r})"
                for uid, items in sorted(series.items(), key=lambda kv: -len(kv[1]))
            )
            raise InputDataError(
                f"{len(series)} series in one folder, choose one with series_uid: {listing}", folder
            )
        items = next(iter(series.values()))
    elif series_uid in series:
        items = series[series_uid]
    else:
        raise InputDataError(f"no series {series_uid} (found {', '.join(sorted(series))})", folder)

    for path, _ in items:  # full read of each slice: catches missing and truncated pixel data
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:
            raise InputDataError(f"unreadable DICOM file ({_one_line(err)})", path) from err
        _check_pixel_data(ds, path)
    return _sorted_slices(folder, items)


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series from a folder with SimpleITK, after checking it is complete and consistent.

    The folder's files (not sub-folders) are scanned with pydicom; non-DICOM files and a DICOMDIR are
    ignored. The selected series' slices must share one orientation and size, sit at distinct positions
    along the slice normal, and have no gap larger than 1.5 times the median slice spacing; every slice
    must carry complete pixel data. The slices are then read by ``SimpleITK.ImageSeriesReader`` in
    order along the normal (as GDCM sorts them), so the image's direction, spacing and origin are the
    series' LPS geometry.

    Args:
        folder: folder holding the series.
        series_uid: SeriesInstanceUID to read when the folder holds several series.

    Returns:
        The 3D image (rescale slope/intercept applied by GDCM).

    Raises:
        InputDataError: naming the folder when it is missing, holds no DICOM images, holds several series
            and none was chosen (or the chosen one is absent), or has missing / duplicated slices, mixed
            orientations or sizes, or SimpleITK fails to read it; naming the file when a slice has no or
            truncated pixel data or lacks its position/orientation.
    """
    folder = Path(folder)
    files = check_dicom_series(folder, series_uid)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([os.fspath(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise InputDataError(f"SimpleITK cannot read the series ({_one_line(err)})", folder) from err


# ----------------------------------------------------------------------------------------------------
# NIfTI output
# ----------------------------------------------------------------------------------------------------


def image_suffix(path: str | os.PathLike) -> str:
    """The image-format extension of ``path``, double ones included (``.nii.gz``, ``.nrrd``, ...)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".img.gz", ".hdr.gz"):
        if name.endswith(double):
            return double
    return Path(path).suffix


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write an image through a temporary file in the same folder and an atomic rename.

    The temporary file keeps the destination's extension (``.tmp.nii.gz`` for ``x.nii.gz``) so SimpleITK
    picks the same writer; a crash mid-write leaves at most that hidden temporary file, removed on any
    exception, and never a half-written ``path``.

    Args:
        image: image to write.
        path: destination; its extension chooses the format.
        compress: ask SimpleITK to compress (ignored by formats without compression).

    Returns:
        The destination as a ``Path``.
    """
    path = Path(path)
    with atomic_path(path, image_suffix(path)) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def dicom_to_nifti(
    folder: str | os.PathLike, out_path: str | os.PathLike, series_uid: str | None = None
) -> Path:
    """Convert a DICOM series folder to a NIfTI file (SimpleITK writes the RAS qform/sform).

    Args:
        folder: series folder (see :func:`read_dicom_series`).
        out_path: ``.nii`` / ``.nii.gz`` destination, written atomically.
        series_uid: series to convert when the folder holds several.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        InputDataError: as :func:`read_dicom_series`.
    """
    return write_image_atomic(read_dicom_series(folder, series_uid), out_path)
