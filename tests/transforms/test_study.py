"""Loading multi-view studies and batching studies of different view counts (transforms/study.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from transforms import InputDataError
from transforms.study import LoadStudyd, collate_studies


def _nifti(path: Path, shape: tuple[int, int], value: float = 100.0) -> str:
    a = np.zeros(shape, np.float32)
    a[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] = value
    a += np.linspace(0, 1, a.size, dtype=np.float32).reshape(shape)  # not constant anywhere it matters
    nib.save(nib.Nifti1Image(a, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return str(path)


def test_views_of_different_shapes_and_formats_become_one_tensor(tmp_path: Path) -> None:
    rgb = np.zeros((40, 20, 3), np.uint8)
    rgb[10:30, 5:15] = 200
    Image.fromarray(rgb).save(tmp_path / "lateral.jpg")
    item = {
        "views": [
            _nifti(tmp_path / "ax.nii.gz", (80, 96)),
            _nifti(tmp_path / "sag.nii.gz", (96, 80)),
            str(tmp_path / "lateral.jpg"),
        ],
        "labels": [1, 0, -1],
        "study": "s1",
    }
    out = LoadStudyd(image_size=32)(item)
    v = out["views"]
    assert v.shape == (3, 1, 32, 32) and v.dtype == torch.float32
    # percentile scaling to [-1, 1]: the bright square reaches 1, the background -1
    assert float(v.max()) == pytest.approx(1.0, abs=1e-4) and float(v.min()) == pytest.approx(-1.0, abs=1e-4)
    # aspect ratio kept: the JPEG's 20 x 10 bright box (in a 40 x 20 image) becomes 16 x 8 of the 32 x 32 view
    rows, cols = torch.nonzero(v[2, 0] > 0, as_tuple=True)
    extent = sorted([int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)])
    assert abs(extent[0] - 8) <= 1 and abs(extent[1] - 16) <= 1, extent
    assert torch.equal(out["labels"], torch.tensor([1.0, 0.0, -1.0]))
    assert out["study"] == "s1"


def test_view_count_and_bad_file_errors(tmp_path: Path) -> None:
    one = _nifti(tmp_path / "a.nii.gz", (32, 32))
    with pytest.raises(InputDataError, match="1 to 5 views, this one has 6"):
        LoadStudyd(image_size=16)({"views": [one] * 6})
    with pytest.raises(InputDataError, match="1 to 5 views, this one has 0"):
        LoadStudyd(image_size=16)({"views": []})
    missing = tmp_path / "missing_view.nii.gz"
    with pytest.raises(InputDataError, match=r"missing_view\.nii\.gz"):
        LoadStudyd(image_size=16)({"views": [one, str(missing)]})
    # a single path (not a list) is a one-view study
    assert LoadStudyd(image_size=16)({"views": one})["views"].shape == (1, 1, 16, 16)


def test_collate_pads_the_view_axis_and_masks_it() -> None:
    batch = [
        {"views": torch.full((n, 1, 8, 8), float(n)), "labels": torch.tensor([n, 0.0]), "study": f"s{n}",
         "view_paths": [f"v{k}" for k in range(n)]}
        for n in (1, 5, 2)
    ]  # fmt: skip
    out = collate_studies(batch)
    assert out["views"].shape == (3, 5, 1, 8, 8)
    assert out["view_mask"].tolist() == [
        [True, False, False, False, False],
        [True] * 5,
        [True, True, False, False, False],
    ]
    assert (out["views"][~out["view_mask"]] == 0).all()
    assert (out["views"][2, :2] == 2.0).all() and (out["views"][1] == 5.0).all()
    assert torch.equal(out["labels"], torch.tensor([[1.0, 0.0], [5.0, 0.0], [2.0, 0.0]]))
    assert out["study"] == ["s1", "s5", "s2"]
    assert out["view_paths"] == [["v0"], ["v0", "v1", "v2", "v3", "v4"], ["v0", "v1"]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_studies([])
    with pytest.raises(ValueError, match=r"share \(C, H, W\)"):
        collate_studies([{"views": torch.zeros(1, 1, 8, 8)}, {"views": torch.zeros(1, 1, 4, 4)}])
