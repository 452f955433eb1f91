"""Demo cohort through the loading pipeline: NIfTI and DICOM give the same array; slices round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transforms import SlicesToVolume, VolumeToSlicesd, volume_loading_transforms


def _dicom_items(cohort: Path) -> list[dict]:
    doc = json.loads((cohort / "datalists" / "dicom.json").read_text())
    return doc["test"]


@pytest.mark.parametrize("normalise", [None, "percentile"])
def test_nifti_and_dicom_series_load_to_the_same_array(demo_cohort: Path, normalise: str | None) -> None:
    items = _dicom_items(demo_cohort)
    assert items, "the demo writes some subjects as DICOM series"
    load = volume_loading_transforms(
        ("image",), ("brain_mask",), normalise=normalise, normalise_mask_key=None
    )
    for it in items:
        sid = it["subject"]
        dcm_dir = (demo_cohort / "datalists" / it["image"]).resolve()
        nii = demo_cohort / "subjects" / sid / f"{sid}_T1w.nii.gz"
        brain = demo_cohort / "subjects" / sid / f"{sid}_brainmask.nii.gz"
        a = load({"image": str(nii), "brain_mask": str(brain)})
        b = load({"image": str(dcm_dir), "brain_mask": str(brain)})
        assert a["image"].shape == b["image"].shape
        # int16 data are stored exactly in DICOM; the percentile scaling then agrees to float rounding
        np.testing.assert_allclose(b["image"].numpy(), a["image"].numpy(), atol=1e-4)
        np.testing.assert_allclose(b["image"].affine.numpy(), a["image"].affine.numpy(), atol=1e-3)


def test_demo_volume_slices_and_stacks_back(demo_cohort: Path) -> None:
    sid = "sub-001"
    sdir = demo_cohort / "subjects" / sid
    d = volume_loading_transforms(("image",), ("label",), normalise="percentile")(
        {"image": str(sdir / f"{sid}_T1w.nii.gz"), "label": str(sdir / f"{sid}_lesion.nii.gz")}
    )
    slices = VolumeToSlicesd(("image", "label"), axis=2, min_foreground=0.0)(d)
    vol = SlicesToVolume()([s["image"] for s in slices])
    assert torch.equal(vol.as_tensor(), d["image"].as_tensor())
    np.testing.assert_allclose(vol.affine.numpy(), d["image"].affine.numpy())
