"""Check a whole datalist before training or evaluation: every file, mask and label, all faults listed at once.

    python -m data_prep check DATALIST [--section test ...] [--min-value -200] [--report check.json]

A hospital export is rarely clean, and a training that dies on item 4,000 after three hours, or an
evaluation that silently scores a mask lying on another grid, costs more than reading every file once
beforehand. Each item is loaded the way the bundles load it (:func:`transforms.volume_loading_transforms`
for volumes with their masks, :func:`transforms.slice_loading_transforms` for 2D views) and checked; a
failing item is reported with the file and the fault and the check goes on. Faults found:

* datalist: missing or invalid file, a section that is empty, an item lacking a key (e.g. ``label``) that
  the other items of its section have;
* images: missing, unreadable or truncated files, DICOM series with missing/duplicated slices, mixed
  orientations or no pixel data, NaN/Inf voxels, constant (e.g. all-zero) images, the wrong dimensionality
  (2D or 4D where 3D is expected, 3D where a 2D view is), values below ``--min-value`` (CT Hounsfield units
  in an MRI dataset);
* masks: a shape or affine that differs from the image's, an empty brain mask, an empty lesion mask on an
  item whose ``kind`` says it has a lesion.

Exit status: 0 when every item passed, 1 when some failed (the report lists them), 2 for a datalist that
cannot be read at all.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.atomic import atomic_write_text
from transforms.errors import InputDataError
from transforms.pipeline import find_input_error

__all__ = ["CheckReport", "ItemFault", "check_datalist", "main"]

#: keys holding a 3D image
IMAGE_KEYS = ("image",)
#: keys that may hold a mask on the image's grid (a classification ``label`` is a number, not a path)
MASK_KEYS = ("label", "brain_mask", "mask", "neg_mask")
#: masks that must not be empty
NONEMPTY_KEYS = ("brain_mask",)


@dataclass(frozen=True)
class ItemFault:
    """One fault: where it is and what it is.

    Attributes:
        section: datalist section (empty for the datalist itself).
        item: index of the item in its section (-1 for the datalist or section).
        error: one line naming the faulty file and the fault.
    """

    section: str
    item: int
    error: str


@dataclass
class CheckReport:
    """What :func:`check_datalist` found.

    Attributes:
        datalist: the checked file.
        n_items: items checked, over all sections.
        faults: every fault found.
    """

    datalist: str
    n_items: int = 0
    faults: list[ItemFault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.faults


def _message(exc: BaseException, where: str) -> str:
    err = find_input_error(exc)
    if err is not None:
        return str(err)
    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{where}: {type(exc).__name__}: {detail}"


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(str(value))


# the loaders are built once per key set and options, not once per item (a datalist has thousands)
@functools.lru_cache(maxsize=16)
def _volume_loader(images: tuple[str, ...], masks: tuple[str, ...], min_value: float | None) -> Any:
    from transforms import volume_loading_transforms

    return volume_loading_transforms(
        images, masks, normalise=None, orientation="RAS", allow_constant=False, min_value=min_value
    )


@functools.lru_cache(maxsize=16)
def _slice_loader(images: tuple[str, ...], min_value: float | None, image_size: int) -> Any:
    from transforms import slice_loading_transforms

    return slice_loading_transforms(
        images, image_size, normalise=False, allow_constant=False, min_value=min_value
    )


@functools.lru_cache(maxsize=4)
def _study_loader(min_value: float | None, image_size: int) -> Any:
    from transforms.study import LoadStudyd

    return LoadStudyd("views", image_size=image_size, allow_constant=False, min_value=min_value)


def _check_volume_item(item: dict, min_value: float | None) -> None:
    images = tuple(k for k in IMAGE_KEYS if _is_path(item.get(k)))
    masks = tuple(k for k in MASK_KEYS if _is_path(item.get(k)))
    if not images:
        return
    data = _volume_loader(images, masks, min_value)({k: item[k] for k in images + masks})
    for key in masks:
        empty = not bool(np.any(np.asarray(data[key]) > 0))
        if empty and key in NONEMPTY_KEYS:
            raise InputDataError(f"{key} is empty (no foreground voxel)", item[key])
        kind = str(item.get("kind", "")).lower()
        if empty and key == "label" and kind and kind not in ("healthy", "normal", "none"):
            raise InputDataError(f"lesion mask is empty although the item's kind is {kind!r}", item[key])


def _check_slice_item(item: dict, min_value: float | None, image_size: int) -> None:
    images = tuple(k for k in IMAGE_KEYS if _is_path(item.get(k)))
    if images:
        _slice_loader(images, min_value, image_size)({k: item[k] for k in images})


def _infer_spatial_dims(items: list[dict]) -> int:
    """3 unless the first image found is a 2D NIfTI or a non-NIfTI, non-DICOM-folder file (PNG/JPEG/.dcm slice)."""
    for it in items:
        p = it.get("image")
        if not _is_path(p) or not os.path.exists(p):
            continue
        if os.path.isdir(p):
            return 3
        if str(p).lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            try:
                shape = nib.load(str(p)).shape
            except Exception:
                continue
            return 3 if len([s for s in shape if s > 1]) >= 3 else 2
        return 2
    return 3


def _check_views_item(item: dict, min_value: float | None, image_size: int) -> None:
    _study_loader(min_value, image_size)({"views": item["views"]})


def check_datalist(
    datalist: str | os.PathLike,
    sections: Sequence[str] | None = None,
    min_value: float | None = None,
    image_size: int = 64,
    spatial_dims: int | None = None,
) -> CheckReport:
    """Load and check every item of a datalist; faults are collected, not raised.

    Args:
        datalist: the datalist JSON (MONAI decathlon layout; relative paths resolve against its folder).
        sections: sections to check; default every section holding a list of items.
        min_value: images with voxels below it are a fault (``-200`` for MRI refuses CT Hounsfield units).
        image_size: the size 2D images and study views are loaded at (any valid size: only loading is checked).
        spatial_dims: 3 for volume datasets, 2 for slice datasets (classification slices); ``None`` decides per
            section from its first image, so items of the other dimensionality are reported.

    Returns:
        The report.

    Raises:
        InputDataError: the datalist itself is missing, not JSON, or names no section to check.
    """
    from data_prep.datalist import load_datalist, read_datalist_json

    path = Path(datalist)
    doc = read_datalist_json(path)
    names = (
        list(sections) if sections else [k for k, v in doc.items() if isinstance(v, list) and k != "findings"]
    )
    if not names:
        raise InputDataError("datalist has no section of items (e.g. 'training', 'test')", path)
    report = CheckReport(os.fspath(path))
    for section in names:
        try:
            items = load_datalist(path, section, check_files=False, required_keys=())
        except InputDataError as e:
            report.faults.append(ItemFault(section, -1, str(e)))
            continue
        # a key most items carry but some lack (a missing label) would fail a training much later
        dims = spatial_dims or _infer_spatial_dims(items)
        common = Counter(k for it in items for k in it)
        for i, it in enumerate(items):
            report.n_items += 1
            lacking = sorted(k for k, n in common.items() if n > len(items) / 2 and k not in it)
            who = f"item {i}" + (f" ({it['subject']})" if "subject" in it else "")
            if lacking:
                report.faults.append(
                    ItemFault(
                        section,
                        i,
                        f"{path}: {who} of section {section!r} lacks {lacking}, which the others have",
                    )
                )
                continue
            try:
                if isinstance(it.get("views"), list):
                    _check_views_item(it, min_value, image_size)
                elif dims == 2:
                    _check_slice_item(it, min_value, image_size)
                else:
                    _check_volume_item(it, min_value)
            except Exception as e:  # every fault of every item is reported, none stops the check
                report.faults.append(ItemFault(section, i, _message(e, f"{path}: {who}")))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep check``: check a datalist and print every fault.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 when every item passed, 1 when some failed, 2 when the datalist cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep check",
        description="Load and check every item of a datalist the way the bundles load them; list all faults.",
    )
    parser.add_argument("datalist", help="datalist JSON")
    parser.add_argument("--section", nargs="+", default=None, help="sections to check (default: all)")
    parser.add_argument(
        "--min-value",
        type=float,
        default=None,
        help="voxels below this are a fault (-200 for MRI refuses CT Hounsfield units)",
    )
    parser.add_argument("--report", default=None, help="write the faults as JSON here")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = check_datalist(args.datalist, args.section, args.min_value)
    except InputDataError as e:
        print(f"python -m data_prep check: error: {e}", file=sys.stderr)
        return 2
    if args.report:
        body = {
            "datalist": report.datalist,
            "n_items": report.n_items,
            "faults": [asdict(f) for f in report.faults],
        }
        atomic_write_text(args.report, json.dumps(body, indent=2) + "\n")
    for f in report.faults:
        print(f"[{f.section}] {f.error}", file=sys.stderr)
    print(f"{report.datalist}: {report.n_items} item(s) checked, {len(report.faults)} fault(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
