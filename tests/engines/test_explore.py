"""engines.explore: both anomaly bundles built from their real configs with random-weight checkpoints, run on a
small synthetic volume with a non-RAS affine; maps on the input grid, NIfTI output, settings, bad inputs, DICOM."""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engines.explore import (
    ANODDPM,
    GUIDED,
    checkpoint_paths,
    checkpoint_signature,
    explore_volume,
    load_anomaly_bundle,
    map_file_name,
    map_nifti_bytes,
    open_dicom_folder,
    open_dicom_zip,
    open_path,
    open_upload,
    overlay_rgb,
    write_map_nifti,
)
from tests.engines._explore_helpers import AFFINE, make_checkpoints, volume, write_volume
from transforms.errors import InputDataError

SMALL = {"image_size": 32}  # the networks are size-agnostic except the classifier's input shape
SHAPE = (40, 36, 10)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("explore")


@pytest.fixture(scope="module")
def nifti(work: Path) -> Path:
    return write_volume(work / "sub-01_T1w.nii.gz", SHAPE)


@pytest.fixture(scope="module")
def anoddpm(work: Path):
    make_checkpoints(ANODDPM, work / "ck_anoddpm", overrides=SMALL)
    return load_anomaly_bundle(ANODDPM, work / "ck_anoddpm", "cpu", overrides=SMALL)


@pytest.fixture(scope="module")
def guided(work: Path):
    make_checkpoints(GUIDED, work / "ck_guided", overrides=SMALL)
    return load_anomaly_bundle(GUIDED, work / "ck_guided", "cpu", overrides=SMALL)


@pytest.fixture(scope="module")
def result_t100(anoddpm, nifti: Path):
    return explore_volume(anoddpm, open_path(nifti), 100)


def test_bundle_is_built_from_its_configs(anoddpm, guided):
    from engines import AnomalyInferer, GuidedDDIMInferer, VolumeAnomalyInferer

    assert isinstance(anoddpm.anomaly_inferer, AnomalyInferer) and anoddpm.default_setting == 250
    assert anoddpm.anomaly_inferer.noise_type == "simplex"  # train.json's noise, not a default
    assert isinstance(guided.anomaly_inferer, GuidedDDIMInferer) and guided.default_setting == "L500_s50"
    assert guided.class_names == ["healthy", "diseased"]
    for b in (anoddpm, guided):
        assert isinstance(b.volume_inferer, VolumeAnomalyInferer) and b.volume_inferer.image_size == 32
        assert b.num_train_timesteps == 1000 and b.slice_axis == 2 and not b.network.training
    # the weights in the networks are the checkpoint's, not a fresh initialisation
    saved = torch.load(anoddpm.checkpoints["checkpoint"], weights_only=True)["model"]
    for k, v in anoddpm.network.state_dict().items():
        assert torch.equal(v.cpu(), saved[k])
    clf = torch.load(guided.checkpoints["classifier_checkpoint"], weights_only=True)
    for k, v in guided.anomaly_inferer.classifier.state_dict().items():
        assert torch.equal(v.cpu(), clf[k])


def test_map_image_and_recon_lie_on_the_input_grid(result_t100, nifti: Path):
    r = result_t100
    raw = np.asarray(nib.load(nifti).dataobj, dtype=np.float32)
    assert r.shape == SHAPE == raw.shape
    assert r.image.shape == r.recon.shape == r.anomaly_map.shape == r.brain_mask.shape == SHAPE
    np.testing.assert_allclose(r.affine, AFFINE)
    # the reorientation to RAS (both in-plane axes flipped) was undone: the normalised image is the raw one rescaled
    head = raw > 0
    assert np.corrcoef(r.image[head], raw[head])[0, 1] > 0.99
    assert np.all(np.isfinite(r.anomaly_map)) and r.anomaly_map.min() >= 0.0
    assert r.anomaly_map[r.brain_mask == 0].max() == 0.0  # masked as inference.json's writer masks it
    assert r.anomaly_map[r.brain_mask > 0].max() > 0.0
    assert r.brain_mask[head].mean() > 0.9 and r.brain_mask[~head].mean() < 0.1
    assert r.n_slices == SHAPE[2] and r.slice(r.anomaly_map, 3).shape == (SHAPE[1], SHAPE[0])
    assert not r.anomaly_map.flags.writeable  # shared by the app's cache


