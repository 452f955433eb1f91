"""The Streamlit simplex-noise page runs, reacts to its sliders and shows the right limits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("nilearn")

from streamlit.testing.v1 import AppTest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "simplex_visualizer.py"


def _metric(at: AppTest, label: str) -> float:
    for m in at.metric:
        if m.label == label:
            return float(m.value)
    raise AssertionError(f"no metric {label!r} in {[m.label for m in at.metric]}")


@pytest.fixture
def app() -> AppTest:
    at = AppTest.from_file(str(SCRIPT), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_runs_and_shows_everything(app):
    assert len(app.image) == 4  # x0, simplex eps, x_t simplex, x_t Gaussian
    stats = app.session_state["simplex_stats"]
    assert 0.0 < stats["alpha_bar"] < 1.0  # default t = 250
    assert stats["noise_lag1_corr"] > 0.5 > abs(stats["gauss_lag1_corr"])  # smooth vs white
    assert _metric(app, "noise lag-1 corr") == pytest.approx(stats["noise_lag1_corr"], abs=1e-3)
    assert 0.3 < stats["raw_std"] < 1.0


def test_octaves_slider_changes_the_noise(app):
    before = dict(app.session_state["simplex_stats"])
    app.slider(key="octaves").set_value(1).run()
    assert not app.exception
    after = app.session_state["simplex_stats"]
    assert after["noise_checksum"] != before["noise_checksum"]
    # one octave at 2**-5 / px is much smoother than six
    assert after["noise_lag1_corr"] > before["noise_lag1_corr"] + 0.1
    assert _metric(app, "raw noise std") == pytest.approx(after["raw_std"], abs=1e-3)


def test_t0_is_the_clean_image_and_t1000_nearly_pure_noise(app):
    app.slider(key="t").set_value(0).run()
    assert not app.exception
    stats = app.session_state["simplex_stats"]
    assert stats["alpha_bar"] == 1.0 and stats["mse_simplex"] == 0.0 and stats["mse_gauss"] == 0.0
    assert math.isinf(stats["psnr_simplex"])
    assert _metric(app, "MSE x_t simplex") == 0.0

    app.slider(key="t").set_value(1000).run()
    assert not app.exception
    stats = app.session_state["simplex_stats"]
    assert stats["alpha_bar"] < 1e-6
    assert abs(stats["corr_xt_x0_simplex"]) < 0.3  # the image is gone
    assert stats["mse_gauss"] > 1.0 and stats["psnr_simplex"] < 10.0


def test_uploaded_nifti_replaces_the_template(app):
    import gzip

    import nibabel as nib
    import numpy as np

    vol = np.zeros((40, 48, 9), dtype=np.float32)
    vol[10:30, 12:36, :] = 1.0
    data = gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    app.slider(key="t").set_value(0).run()
    app.file_uploader(key="upload").set_value(("square.nii.gz", data, "application/gzip")).run()
    assert not app.exception and not app.error
    assert "square.nii.gz" in app.caption[0].value
    assert app.session_state["simplex_stats"]["mse_simplex"] == 0.0
    app.file_uploader(key="upload").set_value(("broken.nii.gz", b"not a nifti", "application/gzip")).run()
    assert not app.exception and app.error  # reported on the page, template shown instead
