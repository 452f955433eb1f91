"""SimpleITK preprocessing: DICOM -> NIfTI conversion, N4 bias-field correction and resampling.

Each step is a Python function on files (and one on ``SimpleITK.Image`` objects) and a sub-command of
the command line::

    python -m data_prep.preprocess convert --dicom SERIES_DIR --out t1.nii.gz
    python -m data_prep.preprocess n4 --in t1.nii.gz --out t1_n4.nii.gz [--mask brain.nii.gz]
    python -m data_prep.preprocess resample --in t1.nii.gz --out t1_1mm.nii.gz --spacing 1 1 1
    python -m data_prep.preprocess run --in SERIES_DIR_OR_FILE --out t1.nii.gz --n4 --spacing 1 1 1

Outputs are written atomically (a temporary file with the same extension in the destination folder,
then ``os.replace``), so a failure never leaves a half-written output, and an output path equal to the
input is refused. Bad input raises :class:`transforms.errors.InputDataError` naming the file; the
command line turns it into a one-line ``error:`` message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_prep.dicom import read_dicom_series, write_image_atomic
from transforms.errors import InputDataError

__all__ = [
    "INTERPOLATORS",
    "BadArgumentError",
    "convert",
    "load_image",
    "main",
    "n4",
    "n4_bias_correct",
    "resample",
    "resample_image",
    "run",
]

#: ``--interp`` choices: ``nearest`` for label maps, ``linear`` / ``bspline`` for intensities
INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

PathLike = str | os.PathLike


class BadArgumentError(ValueError):
    """A bad parameter found by the functions here (output equal to input, bad spacing, empty mask...).

    The command line reports it, like :class:`InputDataError`, as a one-line message with exit code 2.
    """


def _sitk_fault(err: BaseException) -> str:
    """One line out of a (multi-line) SimpleITK exception message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR:" in ln:
            return ln.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(err).__name__


def _check_distinct(inp: PathLike, out: PathLike) -> None:
    """Refuse to write ``out`` over the input ``inp``."""
    a, b = Path(inp), Path(out)
    same = a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    if same:
        raise BadArgumentError(f"{out}: output would overwrite the input")


def load_image(path: PathLike) -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, ...) or a DICOM series folder with SimpleITK.

    Args:
        path: an image file, or a folder holding one DICOM series.

    Returns:
        The image.

    Raises:
        InputDataError: naming ``path`` when it does not exist or cannot be read (for a folder, see
            :func:`data_prep.dicom.read_dicom_series`).
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise InputDataError("no such file", path)
    try:
        return sitk.ReadImage(os.fspath(path))
    except RuntimeError as err:
        raise InputDataError(f"cannot read image ({_sitk_fault(err)})", path) from err


