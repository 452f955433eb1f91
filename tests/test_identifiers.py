"""Issue 8: patient identifiers planted in a DICOM series never reach data_prep's outputs or the loaded data.

The bundles' inference runs (tests/bundles: every bundle's inference.json on the same planted series) scan
their outputs and logs; here the two ways DICOM data enters the project outside inference are covered: the
SimpleITK conversion/preprocessing of ``data_prep`` and the MONAI loading every training and evaluation
uses (the metadata a MetaTensor carries is what handlers could write into headers, logs or MLflow).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from data_prep.dicom import write_dicom_series
from tests._catalogue import PLANTED, find_identifiers, planted_dicom

ROOT = Path(__file__).resolve().parents[1]


def _planted_series(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_dicom_series(
        rng.uniform(50, 400, (32, 32, 16)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "src"
    )
    series = planted_dicom(tmp_path / "src", tmp_path / "series_x")
    # the scan finds the planted values where they are: the check itself works
    assert any("PIDQX7781236" in hit for hit in find_identifiers([series]))
    return series


def test_data_prep_preprocessing_output_and_log_carry_no_identifier(tmp_path: Path) -> None:
    series = _planted_series(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.preprocess", "run", "--in", str(series), "--out", str(out / "t1.nii.gz"),
         "--n4", "--spacing", "2", "2", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "t1.nii.gz").is_file()
    assert find_identifiers([out], [proc.stdout, proc.stderr]) == []


def test_loaded_volume_metadata_carries_no_identifier(tmp_path: Path) -> None:
    from transforms import volume_loading_transforms

    series = _planted_series(tmp_path)
    img = volume_loading_transforms(("image",), normalise=None)({"image": str(series)})["image"]
    text = repr(dict(img.meta)) + repr(img.applied_operations)
    assert img.shape == (1, 32, 32, 16)
    for value in PLANTED.values():
        assert value not in text and value.upper() not in text
