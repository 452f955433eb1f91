"""Streamlit page: AnoDDPM simplex noise vs Gaussian noise along a cosine diffusion schedule.

    streamlit run scripts/simplex_visualizer.py

Sliders set the simplex noise (base frequency as a power of two, octaves, decay, seed) and the
diffusion step ``t``; the page shows the noise field and the image noised to ``t``,

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,

with ``eps`` unit-variance simplex noise (``transforms.simplex.simplex_noise``) next to Gaussian
``eps``. ``abar_t`` comes from MONAI's ``DDPMScheduler(num_train_timesteps=1000, schedule="cosine")``:
``t = 0`` is the clean image (``abar = 1``), ``t = 1..1000`` is the scheduler's step ``t - 1``.
The image is a mid-axial slice of the MNI152 template that nilearn ships (offline), or of an
uploaded NIfTI file, scaled to [-1, 1]. Figures shown as metrics are also kept in
``st.session_state["simplex_stats"]`` (read by ``tests/scripts/test_simplex_visualizer.py``).
"""

from __future__ import annotations

import gzip
import math
from typing import Any

import numpy as np
import streamlit as st
import torch

from transforms.simplex import simplex_noise

NUM_STEPS = 1000


@st.cache_data(show_spinner=False)
def template_slice() -> np.ndarray:
    """Mid-axial slice of nilearn's MNI152 template (2 mm), anterior up, scaled to [-1, 1]."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    return to_unit_range(np.rot90(vol[:, :, vol.shape[2] // 2]))


def nifti_slice(data: bytes, name: str) -> np.ndarray:
    """Mid slice along the last spatial axis of an uploaded NIfTI (``.nii`` or ``.nii.gz``), in [-1, 1]."""
    import nibabel as nib

    if name.endswith(".gz") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    arr = np.asarray(nib.Nifti1Image.from_bytes(data).get_fdata(), dtype=np.float32)
    while arr.ndim > 3:  # 4D: first volume
        arr = arr[..., 0]
    if arr.ndim == 3:
        arr = arr[:, :, arr.shape[2] // 2]
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"{name}: expected a 2D-4D image, got shape {arr.shape}")
    return to_unit_range(np.rot90(arr))


def to_unit_range(img: np.ndarray) -> np.ndarray:
    img = np.nan_to_num(np.ascontiguousarray(img, dtype=np.float32))
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img)
    return (2.0 * (img - lo) / (hi - lo) - 1.0).astype(np.float32)


def alpha_bar(t: int) -> float:
    """``abar_t`` of the cosine schedule; ``t = 0`` is the clean image."""
    from monai.networks.schedulers import DDPMScheduler

    if t <= 0:
        return 1.0
    sched = DDPMScheduler(num_train_timesteps=NUM_STEPS, schedule="cosine")
    return float(sched.alphas_cumprod[min(t, NUM_STEPS) - 1])


def lag1_corr(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].double(), x[..., :, 1:].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std(correction=0) * b.std(correction=0)))


def mse_psnr(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """MSE and PSNR (dB, peak-to-peak range 2 of [-1, 1] images; inf when identical)."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return mse, (math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse))


def compute(
    image: np.ndarray, log2_freq: float, octaves: int, decay: float, seed: int, t: int
) -> dict[str, Any]:
    """Noise fields, noised images and their statistics for one setting of the sliders."""
    x0 = torch.from_numpy(image)[None, None]
    shape = tuple(x0.shape)
    kw = dict(frequency=2.0**log2_freq, octaves=octaves, decay=decay)
    eps = simplex_noise(shape, generator=torch.Generator().manual_seed(seed), **kw)
    raw = simplex_noise(shape, normalise=False, generator=torch.Generator().manual_seed(seed), **kw)
    gauss = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ab = alpha_bar(t)
    xt_simplex = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * eps
    xt_gauss = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * gauss
    mse_s, psnr_s = mse_psnr(xt_simplex, x0)
    mse_g, psnr_g = mse_psnr(xt_gauss, x0)
    corr_s = float(torch.corrcoef(torch.stack([xt_simplex.flatten(), x0.flatten()]))[0, 1])
    return {
        "noise": eps[0, 0].numpy(),
        "xt_simplex": xt_simplex[0, 0].numpy(),
        "xt_gauss": xt_gauss[0, 0].numpy(),
        "stats": {
            "alpha_bar": ab,
            "raw_std": float(raw.std(correction=0)),
            "noise_lag1_corr": lag1_corr(eps),
            "gauss_lag1_corr": lag1_corr(gauss),
            "noise_checksum": float(eps.double().abs().sum()),
            "mse_simplex": mse_s,
            "psnr_simplex": psnr_s,
            "mse_gauss": mse_g,
            "psnr_gauss": psnr_g,
            "corr_xt_x0_simplex": corr_s,
        },
    }


def to_display(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def main() -> None:
    st.set_page_config(page_title="Simplex noise (AnoDDPM)", layout="wide")
    st.title("Simplex noise for diffusion (AnoDDPM)")
    with st.sidebar:
        st.header("Noise")
        log2_freq = st.slider("frequency: log2 (1/pixel)", -8.0, -1.0, -5.0, 0.5, key="log2_freq")
        octaves = st.slider("octaves", 1, 10, 6, key="octaves")
        decay = st.slider("decay (persistence)", 0.1, 1.0, 0.8, 0.05, key="decay")
        seed = int(st.number_input("seed", 0, 2**31 - 1, 0, key="seed"))
        st.header("Diffusion")
        t = st.slider("t (cosine schedule, 1000 steps)", 0, NUM_STEPS, 250, key="t")
        upload = st.file_uploader("NIfTI image (optional)", type=["nii", "gz"], key="upload")

    if upload is not None:
        try:
            image, source = nifti_slice(upload.getvalue(), upload.name), upload.name
        except Exception as e:  # a bad upload must not break the page
            st.error(f"Could not read {upload.name}: {e}")
            image, source = template_slice(), "MNI152 template (nilearn), mid-axial slice"
    else:
        image, source = template_slice(), "MNI152 template (nilearn), mid-axial slice"

    res = compute(image, log2_freq, octaves, decay, seed, t)
    stats = res["stats"]
    st.session_state["simplex_stats"] = stats
    st.caption(
        f"{source}, {image.shape[0]}x{image.shape[1]} px; frequency 2^{log2_freq:g} = {2.0**log2_freq:.4g}/px; "
        f"x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps"
    )

    cols = st.columns(4)
    cols[0].image(to_display(image), caption="x0", width=260)
    cols[1].image(to_display(res["noise"], -3.0, 3.0), caption="simplex eps (unit variance)", width=260)
    cols[2].image(to_display(res["xt_simplex"]), caption=f"x_t, simplex eps (t={t})", width=260)
    cols[3].image(to_display(res["xt_gauss"]), caption=f"x_t, Gaussian eps (t={t})", width=260)

    m = st.columns(6)
    m[0].metric("abar_t", f"{stats['alpha_bar']:.4f}")
    m[1].metric("PSNR x_t simplex (dB)", f"{stats['psnr_simplex']:.2f}")
    m[2].metric("MSE x_t simplex", f"{stats['mse_simplex']:.4f}")
    m[3].metric("MSE x_t Gaussian", f"{stats['mse_gauss']:.4f}")
    m[4].metric("noise lag-1 corr", f"{stats['noise_lag1_corr']:.3f}")
    m[5].metric("raw noise std", f"{stats['raw_std']:.3f}")


if __name__ == "__main__":
    main()