def n4_bias_correct(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
    convergence_threshold: float = 1e-3,
) -> sitk.Image:
    """N4 bias-field correction, fitted on a shrunk copy and applied at full resolution.

    The bias field is estimated by ``N4BiasFieldCorrectionImageFilter`` on the image and mask shrunk by
    ``shrink`` (for speed); ``GetLogBiasFieldAsImage`` then evaluates the fitted B-spline field on the
    full-resolution grid and the image is divided by ``exp(log_bias)``.

    Args:
        image: intensity image (cast to float32; N4 needs positive values inside the mask).
        mask: voxels to fit on (non-zero = inside); same grid as ``image``. None: an Otsu threshold of the
            image (bright = object).
        shrink: shrink factor per axis for the fit (capped at each axis' size); 1 fits at full resolution.
        iterations: maximum iterations per fitting level; its length is the number of levels.
        convergence_threshold: N4's convergence threshold.

    Returns:
        The corrected float32 image, on the input grid.

    Raises:
        BadArgumentError: ``shrink`` < 1, empty ``iterations``, a mask on another grid / an empty mask, or
            an image N4 cannot fit (ITK's reason in the message).
    """
    if shrink < 1:
        raise BadArgumentError(f"shrink must be >= 1, got {shrink}")
    if not iterations or min(iterations) < 1:
        raise BadArgumentError(f"iterations must be positive counts, one per level, got {list(iterations)}")
    img = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.OtsuThreshold(img, 0, 1, 200)
    else:
        if mask.GetSize() != img.GetSize() or not np.allclose(
            np.r_[mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()],
            np.r_[img.GetSpacing(), img.GetOrigin(), img.GetDirection()],
            atol=1e-4,
        ):
            raise BadArgumentError(
                "mask is not on the image grid (size, spacing, origin or direction differ)"
            )
        mask = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise BadArgumentError("mask is empty")
    # keep at least 4 voxels along every axis after shrinking: N4's B-spline domain collapses on an axis
    # shrunk to one voxel (a thin slab of a few slices) and ITK then aborts with "zero-valued spacing"
    factors = [int(max(1, min(shrink, n // 4))) for n in img.GetSize()]
    small, small_mask = sitk.Shrink(img, factors), sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(float(convergence_threshold))
    try:
        corrector.Execute(small, small_mask)
        log_bias = corrector.GetLogBiasFieldAsImage(img)
    except RuntimeError as err:
        raise BadArgumentError(
            f"N4 cannot fit this image of size {img.GetSize()} ({_sitk_fault(err)})"
        ) from err
    return sitk.Cast(img / sitk.Exp(log_bias), sitk.sitkFloat32)


def resample_image(image: sitk.Image, spacing: Sequence[float], interp: str = "linear") -> sitk.Image:
    """Resample onto a grid of another spacing, keeping the origin, direction and physical extent.

    The new grid starts at the same origin (the first voxel centre) with the same direction; its size is
    ``round(size * spacing / new_spacing)`` per axis, so ``size * spacing`` (the physical extent) is kept
    to within one new voxel. Points outside the input read 0.

    Args:
        image: input image.
        spacing: new spacing in mm, one value per axis (or one value for all axes).
        interp: ``"linear"``, ``"nearest"`` (label maps: values stay in the input's set) or ``"bspline"``.

    Returns:
        The resampled image: same pixel type as the input for ``nearest``, float32 otherwise.

    Raises:
        BadArgumentError: unknown ``interp``, or a spacing of the wrong length or not positive.
    """
    if interp not in INTERPOLATORS:
        raise BadArgumentError(f"interp must be one of {sorted(INTERPOLATORS)}, got {interp!r}")
    dim = image.GetDimension()
    new_spacing = [float(s) for s in spacing]
    if len(new_spacing) == 1:
        new_spacing *= dim
    if len(new_spacing) != dim or min(new_spacing) <= 0:
        raise BadArgumentError(f"spacing must be {dim} positive values, got {list(spacing)}")
    old_size, old_spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    new_size = np.maximum(1, np.round(old_size * old_spacing / np.asarray(new_spacing))).astype(int)
    pixel_type = image.GetPixelID() if interp == "nearest" else sitk.sitkFloat32
    if interp != "nearest" and image.GetNumberOfComponentsPerPixel() > 1:
        pixel_type = sitk.sitkVectorFloat32
    return sitk.Resample(
        image,
        [int(n) for n in new_size],
        sitk.Transform(),
        INTERPOLATORS[interp],
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0.0,
        pixel_type,
    )


def _n4_with_mask_file(
    image: sitk.Image, mask: PathLike | None, out: PathLike, shrink: int, iterations: Sequence[int]
) -> sitk.Image:
    """:func:`n4_bias_correct` with the mask read from a file; mask faults name the mask file."""
    mask_image = None
    if mask is not None:
        _check_distinct(mask, out)
        mask_image = load_image(mask)
        if mask_image.GetSize() != image.GetSize():
            raise InputDataError(
                f"mask size {mask_image.GetSize()} differs from image size {image.GetSize()}", mask
            )
    try:
        return n4_bias_correct(image, mask_image, shrink=shrink, iterations=iterations)
    except BadArgumentError as err:
        if mask is not None and "mask" in str(err):
            raise InputDataError(str(err), mask) from err
        raise


def convert(dicom: PathLike, out: PathLike, series_uid: str | None = None) -> Path:
    """Convert a DICOM series folder to NIfTI (``convert`` sub-command).

    Args:
        dicom: folder holding the series.
        out: ``.nii`` / ``.nii.gz`` output, written atomically.
        series_uid: series to convert when the folder holds several.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        InputDataError: a bad series (see :func:`data_prep.dicom.read_dicom_series`).
    """
    _check_distinct(dicom, out)
    return write_image_atomic(read_dicom_series(dicom, series_uid), out)


def n4(
    inp: PathLike,
    out: PathLike,
    mask: PathLike | None = None,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
) -> Path:
    """N4 bias-field correction of an image file (``n4`` sub-command).

    Args:
        inp: input image file (or DICOM series folder).
        out: output file, written atomically (float32).
        mask: optional mask file on the same grid; None uses an Otsu threshold.
        shrink: shrink factor for the fit.
        iterations: maximum iterations per fitting level.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        InputDataError: ``inp`` or ``mask`` unreadable, or the mask not on the image grid / empty
            (naming the mask file).
        BadArgumentError: ``out`` is the input, or bad ``shrink`` / ``iterations``.
    """
    _check_distinct(inp, out)
    corrected = _n4_with_mask_file(load_image(inp), mask, out, shrink, iterations)
    return write_image_atomic(corrected, out)


def resample(inp: PathLike, out: PathLike, spacing: Sequence[float], interp: str = "linear") -> Path:
    """Resample an image file to a new spacing (``resample`` sub-command).

    Args:
        inp: input image file (or DICOM series folder).
        out: output file, written atomically.
        spacing: new spacing in mm per axis.
        interp: ``"linear"``, ``"nearest"`` (label maps) or ``"bspline"``.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        InputDataError: ``inp`` unreadable.
        BadArgumentError: ``out`` is the input, or a bad ``spacing`` / ``interp``.
    """
    _check_distinct(inp, out)
    return write_image_atomic(resample_image(load_image(inp), spacing, interp), out)


def run(
    inp: PathLike,
    out: PathLike,
    n4: bool = False,
    spacing: Sequence[float] | None = None,
    interp: str = "linear",
    mask: PathLike | None = None,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
) -> Path:
    """Load (DICOM folder or image file), optionally N4-correct, optionally resample, write (``run``).

    N4 runs before resampling, at the acquired resolution. Without ``n4`` and ``spacing`` this is
    :func:`convert` (for a folder) or a format conversion (for a file).

    Args:
        inp: a DICOM series folder or an image file.
        out: output file, written atomically.
        n4: apply N4 bias-field correction.
        spacing: resample to this spacing (mm per axis) when given.
        interp: interpolator for resampling.
        mask: N4 mask file (on the input grid); None uses an Otsu threshold.
        shrink: N4 shrink factor.
        iterations: N4 iterations per level.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        InputDataError: unreadable input or mask.
        BadArgumentError: ``out`` is the input, or bad parameters.
    """
    _check_distinct(inp, out)
    image = load_image(inp)
    if n4:
        image = _n4_with_mask_file(image, mask, out, shrink, iterations)
    if spacing is not None:
        image = resample_image(image, spacing, interp)
    return write_image_atomic(image, out)


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.preprocess",
        description="SimpleITK preprocessing: DICOM->NIfTI, N4 bias correction, resampling.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="DICOM series folder -> NIfTI")
    p.add_argument("--dicom", required=True, help="folder holding one DICOM series")
    p.add_argument("--out", required=True, help="output .nii / .nii.gz")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder has several")

    def n4_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--mask", default=None, help="mask on the image grid (default: Otsu threshold)")
        q.add_argument("--shrink", type=int, default=4, help="shrink factor for the fit (default 4)")
        q.add_argument(
            "--iterations", type=int, nargs="+", default=[50, 50, 30], help="iterations per level (50 50 30)"
        )

    p = sub.add_parser("n4", help="N4 bias-field correction")
    p.add_argument("--in", dest="inp", required=True, help="input image")
    p.add_argument("--out", required=True, help="output image")
    n4_options(p)

    def resample_options(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument("--spacing", type=float, nargs="+", required=required, help="new spacing in mm")
        q.add_argument("--interp", choices=sorted(INTERPOLATORS), default="linear", help="nearest for labels")

    p = sub.add_parser("resample", help="resample to a new spacing")
    p.add_argument("--in", dest="inp", required=True, help="input image")
    p.add_argument("--out", required=True, help="output image")
    resample_options(p, required=True)

    p = sub.add_parser("run", help="load (DICOM folder or image), [N4], [resample], write")
    p.add_argument("--in", dest="inp", required=True, help="DICOM series folder or image file")
    p.add_argument("--out", required=True, help="output image")
    p.add_argument("--n4", action="store_true", help="apply N4 bias-field correction")
    n4_options(p)
    resample_options(p, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        0 on success; 2 on bad input data or usage (a one-line ``error:`` message on stderr).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.dicom, args.out, series_uid=args.series_uid)
        elif args.command == "n4":
            n4(args.inp, args.out, mask=args.mask, shrink=args.shrink, iterations=args.iterations)
        elif args.command == "resample":
            resample(args.inp, args.out, args.spacing, interp=args.interp)
        else:
            run(
                args.inp,
                args.out,
                n4=args.n4,
                spacing=args.spacing,
                interp=args.interp,
                mask=args.mask,
                shrink=args.shrink,
                iterations=args.iterations,
            )
    except (InputDataError, BadArgumentError) as err:
        # InputDataError names the file; BadArgumentError is an argument fault found late (output ==
        # input, spacing of the wrong length, ...). Both are user errors: one line, no traceback.
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
