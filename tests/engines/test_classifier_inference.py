"""Slice and volume inference of a classifier with stored conformal thresholds (engines.ClassifierInference)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engines import ClassifierInference, save_conformal
from transforms import PercentileScaleIntensity, slice_loading_transforms, volume_loading_transforms
from transforms.errors import InputDataError

CLASSES = ["healthy", "tumour"]


class Bright(nn.Module):
    """p(tumour) grows with the contrast between the centre and the surrounding tissue (normalised slices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, :, 12:20, 12:20].mean((1, 2, 3)) - x[:, :, 6:10, 6:10].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(c), 8 * (c - 0.35)], 1)


def _inference(tmp_path: Path, **kw) -> ClassifierInference:
    cal = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]] * 5)
    save_conformal(
        tmp_path / "conformal_bright.json", cal, np.array([0, 0, 1, 1] * 5), [0.1], ["lac", "aps"], CLASSES
    )
    return ClassifierInference(
        Bright(), CLASSES, tmp_path / "conformal_bright.json",
        slice_loader=slice_loading_transforms(image_size=32, normalise=False),
        volume_loader=volume_loading_transforms(["image"], normalise=None),
        normalise=PercentileScaleIntensity(0.5, 99.5, 0.0, 1.0),
        output_dir=tmp_path / "out", image_size=32, model_name="bright", **kw,
    )  # fmt: skip


def test_slice_png_and_volume(tmp_path: Path) -> None:
    inf = _inference(tmp_path, score="aps", alpha=0.1)
    img = np.zeros((40, 40), np.float32)
    img[5:35, 5:35] = 100
    img[15:25, 15:25] = 400  # bright centre: tumour
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "slice.nii.gz")
    rec = inf(tmp_path / "slice.nii.gz")
    (s,) = rec["slices"]
    assert s["slice_index"] is None and s["predicted_class"] == "tumour"
    assert s["probabilities"]["tumour"] > 0.5 and "tumour" in s["conformal_set"]
    assert json.loads((tmp_path / "out" / "slice_classes.json").read_text()) == rec
    assert rec["score"] == "aps" and rec["coverage_target"] == pytest.approx(0.9) and "summary" not in rec

    # an RGB PNG of the same picture gives the same answer (grey = mean of the channels)
    Image.fromarray(np.repeat((img / 2).astype(np.uint8)[..., None], 3, -1)).save(tmp_path / "slice_rgb.png")
    assert inf(tmp_path / "slice_rgb.png")["slices"][0]["predicted_class"] == "tumour"

    # a volume: a head-like block over slices 4..15 of 20; the middle slices are brightest
    vol = np.zeros((32, 32, 20), np.float32)
    vol[4:28, 4:28, 4:16] = 100
    vol[12:20, 12:20, 8:12] = 400
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "head.nii.gz")
    rec = inf(tmp_path / "head.nii.gz")
    idx = [s["slice_index"] for s in rec["slices"]]
    assert idx == list(range(4, 16)), "slices without foreground are skipped"
    tumour = [s["slice_index"] for s in rec["slices"] if s["predicted_class"] == "tumour"]
    assert tumour == [8, 9, 10, 11]
    assert rec["summary"]["slices_per_class"] == {"healthy": 8, "tumour": 4}
    assert rec["summary"]["max_probability"]["tumour"] > 0.5


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"conformal_bright\.json.*run configs/evaluate\.json first"):
        ClassifierInference(
            Bright(),
            CLASSES,
            tmp_path / "conformal_bright.json",
            lambda d: d,
            lambda d: d,
            lambda x: x,
            tmp_path,
        )
    with pytest.raises(ValueError, match="no threshold for score 'raps'"):
        _inference(tmp_path, score="raps")
    inf = _inference(tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputDataError, match=r"empty\.nii\.gz.*no foreground"):
        inf(tmp_path / "empty.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputDataError, match=r"broken\.nii\.gz"):
        inf(tmp_path / "broken.nii.gz")
