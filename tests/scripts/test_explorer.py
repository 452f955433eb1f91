"""The Explorer app (scripts/explorer.py) under Streamlit's AppTest: loads, computes on a chosen volume, reacts to
its sliders, downloads a NIfTI on the input's grid, reports bad input by name, and hosts the simplex page."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

import nibabel as nib
from streamlit.testing.v1 import AppTest

from tests.engines._explore_helpers import AFFINE, make_checkpoints, write_volume

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "explorer.py"
SHAPE = (40, 36, 10)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("explorer_app")
    make_checkpoints("anoddpm_simplex", tmp / "ck_anoddpm")
    make_checkpoints("ddim_classifier_guidance", tmp / "ck_guided")
    return {
        "anoddpm": tmp / "ck_anoddpm",
        "guided": tmp / "ck_guided",
        "volume": write_volume(tmp / "sub-07_T1w.nii.gz", SHAPE),
        "small": write_volume(tmp / "small.nii.gz", (24, 24, 6)),
    }


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AppTest:
    monkeypatch.setenv("MEDDIFF_EXPLORER_DIR", str(tmp_path / "work"))
    at = AppTest.from_file(str(SCRIPT), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def _open(at: AppTest, ckpt: Path, path: Path, bundle: str = "anoddpm_simplex") -> AppTest:
    if bundle != "anoddpm_simplex":
        at.selectbox(key="bundle").set_value(bundle).run()
    at.text_input(key=f"ckpt_dir_{bundle}").set_value(str(ckpt))
    at.text_input(key="server_path").set_value(str(path)).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def test_page_loads_with_title_and_instructions(app: AppTest):
    assert [t.value for t in app.title] == ["Anomaly Explorer"]
    assert app.selectbox(key="bundle").options == ["anoddpm_simplex", "ddim_classifier_guidance"]
    assert app.text_input(key="ckpt_dir_anoddpm_simplex").value.endswith("bundles/anoddpm_simplex/models")
    assert app.session_state["explorer"]["bundle"] == "anoddpm_simplex"


def test_slice_slider_spans_the_volume_and_t_recomputes(app: AppTest, files):
    _open(app, files["anoddpm"], files["volume"])
    n = nib.load(files["volume"]).shape[2]  # the affine keeps the third axis superior: the axial slices
    s = app.slider(key="slice")
    assert (s.min, s.max, s.value) == (0, n - 1, n // 2)
    state = dict(app.session_state["explorer"])
    assert state["setting"] == 250 and state["n_slices"] == n and state["shape"] == SHAPE
    assert len(app.image) == 3  # image, reconstruction, overlay

    app.slider(key="t").set_value(450).run()
    after = dict(app.session_state["explorer"])
    assert after["setting"] == 450 and after["map_sum"] != state["map_sum"]
    assert any("t450" in c.value for c in app.caption)

    app.slider(key="slice").set_value(2).run()  # scrolling keeps the computed volume
    scrolled = app.session_state["explorer"]
    assert scrolled["slice"] == 2 and scrolled["map_sum"] == after["map_sum"]


def test_download_is_a_nifti_with_the_input_affine(app: AppTest, files, monkeypatch: pytest.MonkeyPatch):
    import streamlit.testing.v1.app_test as app_test
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    stores: list[MemoryMediaFileStorage] = []

    class Recording(MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    # AppTest makes a fresh in-memory media store for every run; keep them to read the button's file back
    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)
    _open(app, files["anoddpm"], files["volume"])
    button = app.download_button(key="download_map")
    file_id = Path(button.proto.url).stem
    media = stores[-1].get_file(file_id)
    assert media.filename == "sub-07_T1w_anoddpm_simplex_t250_anomaly_map.nii.gz"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(media.content))
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_allclose(img.affine, nib.load(files["volume"]).affine)
    data = np.asarray(img.dataobj)
    assert data.max() > 0 and float(data.sum(dtype=np.float64)) == pytest.approx(
        app.session_state["explorer"]["map_sum"], rel=1e-6
    )


def test_bad_files_show_an_error_naming_them(app: AppTest, files, tmp_path: Path):
    flat = io.BytesIO()
    flat.write(gzip.compress(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)).to_bytes()))
    app.text_input(key="ckpt_dir_anoddpm_simplex").set_value(str(files["anoddpm"]))
    app.file_uploader(key="upload").set_value(
        ("flat_slice.nii.gz", flat.getvalue(), "application/gzip")
    ).run()
    assert not app.exception
    assert len(app.error) == 1 and "flat_slice.nii.gz" in app.error[0].value and "2D" in app.error[0].value

    app.file_uploader(key="upload").set_value(("broken.nii.gz", b"not a nifti", "application/gzip")).run()
    assert not app.exception and "broken.nii.gz" in app.error[0].value

    app.file_uploader(key="upload").set_value(None)
    missing = tmp_path / "missing_scan.nii.gz"
    app.text_input(key="server_path").set_value(str(missing)).run()
    assert not app.exception and str(missing) in app.error[0].value

    app.text_input(key="server_path").set_value(str(files["volume"]))
    app.text_input(key="ckpt_dir_anoddpm_simplex").set_value(str(tmp_path / "no_models")).run()
    assert not app.exception
    assert str(tmp_path / "no_models" / "model.pt") in app.error[0].value
    assert "does not exist" in app.error[0].value


def test_guided_scale_changes_the_map(app: AppTest, files):
    _open(app, files["guided"], files["small"], bundle="ddim_classifier_guidance")
    assert app.session_state["explorer"]["setting"] == "L500_s50"
    app.slider(key="level").set_value(200)
    app.slider(key="scale").set_value(0.0).run()
    s0 = dict(app.session_state["explorer"])
    app.slider(key="scale").set_value(100.0).run()
    s100 = dict(app.session_state["explorer"])
    assert (s0["setting"], s100["setting"]) == ("L200_s0", "L200_s100")
    assert s0["map_sum"] != s100["map_sum"]
    assert s100["n_slices"] == 6


def test_simplex_page_is_reachable(app: AppTest):
    app.switch_page("simplex_visualizer.py").run()
    assert not app.exception, app.exception
    assert [t.value for t in app.title] == ["Simplex noise for diffusion (AnoDDPM)"]
    assert 0.0 < app.session_state["simplex_stats"]["alpha_bar"] < 1.0