def test_written_nifti_has_the_input_affine_and_shape(result_t100, tmp_path: Path):
    out = write_map_nifti(result_t100, tmp_path / "maps")
    assert out.name == "sub-01_T1w_anoddpm_simplex_t100_anomaly_map.nii.gz" == map_file_name(result_t100)
    img = nib.load(out)
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(img.dataobj), result_t100.anomaly_map)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # atomic: no temporary file left
    mem = nib.Nifti1Image.from_bytes(gzip.decompress(map_nifti_bytes(result_t100)))
    np.testing.assert_allclose(mem.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(mem.dataobj), result_t100.anomaly_map)


def test_t_changes_the_map_and_a_setting_is_reproducible(anoddpm, nifti: Path, result_t100):
    vol = open_path(nifti)
    r400 = explore_volume(anoddpm, vol, 400)
    assert r400.setting == 400 and result_t100.setting == 100
    assert not np.allclose(r400.anomaly_map, result_t100.anomaly_map)
    assert not np.allclose(r400.recon, result_t100.recon)
    # the config's seeded noise: the same setting gives the same map (what makes caching results correct)
    np.testing.assert_array_equal(explore_volume(anoddpm, vol, 100).anomaly_map, result_t100.anomaly_map)
    # the bundle's own inferer is untouched by the per-call setting
    assert anoddpm.volume_inferer.t_values == [250]


def test_guidance_scale_changes_the_reconstruction(guided, nifti: Path):
    vol = open_path(nifti)
    r0 = explore_volume(guided, vol, guided.setting(level=200, scale=0))
    r50 = explore_volume(guided, vol, "L200_s50.0")
    assert (r0.setting, r50.setting) == ("L200_s0", "L200_s50")
    assert r0.shape == r50.shape == SHAPE
    np.testing.assert_allclose(r50.affine, AFFINE)
    diff = np.abs(r50.recon - r0.recon)[r0.brain_mask > 0]
    assert diff.max() > 1e-3  # the classifier's gradient moved the decoding
    assert not np.allclose(r0.anomaly_map, r50.anomaly_map)


def test_settings_are_checked(anoddpm, guided):
    assert anoddpm.setting(t=1) == 1 and anoddpm.canonical("400") == 400
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="t must be in"):
            anoddpm.setting(t=bad)
    with pytest.raises(ValueError):
        anoddpm.canonical("L500_s50")
    assert guided.canonical(None) == "L500_s50" and guided.canonical(300) == "L300_s50"
    with pytest.raises(ValueError):
        guided.setting(level=1001, scale=10)
    with pytest.raises(ValueError):
        guided.setting(level=100, scale=-1)


def test_missing_checkpoint_errors_name_the_file(tmp_path: Path):
    with pytest.raises(InputDataError, match=r"model\.pt: checkpoint file does not exist") as e:
        load_anomaly_bundle(ANODDPM, tmp_path / "empty", "cpu")
    assert e.value.path == str(tmp_path / "empty" / "model.pt")

    ck = tmp_path / "guided"
    paths = make_checkpoints(GUIDED, ck, overrides=SMALL)
    paths["classifier_labels"].unlink()
    with pytest.raises(InputDataError, match=r"classifier_labels\.json: class-order file does not exist"):
        load_anomaly_bundle(GUIDED, ck, "cpu", overrides=SMALL)
    paths["classifier_checkpoint"].unlink()
    with pytest.raises(InputDataError, match=r"classifier\.pt: checkpoint file does not exist"):
        load_anomaly_bundle(GUIDED, ck, "cpu", overrides=SMALL)
    assert checkpoint_paths(GUIDED, ck)["diffusion_checkpoint"] == ck / "diffusion_model.pt"


def test_wrong_checkpoints_are_refused_by_name(tmp_path: Path):
    ck = tmp_path / "guided"
    paths = make_checkpoints(GUIDED, ck, overrides=SMALL)
    before = checkpoint_signature(GUIDED, ck)
    # a classifier of three classes beside a class-order file of two: the head does not fit
    paths["classifier_labels"].write_text('{"labels": ["healthy", "tumour", "stroke"], "healthy_index": 0}')
    make_checkpoints(GUIDED, tmp_path / "other", overrides=SMALL)
    with pytest.raises(InputDataError, match=r"classifier\.pt: weights do not fit"):
        load_anomaly_bundle(GUIDED, ck, "cpu", overrides=SMALL)
    assert checkpoint_signature(GUIDED, ck) != before  # a rewritten file changes the app's cache key
    paths["classifier_labels"].write_text('{"labels": ["diseased", "healthy"]}')
    with pytest.raises(InputDataError, match=r"classifier_labels\.json: .*healthy_index 0 does not point"):
        load_anomaly_bundle(GUIDED, ck, "cpu", overrides=SMALL)
    # a checkpoint that pickles code is refused, not run
    torch.save({"model": {"x": torch.zeros(1)}, "hook": Path("x")}, paths["diffusion_checkpoint"])
    paths["classifier_labels"].write_text('{"labels": ["healthy", "diseased"]}')
    with pytest.raises(InputDataError, match=r"diffusion_model\.pt: checkpoint carries pickled code"):
        load_anomaly_bundle(GUIDED, ck, "cpu", overrides=SMALL)


