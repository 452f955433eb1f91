"""What the Explorer app (``scripts/explorer.py``) does besides drawing: open a volume, load a trained anomaly
bundle from its own configs, compute image / reconstruction / anomaly map on the volume's grid, write the map.

* :func:`load_anomaly_bundle` builds ``network``, ``anomaly_inferer``, ``volume_inferer`` and ``preprocessing``
  of ``anoddpm_simplex`` or ``ddim_classifier_guidance`` with ``monai.bundle.ConfigParser`` from the bundle's
  real training + inference configs (the same merge ``python -m monai.bundle run`` does), and fills them with
  the trained weights through :func:`engines.checkpoint.load_weights` (``weights_only``: a checkpoint cannot
  run code). Nothing is redefined here, so the app computes exactly what the bundle's ``inference.json``
  writes.
* :func:`open_path` / :func:`open_upload` turn what the user chose (a NIfTI file, a DICOM series folder, an
  uploaded ``.nii(.gz)`` or ``.zip`` of ``.dcm`` files) into a :class:`VolumeInput`: one checked NIfTI file
  plus a content digest (the cache key) and a label free of patient identifiers.
* :func:`explore_volume` runs the bundle on one volume at one setting (``t`` for AnoDDPM, ``"L<L>_s<s>"`` for
  guided DDIM) and returns an :class:`ExploreResult` whose arrays lie voxel for voxel on the input file's grid.
* :func:`write_map_nifti` / :func:`map_nifti_bytes` give the map as NIfTI with the input's affine.

The bundle configs are Python: ``$`` expressions are evaluated and ``_target_`` names are imported. Only
configs of this repository (or of a folder the user trusts) must be loaded; see ``docs/explorer.md``.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.atomic import atomic_path, atomic_write_bytes
from engines.anomaly import VolumeAnomalyInferer, setting_key
from engines.bundle import bundle_root
from engines.checkpoint import load_weights
from engines.guided import check_healthy_index, guided_setting, parse_guided_setting
from transforms.errors import InputDataError

__all__ = [
    "ANODDPM",
    "BUNDLES",
    "GUIDED",
    "AnomalyBundle",
    "BundleSpec",
    "ExploreResult",
    "VolumeInput",
    "bundle_parser",
    "checkpoint_paths",
    "checkpoint_signature",
    "default_ckpt_dir",
    "default_device",
    "default_work_dir",
    "explore_volume",
    "load_anomaly_bundle",
    "map_file_name",
    "map_nifti_bytes",
    "open_dicom_folder",
    "open_dicom_zip",
    "open_nifti_bytes",
    "open_nifti_path",
    "open_path",
    "open_upload",
    "overlay_rgb",
    "to_unit",
    "write_map_nifti",
]

logger = logging.getLogger(__name__)

ANODDPM = "anoddpm_simplex"
GUIDED = "ddim_classifier_guidance"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# an upload is held in memory by Streamlit anyway; the cap only stops a zip bomb from filling the disk
MAX_ZIP_BYTES = 4 << 30
MAX_ZIP_FILES = 5000


@dataclass(frozen=True)
class BundleSpec:
    """What the Explorer needs to know about one anomaly bundle beyond its configs.

    Args:
        name: the bundle's folder name.
        configs: config files merged in order (training config first: it defines the network and schedulers the
            inference config refers to).
        checkpoints: config ids whose values are the checkpoint files, with the config that trains each.
        setting_id: the config id of the inference setting (``t`` or ``setting``).
        labels_id: config id of the classifier's class-order file, if the bundle has one.
    """

    name: str
    configs: tuple[str, ...]
    checkpoints: Mapping[str, str]
    setting_id: str
    labels_id: str | None = None


BUNDLES: dict[str, BundleSpec] = {
    ANODDPM: BundleSpec(
        name=ANODDPM,
        configs=("train.json", "inference.json"),
        checkpoints={"checkpoint": "train.json"},
        setting_id="t",
    ),
    GUIDED: BundleSpec(
        name=GUIDED,
        configs=("train_diffusion.json", "inference.json"),
        checkpoints={
            "diffusion_checkpoint": "train_diffusion.json",
            "classifier_checkpoint": "train_classifier.json",
        },
        setting_id="setting",
        labels_id="classifier_labels",
    ),
}


def _spec(name: str) -> BundleSpec:
    if name not in BUNDLES:
        raise ValueError(f"unknown anomaly bundle {name!r}; the Explorer knows {sorted(BUNDLES)}")
    return BUNDLES[name]


def default_device() -> torch.device:
    """``cuda:0`` when a GPU is visible, else the CPU (the bundles' own ``device`` expression).

    Returns:
        The device.
    """
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def default_ckpt_dir(name: str) -> Path:
    """``bundles/<name>/models``, where the bundle's training configs save the final weights.

    Args:
        name: the bundle.

    Returns:
        The folder (it need not exist).

    Raises:
        FileNotFoundError: the bundle folder cannot be found (see :func:`engines.bundle.bundle_root`).
    """
    return Path(bundle_root(name)) / "models"


def default_work_dir() -> Path:
    """A private folder for uploads and converted DICOM series: ``$MEDDIFF_EXPLORER_DIR`` or a per-user temp folder.

    Returns:
        The folder, created with mode 0700 (uploads are patient images: other accounts on a shared
        server must not read them).
    """
    env = os.environ.get("MEDDIFF_EXPLORER_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"meddiff-explorer-{uid}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------------------
# the bundle
# ------------------------------------------------------------------------------------------------------------


def bundle_parser(
    name: str,
    ckpt_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> Any:
    """A ``ConfigParser`` holding the bundle's training + inference configs, set up for interactive use.

    Overridden ids: ``bundle_root`` (the bundle's folder), ``ckpt_dir``, ``device``, ``dataset_dir`` (set to a
    path that is never read: the configs' default builds the 64-subject demo cohort on first use, which an
    inference on a user's volume must not trigger) and, for guided DDIM, ``num_classes`` (the configs derive it
    from the training datalist; here it comes from the checkpoint folder's class-order file).

    Args:
        name: ``"anoddpm_simplex"`` or ``"ddim_classifier_guidance"``.
        ckpt_dir: checkpoint folder; default ``bundles/<name>/models``.
        device: where the networks go; default :func:`default_device`.
        overrides: further ``{config id: value}`` (e.g. ``{"image_size": 32}``), applied last.
        num_classes: the classifier's class count (guided DDIM only); default 2 (healthy, diseased).

    Returns:
        The ``monai.bundle.ConfigParser``; nothing is instantiated yet.

    Raises:
        ValueError: for an unknown bundle.
        FileNotFoundError: the bundle's configs are missing.
    """
    from monai.bundle import ConfigParser

    spec = _spec(name)
    root = Path(bundle_root(name))
    files = [root / "configs" / c for c in spec.configs]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: bundle config missing")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    dev = torch.device(device) if device is not None else default_device()
    parser["bundle_root"] = str(root)
    parser["ckpt_dir"] = str(Path(ckpt_dir) if ckpt_dir is not None else root / "models")
    # an expression (not the object) so the config stays printable and each parse makes its own device
    parser["device"] = f"$torch.device({str(dev)!r})"
    parser["dataset_dir"] = str(root / "no-dataset-in-explorer")
    if spec.labels_id is not None:
        parser["num_classes"] = int(num_classes) if num_classes is not None else 2
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def checkpoint_paths(name: str, ckpt_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The files a bundle's inference loads, as its configs name them.

    Args:
        name: the bundle.
        ckpt_dir: checkpoint folder; default ``bundles/<name>/models``.

    Returns:
        ``{config id: path}``: the checkpoint ids of :data:`BUNDLES` and, for guided DDIM, ``classifier_labels``.
    """
    spec = _spec(name)
    parser = bundle_parser(name, ckpt_dir, device="cpu")
    ids = [*spec.checkpoints, *([spec.labels_id] if spec.labels_id else [])]
    return {i: Path(parser.get_parsed_content(i)) for i in ids}


def checkpoint_signature(name: str, ckpt_dir: str | os.PathLike | None = None) -> tuple:
    """Path, size and modification time of each checkpoint file (missing ones as ``None``).

    A cache of loaded models keyed on this reloads a checkpoint that training has rewritten.

    Args:
        name: the bundle.
        ckpt_dir: checkpoint folder.

    Returns:
        A hashable tuple.
    """
    sig = []
    for key, path in sorted(checkpoint_paths(name, ckpt_dir).items()):
        st = path.stat() if path.is_file() else None
        sig.append((key, str(path), None if st is None else (st.st_size, st.st_mtime_ns)))
    return tuple(sig)


@dataclass
class AnomalyBundle:
    """A trained anomaly bundle, built from its configs and ready to run on volumes.

    Attributes:
        name: the bundle.
        network: the epsilon-prediction diffusion UNet (eval mode, on ``device``).
        anomaly_inferer: the 2D inferer (:class:`engines.AnomalyInferer` or :class:`engines.GuidedDDIMInferer`).
        volume_inferer: the config's :class:`engines.VolumeAnomalyInferer` (slicing axis, model size, batch).
        preprocessing: the config's invertible loading ``Compose`` (load, RAS, foreground mask, [-1, 1]).
        device: where the networks are.
        default_setting: the config's ``t`` / ``setting``.
        num_train_timesteps: ``T``, the bound of ``t`` and ``L``.
        checkpoints: the files loaded.
        class_names: the classifier's classes (guided DDIM), else empty.
    """

    name: str
    network: torch.nn.Module
    anomaly_inferer: Any
    volume_inferer: VolumeAnomalyInferer
    preprocessing: Any
    device: torch.device
    default_setting: int | str
    num_train_timesteps: int
    checkpoints: dict[str, Path] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    @property
    def guided(self) -> bool:
        """Whether the setting is guided DDIM's ``(L, s)`` rather than AnoDDPM's ``t``."""
        return self.name == GUIDED

    @property
    def slice_axis(self) -> int:
        """The RAS axis the 2D model slices the volume along (2: axial)."""
        return int(self.volume_inferer.axis)

    def setting(
        self, t: int | None = None, level: int | None = None, scale: float | None = None
    ) -> int | str:
        """The setting key of a UI choice, checked against the schedule.

        Args:
            t: AnoDDPM's number of diffusion steps (``1 <= t <= T``).
            level: guided DDIM's encoding level ``L`` (``1 <= L <= T``).
            scale: guided DDIM's guidance scale ``s >= 0``.

        Returns:
            ``t`` for AnoDDPM, ``"L<L>_s<s>"`` for guided DDIM; a missing value is taken from the default.

        Raises:
            ValueError: a value out of range.
        """
        if self.guided:
            default_level, default_scale = parse_guided_setting(str(self.default_setting))
            name = guided_setting(
                default_level if level is None else level, default_scale if scale is None else scale
            )
            self.anomaly_inferer.setting(name)  # raises for L outside [1, T] or s < 0
            return name
        value = int(self.default_setting if t is None else t)
        if not 1 <= value <= self.num_train_timesteps:
            raise ValueError(f"t must be in [1, {self.num_train_timesteps}] (diffusion steps), got {value}")
        return value

    def canonical(self, setting: int | str | None = None) -> int | str:
        """The checked, canonical key of a setting given as a key (``250``, ``"L500_s50.0"``) or ``None``.

        Args:
            setting: ``t``, ``"L<L>_s<s>"``, an integer ``L`` (guided DDIM, default ``s``) or ``None`` (default).

        Returns:
            As :meth:`setting`.

        Raises:
            ValueError: a malformed or out-of-range setting.
        """
        key = setting_key(self.default_setting if setting is None else setting)
        if not self.guided:
            if not isinstance(key, int):
                raise ValueError(f"{self.name} takes a number of diffusion steps t, got {key!r}")
            return self.setting(t=key)
        if isinstance(key, int):
            return self.setting(level=key)
        level, scale = parse_guided_setting(key)
        return self.setting(level=level, scale=scale)


def _labels(path: Path, healthy_index: int) -> list[str]:
    if not path.is_file():
        raise InputDataError(
            "class-order file does not exist (train_classifier.json writes it beside classifier.pt); "
            "the guidance needs it to know which output is 'healthy'",
            path,
        )
    try:
        return check_healthy_index(path, healthy_index)
    except json.JSONDecodeError as e:
        raise InputDataError(f"not valid JSON ({e})", path) from e
    except ValueError as e:
        # check_healthy_index names the file itself; keep its words, mark the file for the UI
        raise InputDataError(str(e).replace(f"{path}: ", ""), path) from e


def load_anomaly_bundle(
    name: str,
    ckpt_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AnomalyBundle:
    """Build a trained anomaly bundle from its real configs and load its weights.

    Every file is checked before any network is built, so a missing checkpoint is reported at once and by name.

    Args:
        name: ``"anoddpm_simplex"`` or ``"ddim_classifier_guidance"``.
        ckpt_dir: checkpoint folder; default ``bundles/<name>/models``.
        device: default :func:`default_device`.
        overrides: further config overrides (see :func:`bundle_parser`), e.g. another ``t`` / ``setting``
            as the default, or ``image_size``.

    Returns:
        The :class:`AnomalyBundle`.

    Raises:
        ValueError: an unknown bundle.
        InputDataError: naming the file: a checkpoint or class-order file missing, unreadable, carrying code
            (:class:`engines.UnsafeCheckpointError`) or not fitting the configured network.
    """
    spec = _spec(name)
    dev = torch.device(device) if device is not None else default_device()
    paths = checkpoint_paths(name, ckpt_dir)
    for key, train_config in spec.checkpoints.items():
        if not paths[key].is_file():
            raise InputDataError(
                f"checkpoint file does not exist; train it with the bundle's {train_config} or choose the "
                "folder that holds it",
                paths[key],
            )
    parser = bundle_parser(name, ckpt_dir, dev, overrides)
    class_names: list[str] = []
    if spec.labels_id is not None:
        class_names = _labels(paths[spec.labels_id], int(parser.get_parsed_content("healthy_index")))
        # before anything is instantiated: the classifier's head (and a class-conditional UNet) take this count
        parser["num_classes"] = len(class_names)

    network = parser.get_parsed_content("network")
    ckpt_key = next(iter(spec.checkpoints))
    load_weights(network, paths[ckpt_key], map_location=dev)
    # built after the network: the inferer's own references (@network, @classifier) resolve to the same objects
    anomaly_inferer = parser.get_parsed_content("anomaly_inferer")
    if spec.name == GUIDED:
        load_weights(anomaly_inferer.classifier, paths["classifier_checkpoint"], map_location=dev)
    volume_inferer = parser.get_parsed_content("volume_inferer")
    if volume_inferer.slice_inferer is not anomaly_inferer:
        # lazily parsed references are shared; if MONAI ever re-instantiates, the loaded weights must still be used
        volume_inferer.slice_inferer = anomaly_inferer
    return AnomalyBundle(
        name=name,
        network=network.eval(),
        anomaly_inferer=anomaly_inferer,
        volume_inferer=volume_inferer,
        preprocessing=parser.get_parsed_content("preprocessing"),
        device=dev,
        default_setting=setting_key(parser.get_parsed_content(spec.setting_id)),
        num_train_timesteps=int(anomaly_inferer.scheduler.num_train_timesteps),
        checkpoints=paths,
        class_names=class_names,
    )


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeInput:
    """A volume ready for the bundle: one NIfTI file, its content digest and a label to show.

    Attributes:
        path: the NIfTI file the bundle reads (the user's own file, or a private copy/conversion).
        digest: SHA-256 of the content the user chose (file bytes; for a DICOM series every file's bytes):
            the cache key of results.
        label: what the UI shows and errors name: the file name or path the user gave; for DICOM a
            neutral ``"DICOM series (N slices)"`` (a folder or zip name may hold a patient's name).
        kind: ``"nifti"`` or ``"dicom"``.
        stem: a file-name stem for outputs, free of identifiers for DICOM (``dicom_series_<digest>``).
    """

    path: Path
    digest: str
    label: str
    kind: str
    stem: str


def _sha256_file(path: Path, h: Any | None = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _nifti_suffix(name: str) -> str | None:
    low = name.lower()
    return next((s for s in NIFTI_SUFFIXES if low.endswith(s)), None)


def _safe_stem(name: str) -> str:
    stem = Path(name).name
    suffix = _nifti_suffix(stem)
    stem = stem[: -len(suffix)] if suffix else Path(stem).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "volume"


def _check_nifti(path: Path, label: str) -> tuple[int, ...]:
    """Read the header: a clear error for non-NIfTI files and 2D images before any model runs."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise InputDataError(f"cannot be read as NIfTI ({type(e).__name__}: {e})", label) from e
    # trailing singleton axes (a 4D file with one time point) do not make a volume 4D
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputDataError(
            f"is a 2D image (shape {shape}); the Explorer needs a 3D volume (the model slices it)", label
        )
    if len(shape) > 3:
        raise InputDataError(f"is a {len(shape)}D image (shape {shape}); choose one 3D volume", label)
    return shape


def open_nifti_path(path: str | os.PathLike) -> VolumeInput:
    """A NIfTI file on the server, used in place.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file.

    Returns:
        The :class:`VolumeInput` (label: the path).

    Raises:
        InputDataError: naming the file: missing, not NIfTI, or not 3D.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputDataError("file does not exist", path)
    if _nifti_suffix(path.name) is None:
        raise InputDataError("not a NIfTI file (.nii or .nii.gz); give a DICOM series as its folder", path)
    _check_nifti(path, str(path))
    return VolumeInput(path, _sha256_file(path).hexdigest(), str(path), "nifti", _safe_stem(path.name))


def open_nifti_bytes(data: bytes, name: str, work_dir: str | os.PathLike | None = None) -> VolumeInput:
    """An uploaded NIfTI, stored once per content in the private work folder.

    Args:
        data: the file's bytes.
        name: the uploaded file's name (only its suffix and stem are used).
        work_dir: default :func:`default_work_dir`.

    Returns:
        The :class:`VolumeInput` (label: the upload's name).

    Raises:
        InputDataError: naming the upload: not NIfTI or not 3D.
    """
    digest = hashlib.sha256(data).hexdigest()
    # the suffix decides the reader; gzip's magic is trusted over a misnamed file
    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    folder = Path(work_dir or default_work_dir()) / digest
    path = folder / f"input{suffix}"
    if not path.is_file():
        atomic_write_bytes(path, data)
    _check_nifti(path, name)
    return VolumeInput(path, digest, name, "nifti", _safe_stem(name))


def _dicom_input(folder: Path, digest: str, work_dir: Path) -> VolumeInput:
    from data_prep.dicom import dicom_to_nifti

    out = work_dir / digest / "series.nii.gz"
    if not out.is_file():  # written atomically: present means complete
        dicom_to_nifti(folder, out)
    shape = _check_nifti(out, "DICOM series")
    # the slice count comes from the series read (SimpleITK stacks the slices along the third axis); no tag
    # value, folder or file name enters the label, which the page shows and errors repeat
    label = f"DICOM series ({shape[2]} slices)"
    return VolumeInput(out, digest, label, "dicom", f"dicom_series_{digest[:10]}")


def open_dicom_folder(folder: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> VolumeInput:
    """A DICOM series folder on the server, converted once (per content) to NIfTI.

    The series is read by :func:`data_prep.dicom.read_dicom_series` (checks for missing, duplicated or
    truncated slices and mixed series) and written as NIfTI with its RAS geometry; that NIfTI's affine is the
    one the map gets. No DICOM tag is shown or used in a name.

    Args:
        folder: the folder holding one series.
        work_dir: default :func:`default_work_dir`.

    Returns:
        The :class:`VolumeInput`.

    Raises:
        InputDataError: naming the folder or the faulty file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputDataError("no such folder", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InputDataError("no DICOM files", folder)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        _sha256_file(p, h)
    return _dicom_input(folder, h.hexdigest(), Path(work_dir or default_work_dir()))


def open_dicom_zip(data: bytes, name: str, work_dir: str | os.PathLike | None = None) -> VolumeInput:
    """An uploaded ``.zip`` of one DICOM series, extracted (flat, names sanitised) and converted once per content.

    Args:
        data: the zip's bytes.
        name: the upload's name (errors name it).
        work_dir: default :func:`default_work_dir`.

    Returns:
        The :class:`VolumeInput`.

    Raises:
        InputDataError: naming the upload: not a zip, too large, no DICOM files, or a faulty series.
    """
    digest = hashlib.sha256(data).hexdigest()
    work = Path(work_dir or default_work_dir())
    target = work / digest / "dicom"
    out = work / digest / "series.nii.gz"
    n_files = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [
                m
                for m in zf.infolist()
                if not m.is_dir()
                and "__MACOSX" not in m.filename
                and not Path(m.filename).name.startswith(".")
            ]
            if len(members) > MAX_ZIP_FILES or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise InputDataError(
                    f"archive too large ({len(members)} files; at most {MAX_ZIP_FILES} files, "
                    f"{MAX_ZIP_BYTES >> 30} GiB)",
                    name,
                )
            n_files = len(members)
            if not out.is_file():
                target.mkdir(parents=True, exist_ok=True)
                for i, m in enumerate(members):
                    # flat, index-prefixed names: no path from the archive is trusted (no "../" escape) and
                    # files of equal names in different sub-folders do not overwrite each other
                    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(m.filename).name)
                    (target / f"{i:05d}_{safe}").write_bytes(zf.read(m))
    except zipfile.BadZipFile as e:
        raise InputDataError(f"not a zip archive ({e})", name) from e
    if n_files == 0:
        raise InputDataError("the archive holds no files", name)
    try:
        return _dicom_input(target, digest, work)
    except InputDataError as e:
        # the private extraction folder means nothing to the user: name the upload
        fault = e.fault if e.path is None else f"{e.fault} ({Path(e.path).name})"
        raise InputDataError(fault, name) from e


def open_path(path: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> VolumeInput:
    """A server path: a DICOM series folder, a ``.zip`` of one, or a NIfTI file.

    Args:
        path: the path.
        work_dir: default :func:`default_work_dir`.

    Returns:
        The :class:`VolumeInput`.

    Raises:
        InputDataError: naming the path and the fault.
    """
    p = Path(str(path).strip()).expanduser()
    if p.is_dir():
        return open_dicom_folder(p, work_dir)
    if p.suffix.lower() == ".zip" and p.is_file():
        return open_dicom_zip(p.read_bytes(), str(p), work_dir)
    return open_nifti_path(p)


def open_upload(data: bytes, name: str, work_dir: str | os.PathLike | None = None) -> VolumeInput:
    """An uploaded file: ``.zip`` (DICOM series) or NIfTI.

    Args:
        data: the bytes.
        name: the upload's file name.
        work_dir: default :func:`default_work_dir`.

    Returns:
        The :class:`VolumeInput`.

    Raises:
        InputDataError: naming the upload and the fault.
    """
    if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
        return open_dicom_zip(data, name, work_dir)
    return open_nifti_bytes(data, name, work_dir)


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ExploreResult:
    """Image, reconstruction and anomaly map of one volume at one setting, on the input file's grid.

    Attributes:
        image: the normalised input ([-1, 1] inside the foreground) the model saw, ``(X, Y, Z)``.
        recon: the model's "healthy" reconstruction, same scale and shape.
        anomaly_map: the bundle's map (AnoDDPM: squared residual; guided DDIM: absolute residual), zero
            outside the foreground mask, as ``inference.json`` writes it.
        brain_mask: the foreground mask (Otsu, largest component).
        affine: the input file's 4x4 voxel-to-RAS affine.
        bundle: the bundle's name.
        setting: ``t`` or ``"L<L>_s<s>"``.
        label: the input's label.
        stem: file-name stem of outputs.
        slice_axis: the RAS axis the model sliced along.
        seconds: wall time of the computation (loading, model, inversion).
    """

    image: np.ndarray
    recon: np.ndarray
    anomaly_map: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    bundle: str
    setting: int | str
    label: str
    stem: str
    slice_axis: int = 2
    seconds: float = 0.0
    _nifti: bytes | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The input's voxel grid."""
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def setting_name(self) -> str:
        """``t250`` or ``L500_s50``."""
        return f"t{self.setting}" if isinstance(self.setting, int) else str(self.setting)

    @property
    def map_scale(self) -> float:
        """The top of the colour scale: the 99.5th percentile of the map inside the mask (its maximum if that is 0).

        A fixed, per-volume scale keeps colours comparable while scrolling; the percentile keeps a few
        extreme voxels from washing out the rest.
        """
        inside = self.anomaly_map[self.brain_mask > 0]
        vals = inside if inside.size else self.anomaly_map.ravel()
        top = float(np.percentile(vals, 99.5)) if vals.size else 0.0
        return top if top > 0 else float(vals.max(initial=0.0))

    def ras(self, array: np.ndarray) -> np.ndarray:
        """A view of an array of this result reoriented to RAS (the model's and the radiologist's axes).

        Args:
            array: one of the result's ``(X, Y, Z)`` arrays.

        Returns:
            A view (no copy) in RAS order.
        """
        import nibabel as nib

        ornt = nib.orientations.io_orientation(self.affine)
        return nib.orientations.apply_orientation(array, ornt)

    @property
    def plane(self) -> str:
        """The name of the slices shown: sagittal, coronal or axial (slices across RAS axis 0, 1 or 2)."""
        return ("sagittal", "coronal", "axial")[self.slice_axis]

    @property
    def n_slices(self) -> int:
        """Number of slices along the model's slicing axis (RAS)."""
        return int(self.ras(self.image).shape[self.slice_axis])

    def slice(self, array: np.ndarray, index: int) -> np.ndarray:
        """One slice for display: RAS slice ``index`` along the slicing axis, rotated so anterior/superior is up.

        Args:
            array: one of the result's arrays.
            index: ``0 <= index < n_slices``.

        Returns:
            A 2D array (for an axial slice: patient's right on the viewer's right, anterior up).

        Raises:
            IndexError: index out of range.
        """
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} outside 0..{self.n_slices - 1}")
        return np.rot90(np.take(self.ras(array), index, axis=self.slice_axis))


def _to_input_grid(preprocessing: Any, value: torch.Tensor, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """Undo the loading transforms (reorientation) on ``value`` as ``engines.AnomalyMapWriter`` does."""
    from monai.data import MetaTensor

    m = MetaTensor(
        value.detach().float().cpu(),
        meta=dict(reference.meta),
        applied_operations=list(reference.applied_operations),
    )
    inv = preprocessing.inverse({"image": m})["image"]
    arr = np.asarray(inv.detach().cpu().numpy(), dtype=np.float32)
    arr = arr[0] if arr.ndim == 4 else arr
    affine = inv.affine.cpu().numpy() if hasattr(inv.affine, "cpu") else inv.affine
    return arr, np.asarray(affine, dtype=np.float64)


def explore_volume(
    bundle: AnomalyBundle, volume: VolumeInput, setting: int | str | None = None
) -> ExploreResult:
    """Run the bundle on one volume at one setting.

    The volume goes through the bundle's ``preprocessing`` (RAS, foreground mask, percentile scaling to
    [-1, 1]), its ``volume_inferer`` (slices at the model size, the 2D inferer, back to the volume grid) at
    ``setting`` only, the map is masked as ``AnomalyMapWriter`` masks it, and all arrays are put back on the
    input file's grid.

    Args:
        bundle: from :func:`load_anomaly_bundle`.
        volume: from :func:`open_path` / :func:`open_upload`.
        setting: ``t`` (AnoDDPM) or ``"L<L>_s<s>"`` (guided DDIM); default the config's.

    Returns:
        The :class:`ExploreResult` (arrays read-only: results are shared by a cache).

    Raises:
        InputDataError: naming the input's label: unreadable or not a 3D one-channel volume.
        ValueError: a setting out of range.
    """
    import nibabel as nib

    from transforms.pipeline import find_input_error

    # validated (and made canonical, "L500_s50.0" -> "L500_s50") before the minutes of compute
    key = bundle.canonical(setting)
    started = time.perf_counter()
    try:
        data = bundle.preprocessing({"image": str(volume.path)})
    except Exception as e:
        found = find_input_error(e)
        if found is None:
            raise
        raise InputDataError(found.fault, volume.label) from e
    image, mask = data["image"], data["brain_mask"]
    # a copy with only this setting: the cached bundle's own inferer stays as configured
    inferer = copy.copy(bundle.volume_inferer)
    inferer.t_values = [key]
    bundle.network.eval()
    x = image.as_tensor()[None].to(bundle.device, torch.float32)
    out = inferer(x, bundle.network)
    fg = torch.as_tensor(mask).float().cpu() > 0
    amap = out["maps"][key][0].float().cpu() * fg
    recon = out["recons"][key][0].float().cpu()

    arrays: dict[str, np.ndarray] = {}
    affine = None
    for name, value in (
        ("image", image.as_tensor()),
        ("recon", recon),
        ("anomaly_map", amap),
        ("brain_mask", fg.float()),
    ):
        arrays[name], affine = _to_input_grid(bundle.preprocessing, value, image)
    file_affine = np.asarray(nib.load(str(volume.path)).affine, dtype=np.float64)
    file_shape = tuple(int(s) for s in nib.load(str(volume.path)).shape[:3])
    if arrays["image"].shape != file_shape or not np.allclose(affine, file_affine, atol=1e-3):
        # the inverse must land exactly on the file's grid, else the downloaded map would be misaligned
        raise RuntimeError(
            f"{volume.label}: inverted grid {arrays['image'].shape} / affine {affine.tolist()} differs from the "
            f"file's {file_shape} / {file_affine.tolist()}"
        )
    for arr in arrays.values():
        arr.setflags(write=False)
    return ExploreResult(
        image=arrays["image"],
        recon=arrays["recon"],
        anomaly_map=arrays["anomaly_map"],
        brain_mask=arrays["brain_mask"],
        affine=file_affine,
        bundle=bundle.name,
        setting=key,
        label=volume.label,
        stem=volume.stem,
        slice_axis=bundle.slice_axis,
        seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------------------------
# output and display
# ------------------------------------------------------------------------------------------------------------


def _map_image(result: ExploreResult) -> Any:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(result.anomaly_map, dtype=np.float32), result.affine)
    img.header.set_xyzt_units("mm")
    # a neutral description: the method and setting, never the input's name (it may be a patient's)
    img.header["descrip"] = f"anomaly map {result.bundle} {result.setting_name}"[:79].encode()
    return img


def map_file_name(result: ExploreResult) -> str:
    """``<stem>_<bundle>_<setting>_anomaly_map.nii.gz`` (for DICOM the stem is ``dicom_series_<digest>``).

    Args:
        result: the result.

    Returns:
        The file name.
    """
    return f"{result.stem}_{result.bundle}_{result.setting_name}_anomaly_map.nii.gz"


def map_nifti_bytes(result: ExploreResult) -> bytes:
    """The anomaly map as a gzipped NIfTI (input's shape and affine), computed once per result.

    Args:
        result: the result.

    Returns:
        ``.nii.gz`` bytes.
    """
    if result._nifti is None:
        # compresslevel 6: a 256³ float map compresses in about a second, level 9 takes several
        result._nifti = gzip.compress(_map_image(result).to_bytes(), compresslevel=6, mtime=0)
    return result._nifti


def write_map_nifti(result: ExploreResult, path: str | os.PathLike) -> Path:
    """Write the anomaly map atomically (a temporary file renamed into place: never a partial file).

    Args:
        result: the result.
        path: a ``.nii.gz`` (or ``.nii``) file, or a folder (then :func:`map_file_name` inside it).

    Returns:
        The file written.
    """
    path = Path(path).expanduser()
    if path.is_dir() or _nifti_suffix(path.name) is None:
        path = path / map_file_name(result)
    img = _map_image(result)
    import nibabel as nib

    with atomic_path(path, _nifti_suffix(path.name) or ".nii.gz") as tmp:
        nib.save(img, tmp)
    logger.info("anomaly map written: %s", path)
    return path


def to_unit(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """``x`` mapped linearly from ``[lo, hi]`` to ``[0, 1]`` and clipped (for ``st.image``).

    Args:
        x: an array.
        lo: the value shown black.
        hi: the value shown white.

    Returns:
        float32 in ``[0, 1]``.
    """
    if hi <= lo:
        return np.zeros(np.shape(x), dtype=np.float32)
    return np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def overlay_rgb(
    image: np.ndarray,
    amap: np.ndarray,
    vmax: float,
    opacity: float = 0.6,
    threshold: float = 0.1,
    cmap: str = "inferno",
) -> np.ndarray:
    """The anomaly map blended over the grey image.

    Args:
        image: a slice in [-1, 1].
        amap: the map's slice.
        vmax: the map value shown at full colour (e.g. :attr:`ExploreResult.map_scale`).
        opacity: the colour's weight at ``vmax``; weaker values blend proportionally.
        threshold: fraction of ``vmax`` below which the map is not drawn (keeps the anatomy readable).
        cmap: a matplotlib colormap.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    from matplotlib import colormaps

    grey = to_unit(image)[..., None].repeat(3, axis=-1)
    level = to_unit(amap, 0.0, vmax) if vmax > 0 else np.zeros_like(grey[..., 0])
    colour = colormaps[cmap](level)[..., :3]
    alpha = (opacity * level * (level >= threshold))[..., None]
    return np.round(255.0 * ((1.0 - alpha) * grey + alpha * colour)).astype(np.uint8)
