"""The Explorer web app: anomaly maps of a trained bundle on a user's volume, and the simplex-noise visualiser.

    .venv/bin/streamlit run scripts/explorer.py

One entry point with two pages (``st.navigation``): the Anomaly Explorer below and
``scripts/simplex_visualizer.py``. The Explorer opens a NIfTI volume or a DICOM series (upload, or a path on
the server), runs ``anoddpm_simplex`` (partial diffusion to ``t``) or ``ddim_classifier_guidance`` (DDIM
encoding to ``L``, guided decoding with scale ``s``) from the bundle's own configs and checkpoints, and shows
image / reconstruction / map overlay slice by slice; the map downloads as NIfTI on the input's grid. All
non-UI logic lives in :mod:`engines.explore`. The figures of the last computation are kept in
``st.session_state["explorer"]`` (read by ``tests/scripts/test_explorer.py``). See ``docs/explorer.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

HERE = Path(__file__).resolve().parent
TITLE = "Anomaly Explorer"
BUNDLE_LABELS = {
    "anoddpm_simplex": "AnoDDPM: simplex-noise DDPM, partial diffusion to t",
    "ddim_classifier_guidance": "Guided DDIM: encode to L, decode toward 'healthy' with scale s",
}


# ------------------------------------------------------------------------------------------------------------
# cached work: the model once per checkpoint set, inputs once per content, results per (content, bundle, setting)
# ------------------------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the trained bundle ...", max_entries=4)
def load_bundle(name: str, ckpt_dir: str, device: str, signature: tuple) -> Any:
    """The bundle built from its configs; ``signature`` (sizes, mtimes) reloads rewritten checkpoints."""
    from engines.explore import load_anomaly_bundle

    return load_anomaly_bundle(name, ckpt_dir, device)


@st.cache_resource(show_spinner="Reading the upload ...", max_entries=8)
def open_uploaded(file_id: str, name: str, size: int, _data: bytes) -> Any:
    """An uploaded NIfTI or DICOM zip (keyed by Streamlit's upload id, which changes with every upload)."""
    from engines.explore import open_upload

    return open_upload(_data, name)


@st.cache_resource(show_spinner="Reading the volume ...", max_entries=8)
def open_server_path(path: str, signature: tuple) -> Any:
    """A NIfTI file or DICOM folder on the server (re-read when a file's size or mtime changes)."""
    from engines.explore import open_path

    return open_path(path)


@st.cache_resource(show_spinner=False, max_entries=12)
def compute(
    name: str,
    ckpt_dir: str,
    device: str,
    ckpt_sig: tuple,
    digest: str,
    setting: int | str,
    _bundle: Any,
    _volume: Any,
) -> Any:
    """One volume at one setting; cached, so scrolling slices and going back to a setting is instant."""
    from engines.explore import explore_volume

    return explore_volume(_bundle, _volume, setting)


def stat_signature(path: str) -> tuple:
    """Sizes and mtimes of a file or of a folder's files: a cheap cache key (the digest reads every byte)."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            return tuple(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()
            )
        s = p.stat()
        return ((p.name, s.st_size, s.st_mtime_ns),)
    except OSError:
        return ()


# ------------------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------------------


def _sidebar_input() -> tuple[Any, str | None]:
    """Upload or server path; returns ``(VolumeInput or None, error message or None)``."""
    from transforms.errors import InputDataError

    st.header("Volume")
    upload = st.file_uploader(
        "NIfTI volume (.nii, .nii.gz) or DICOM series (.zip of .dcm files)",
        type=["nii", "gz", "zip"],
        key="upload",
    )
    server_path = st.text_input(
        "... or a path on the server: NIfTI file or DICOM series folder",
        key="server_path",
        placeholder="/data/sub-01_T1w.nii.gz",
    ).strip()
    try:
        if upload is not None:
            return open_uploaded(upload.file_id, upload.name, upload.size, upload.getvalue()), None
        if server_path:
            return open_server_path(server_path, stat_signature(server_path)), None
    except InputDataError as e:
        return None, str(e)
    except Exception as e:  # anything else still names the input
        where = upload.name if upload is not None else server_path
        return None, f"{where}: cannot open ({type(e).__name__}: {e})"
    return None, None


def explorer_page() -> None:
    """The Anomaly Explorer page."""
    import torch

    from engines.explore import (
        BUNDLES,
        checkpoint_signature,
        default_ckpt_dir,
        map_file_name,
        map_nifti_bytes,
        overlay_rgb,
        to_unit,
    )
    from transforms.errors import InputDataError

    st.title(TITLE)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with st.sidebar:
        volume, input_error = _sidebar_input()
        st.header("Model")
        name = st.selectbox(
            "Anomaly bundle",
            list(BUNDLES),
            key="bundle",
            help="; ".join(f"{k}: {v}" for k, v in BUNDLE_LABELS.items()),
        )
        st.caption(BUNDLE_LABELS[name])
        # one key per bundle, so switching the bundle shows that bundle's own default folder
        ckpt_dir = st.text_input(
            "Checkpoint folder", value=str(default_ckpt_dir(name)), key=f"ckpt_dir_{name}"
        ).strip()

    state: dict[str, Any] = {"bundle": name, "device": device}
    st.session_state["explorer"] = state
    if input_error:
        st.error(input_error)
        state["error"] = input_error
        return
    try:
        sig = checkpoint_signature(name, ckpt_dir)
        bundle = load_bundle(name, ckpt_dir, device, sig)
    except (InputDataError, FileNotFoundError, ValueError) as e:
        st.error(f"Cannot load {name} from {ckpt_dir}: {e}")
        state["error"] = str(e)
        return
    except Exception as e:  # e.g. a config that no longer builds: say so instead of a traceback page
        st.error(f"Cannot load {name} from {ckpt_dir}: {type(e).__name__}: {e}")
        state["error"] = str(e)
        return

    with st.sidebar:
        st.header("Method")
        T = bundle.num_train_timesteps
        if bundle.guided:
            from engines.guided import parse_guided_setting

            level0, scale0 = parse_guided_setting(str(bundle.default_setting))
            level = st.slider(f"L: DDIM encoding level (of {T} steps)", 1, T, level0, key="level")
            scale = st.slider(
                "s: guidance scale toward 'healthy'", 0.0, 500.0, float(scale0), 5.0, key="scale"
            )
            setting = bundle.setting(level=level, scale=scale)
        else:
            t = st.slider(
                f"t: noise steps of the partial diffusion (of {T})",
                1,
                T,
                int(bundle.default_setting),
                key="t",
            )
            setting = bundle.setting(t=t)
        st.header("Display")
        opacity = st.slider("map opacity", 0.0, 1.0, 0.6, 0.05, key="opacity")
        threshold = st.slider("hide map below (fraction of scale)", 0.0, 1.0, 0.1, 0.05, key="threshold")
        st.caption(f"device: {device}; checkpoints: {', '.join(p.name for p in bundle.checkpoints.values())}")

    if volume is None:
        st.info(
            "Open a volume in the sidebar: upload a NIfTI file or a .zip of a DICOM series, or type the path of "
            "a NIfTI file or DICOM series folder on the server."
        )
        return
    state.update(label=volume.label, digest=volume.digest, setting=setting)

    try:
        with st.spinner(f"Computing {name} at {setting} on {volume.label} ({device}) ..."):
            result = compute(name, ckpt_dir, device, sig, volume.digest, setting, bundle, volume)
    except InputDataError as e:
        st.error(str(e))
        state["error"] = str(e)
        return
    except Exception as e:  # a failing run must not take the page down; say what failed on which input
        st.error(f"{volume.label}: {name} at {setting} failed ({type(e).__name__}: {e})")
        state["error"] = str(e)
        return

    n = result.n_slices
    if not 0 <= st.session_state.get("slice", n // 2) < n:
        st.session_state["slice"] = n // 2  # a new volume with fewer slices
    k = st.slider(f"{result.plane} slice", 0, n - 1, n // 2, key="slice")
    vmax = result.map_scale
    img, rec, amap = (result.slice(a, k) for a in (result.image, result.recon, result.anomaly_map))
    st.caption(
        f"{volume.label}: {result.shape[0]}x{result.shape[1]}x{result.shape[2]} voxels; {name} at "
        f"{result.setting_name}; map colour scale 0..{vmax:.4g} (99.5th percentile in the foreground); "
        f"patient's right on the right, anterior up"
    )
    cols = st.columns(3)
    cols[0].image(to_unit(img), caption="image (normalised to [-1, 1])", width="stretch")
    cols[1].image(to_unit(rec), caption=f"reconstruction ({result.setting_name})", width="stretch")
    cols[2].image(
        overlay_rgb(img, amap, vmax, opacity, threshold),
        caption="anomaly map over the image",
        width="stretch",
    )
    m = st.columns(4)
    in_fg = result.anomaly_map[result.brain_mask > 0]
    m[0].metric("map max (volume)", f"{float(result.anomaly_map.max()):.4g}")
    m[1].metric("map mean (foreground)", f"{float(in_fg.mean()) if in_fg.size else 0.0:.4g}")
    m[2].metric("map max (slice)", f"{float(amap.max()):.4g}")
    m[3].metric("compute time (s)", f"{result.seconds:.1f}")

    file_name = map_file_name(result)
    st.download_button(
        "Download the anomaly map (NIfTI, input's grid and affine)",
        data=map_nifti_bytes(result),
        file_name=file_name,
        mime="application/gzip",
        key="download_map",
    )
    with st.expander("Save the map on the server"):
        folder = st.text_input("folder", key="save_dir")
        if st.button("Save", key="save_map") and folder.strip():
            from engines.explore import write_map_nifti

            try:
                st.success(f"written: {write_map_nifti(result, Path(folder.strip()) / file_name)}")
            except OSError as e:
                st.error(f"{folder}: cannot write the map ({e})")
    state.update(
        setting=result.setting,
        n_slices=n,
        slice=k,
        shape=result.shape,
        map_sum=float(result.anomaly_map.sum(dtype="float64")),
        map_max=float(result.anomaly_map.max()),
        map_scale=vmax,
        file_name=file_name,
        seconds=result.seconds,
    )


def main() -> None:
    """The app: page config and navigation between the two pages."""
    st.set_page_config(page_title="meddiff Explorer", layout="wide")
    # the simplex page is run as its own script (it keeps working alone with `streamlit run`)
    pages = [
        st.Page(explorer_page, title=TITLE, url_path="explorer", default=True),
        st.Page(
            os.fspath(HERE / "simplex_visualizer.py"), title="Simplex noise (AnoDDPM)", url_path="simplex"
        ),
    ]
    st.navigation(pages).run()


if __name__ == "__main__":
    main()