def test_bad_inputs_name_the_file(tmp_path: Path):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), str(flat))
    with pytest.raises(InputDataError, match=r"flat\.nii\.gz: is a 2D image"):
        open_path(flat)
    with pytest.raises(InputDataError, match=r"broken\.nii\.gz: cannot be read as NIfTI"):
        open_upload(b"\x1f\x8b not really gzip", "broken.nii.gz", tmp_path / "w")
    with pytest.raises(InputDataError, match=r"nowhere\.nii\.gz: file does not exist"):
        open_path(tmp_path / "nowhere.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputDataError, match=r"notes\.txt: not a NIfTI file"):
        open_path(tmp_path / "notes.txt")
    with pytest.raises(InputDataError, match=r"series\.zip: not a zip archive"):
        open_dicom_zip(b"PK\x03\x04 truncated", "series.zip", tmp_path / "w")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("README.txt", "no images here")
    with pytest.raises(InputDataError, match=r"export\.zip: no DICOM files"):
        open_upload(buf.getvalue(), "export.zip", tmp_path / "w")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputDataError, match=r"empty_dir: no DICOM files"):
        open_path(tmp_path / "empty_dir")


def test_upload_equals_server_file(anoddpm, nifti: Path, result_t100, tmp_path: Path):
    data = nifti.read_bytes()
    up = open_upload(data, "my scan.nii.gz", tmp_path / "w")
    assert up.digest == hashlib.sha256(data).hexdigest() == open_path(nifti).digest
    assert up.label == "my scan.nii.gz" and up.stem == "my_scan" and up.path.parent.parent == tmp_path / "w"
    r = explore_volume(anoddpm, up, 100)
    np.testing.assert_array_equal(r.anomaly_map, result_t100.anomaly_map)


def _dicom_series(folder: Path) -> Path:
    import pydicom

    from data_prep.dicom import write_dicom_series

    files = write_dicom_series(volume(SHAPE), AFFINE, folder, uid_seed=1)
    for f in files:  # as a real export would: identifiers the app must never show or use in a name
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = "DOE^JANE", "MRN-4711"
        ds.save_as(f)
    return folder


def test_dicom_series_folder_and_zip_without_identifiers(anoddpm, tmp_path: Path):
    folder = _dicom_series(tmp_path / "DOE_JANE" / "t1")
    vol = open_dicom_folder(folder, tmp_path / "w")
    assert vol.kind == "dicom" and vol.label == f"DICOM series ({SHAPE[2]} slices)"
    r = explore_volume(anoddpm, vol, 100)
    assert r.shape == SHAPE
    np.testing.assert_allclose(r.affine, AFFINE, atol=1e-3)  # the series' geometry, in RAS
    name = map_file_name(r)
    assert name.startswith("dicom_series_") and "DOE" not in name and "JANE" not in name
    header = bytes(nib.load(vol.path).header.binaryblock) + bytes(_load_map_header(r, tmp_path))
    assert b"DOE" not in header and b"MRN" not in header

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"DOE_JANE/t1/{f.name}")
        zf.writestr("../outside.txt", "a path that must not escape the work folder")
    zvol = open_upload(buf.getvalue(), "export.zip", tmp_path / "w")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "w" / "outside.txt").exists()
    assert zvol.label == vol.label and "DOE" not in zvol.stem
    rz = explore_volume(anoddpm, zvol, 100)
    np.testing.assert_allclose(rz.anomaly_map, r.anomaly_map, atol=1e-5)


def _load_map_header(result, tmp_path: Path) -> bytes:
    return nib.load(write_map_nifti(result, tmp_path / "maps")).header.binaryblock


def test_overlay_colours_only_the_map():
    img = np.zeros((8, 8), np.float32)
    amap = np.zeros((8, 8), np.float32)
    amap[2, 3] = 1.0
    rgb = overlay_rgb(img, amap, vmax=1.0, opacity=1.0, threshold=0.1)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    grey = np.full(3, 128, np.uint8)
    assert np.all(rgb[0, 0] == grey) and not np.all(rgb[2, 3] == grey)
