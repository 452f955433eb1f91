"""The embedded demo cohort: synthetic brain MRI subjects built from the real MNI152 2009a template.

Every bundle runs out of the box on this cohort, offline and deterministically. It is built from
the ICBM 2009a nonlinear symmetric template and its grey/white-matter probability maps that the
``nilearn`` package ships (no download), at 2 mm:

* each subject is the template under a random affine (rotation, scale, translation) and a smooth
  elastic deformation, with a multiplicative bias field, a global intensity change (gain and
  gamma) and Rician noise (the magnitude of complex Gaussian noise, as in magnitude MR images);
* two contrasts: **T1w-like** (the template T1 itself) and **FLAIR-like** (a mix of the tissue
  maps with suppressed CSF);
* pathological subjects get one synthetic lesion with a mask, of three kinds:

  - ``glioma``: intra-axial, in white matter, irregular boundary, an oedema halo and mass effect;
    its appearance is drawn from ``classic`` (T1 hypo, FLAIR hyper), ``hypo`` (hypo-intense in
    both) and ``iso`` (iso-intense with a texture change) — so thresholding intensity alone cannot
    find every lesion;
  - ``meningioma``: extra-axial, dural based at the brain surface, homogeneous, iso-intense to
    grey matter in T1w, pushing the brain inwards;
  - ``pituitary``: small, midline, suprasellar (the inferior hypothalamic region), T1 mildly
    hyper-intense.

* a few test subjects are also written as DICOM series, to exercise the DICOM path.

Outputs (paths relative to ``--out``)::

    subjects/<sub>/<sub>_{T1w,FLAIR,brainmask,lesion}.nii.gz   3D volumes (lesion: all zero if healthy)
    slices/<sub>_z<k>_T1w.nii.gz                              2D axial slices for classification
    views/<sub>_study<k>_<plane>_<contrast>.nii.gz            2D views of the multi-view studies
    dicom/<sub>_T1w/IM*.dcm                                   DICOM series of a few subjects
    manifest.csv, manifest.json                               subjects, kinds, lesion volumes, params
    datalists/anomaly_{t1w,flair}.json                        healthy train/val, test with masks+kinds
    datalists/anomaly_supervised_{t1w,flair}.json             healthy+pathological train/val, same test
    datalists/classification_{binary,multiclass}.json         slice classification, split by subject
    datalists/studies.json                                    multi-view studies, multi-label findings
    datalists/dicom.json                                      the DICOM subjects (inference/tests)

All subjects are synthetic: no patient data is involved. The subject split is stratified by kind, so
no subject appears in two sections of any datalist. It is one split for the anomaly and study datalists
(their test split holds more pathological subjects); the classification datalists have their own split
with the *same* fractions for every kind, so their validation split (the conformal calibration split of
the classifiers) and test split have the same class proportions in expectation: split-conformal
coverage assumes calibration and test data are exchangeable.

Usage::

    python -m data_prep.demo --out DIR [--subjects 64] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from data_prep.datalist import atomic_write_text, split_by_subject, write_datalist

__all__ = [
    "CLASSES",
    "FINDINGS",
    "KINDS",
    "DemoConfig",
    "build_demo_cohort",
    "load_template",
    "main",
]

#: lesion kinds of the pathological subjects
KINDS = ("glioma", "meningioma", "pituitary")
#: class names of the 4-class task, in label-index order (same order as the Kaggle adapter)
CLASSES = ("healthy", "glioma", "meningioma", "pituitary")
#: multi-label findings of the studies (diffusion_mae), in vector order
FINDINGS = (
    "no_finding",
    "glioma",
    "meningioma",
    "pituitary",
    "oedema",
    "mass_effect",
    "t1_hypointense_lesion",
    "strong_bias_field",
)
CONTRASTS = ("T1w", "FLAIR")
_VERSION = "5"  # bump when the generator changes, so cached cohorts are rebuilt


@dataclass
class DemoConfig:
    """Parameters of the demo cohort.

    Args:
        subjects: number of subjects; half (rounded down) are healthy, the rest pathological with
            the three kinds in turn.
        seed: master seed; the whole cohort is a deterministic function of it.
        spacing: voxel size in mm of the output volumes.
        shape: output grid (voxels), centred on the brain.
        n_dicom: number of test subjects also written as DICOM series.
        slices_per_subject: axial slices per subject in the classification datalists.
        studies_per_subject: multi-view studies per subject (``studies.json``), each with its own view
            count, views and plane positions (like repeated visits: same findings, other images).
        fractions_healthy: split fractions of the healthy subjects (anomaly and study datalists).
        fractions_pathological: split fractions of the pathological subjects (idem).
        fractions_classification: split fractions of every kind in the classification datalists.
    """

    subjects: int = 64
    seed: int = 0
    spacing: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    n_dicom: int = 3
    slices_per_subject: int = 12
    studies_per_subject: int = 3
    fractions_healthy: dict[str, float] = field(
        default_factory=lambda: {"training": 0.6, "validation": 0.15, "test": 0.25}
    )
    fractions_classification: dict[str, float] = field(
        default_factory=lambda: {"training": 0.5, "validation": 0.25, "test": 0.25}
    )
    fractions_pathological: dict[str, float] = field(
        default_factory=lambda: {"training": 0.5, "validation": 0.15, "test": 0.35}
    )

    def digest(self) -> str:
        """A hash of the parameters and generator version (the cache key)."""
        return hashlib.sha256((json.dumps(asdict(self), sort_keys=True) + _VERSION).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# template
# ----------------------------------------------------------------------------------------------


@dataclass
class Template:
    """The MNI152 2009a template on the demo grid: channels T1, GM, WM, brain (floats in [0, 1])."""

    maps: torch.Tensor  # (4, X, Y, Z)
    affine: np.ndarray  # 4x4 voxel → RAS mm of the demo grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.maps.shape[1:])  # type: ignore[return-value]


def load_template(spacing: float = 2.0, shape: tuple[int, int, int] = (80, 96, 80)) -> Template:
    """Load nilearn's shipped MNI152 2009a T1 and GM/WM maps and resample them to the demo grid.

    Args:
        spacing: output voxel size in mm.
        shape: output grid, centred on the centre of the brain's bounding box.

    Returns:
        The template maps on that grid with its affine.

    Raises:
        FileNotFoundError: when nilearn's data files are missing (a broken nilearn install).
    """
    from nilearn import datasets  # imported here: nilearn's import is slow and only needed here

    data_dir = Path(datasets.__file__).parent / "data"
    names = {k: data_dir / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for p in names.values():
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: nilearn's MNI152 2009a template file is missing; reinstall nilearn."
            )
    imgs = {k: nib.load(p) for k, p in names.items()}
    src_aff = imgs["t1"].affine
    vols = torch.stack(
        [torch.from_numpy(imgs[k].get_fdata(dtype=np.float32) / 255.0) for k in ("t1", "gm", "wm")]
    )
    # the shipped T1 is skull-stripped: its support is the brain mask
    brain = (vols[0] > 0.02).float()
    vols = torch.cat([vols, brain[None]])
    idx = torch.nonzero(brain > 0)
    centre_vox = (idx.min(0).values + idx.max(0).values).double().numpy() / 2.0
    centre_mm = src_aff[:3, :3] @ centre_vox + src_aff[:3, 3]
    out_aff = np.diag([spacing, spacing, spacing, 1.0])
    out_aff[:3, 3] = centre_mm - spacing * (np.asarray(shape) - 1) / 2.0
    # average-pool to about the output spacing first (anti-aliasing), then resample exactly
    k = max(1, round(spacing / abs(src_aff[0, 0])))
    pooled = F.avg_pool3d(vols[None], kernel_size=k, stride=k, ceil_mode=True)[0] if k > 1 else vols
    pooled_aff = src_aff.copy()
    pooled_aff[:3, :3] = src_aff[:3, :3] * k
    pooled_aff[:3, 3] = src_aff[:3, 3] + src_aff[:3, :3] @ np.full(3, (k - 1) / 2.0)
    grid = _identity_mm(shape, out_aff)
    maps = _sample(pooled, pooled_aff, grid)
    return Template(maps=maps, affine=out_aff)


def _identity_mm(shape: tuple[int, int, int], affine: np.ndarray) -> torch.Tensor:
    """World (mm) coordinates of every voxel of a grid, shape (X, Y, Z, 3)."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    a = torch.as_tensor(affine, dtype=torch.float32)
    return ijk @ a[:3, :3].T + a[:3, 3]


def _sample(
    vol: torch.Tensor, vol_affine: np.ndarray, points_mm: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """Trilinear sampling of a (C, X, Y, Z) volume at world points (..., 3); zero outside."""
    inv = torch.as_tensor(np.linalg.inv(vol_affine), dtype=torch.float32)
    ijk = points_mm @ inv[:3, :3].T + inv[:3, 3]
    size = torch.tensor(vol.shape[1:], dtype=torch.float32)
    # grid_sample wants (x, y, z) = (W, H, D) order, i.e. reversed array axes, normalised to [-1, 1]
    norm = (2.0 * ijk / (size - 1) - 1.0).flip(-1)
    out = F.grid_sample(vol[None], norm[None], mode=mode, padding_mode="zeros", align_corners=True)
    return out[0]


# ----------------------------------------------------------------------------------------------
# random fields
# ----------------------------------------------------------------------------------------------


def _smooth_field(
    gen: torch.Generator, shape: tuple[int, ...], coarse: int, channels: int = 1
) -> torch.Tensor:
    """A smooth random field: unit-normal values on a coarse grid, trilinearly upsampled."""
    g = torch.randn((1, channels, coarse, coarse, coarse), generator=gen)
    return F.interpolate(g, size=shape, mode="trilinear", align_corners=True)[0]


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------
# one subject
# ----------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One generated subject: volumes on the demo grid and its description."""

    sid: str
    kind: str
    t1w: np.ndarray
    flair: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    info: dict[str, Any]


def _tissue_contrasts(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T1w-like and FLAIR-like intensities (in [0, ~1]) from warped T1/GM/WM/brain maps."""
    t1, gm, wm, brain = maps
    csf = (brain - gm - wm).clamp(0, 1)
    # FLAIR: grey matter brighter than white matter, CSF nulled by the inversion pulse
    flair = (0.62 * gm + 0.47 * wm + 0.05 * csf) * brain
    return t1 * brain, flair


def _pick_voxel(gen: torch.Generator, candidates: torch.Tensor) -> torch.Tensor:
    idx = torch.nonzero(candidates)
    if len(idx) == 0:
        raise RuntimeError("demo cohort: no candidate voxel for a lesion centre (template grid too small?)")
    return idx[torch.randint(len(idx), (1,), generator=gen).item()].float()


def _erode(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Binary erosion by a (2r+1)^3 cube via max-pooling of the complement."""
    # a cube is separable: three 1D max-pools cost O(r) per voxel instead of O(r^3)
    inv = (1.0 - mask.float())[None, None]
    k = 2 * r + 1
    for ks, pad in (((k, 1, 1), (r, 0, 0)), ((1, k, 1), (0, r, 0)), ((1, 1, k), (0, 0, r))):
        inv = F.max_pool3d(inv, ks, stride=1, padding=pad)
    return 1.0 - inv[0, 0]


def _make_subject(tpl: Template, index: int, kind: str, seed: int, spacing: float) -> Subject:
    """Generate one subject; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    shape = tpl.shape
    info: dict[str, Any] = {}

    # --- geometry: random affine + elastic deformation, as one sampling grid (voxel units) ---
    angles = np.deg2rad(rng.uniform(-6, 6, 3))
    scale = rng.uniform(0.92, 1.0, 3)
    shift = rng.uniform(-3, 3, 3) / spacing
    lin = _rotation(angles) @ np.diag(1.0 / scale)
    centre = (np.asarray(shape) - 1) / 2.0
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    src = (ijk - torch.as_tensor(centre, dtype=torch.float32)) @ torch.as_tensor(lin.T, dtype=torch.float32)
    src = src + torch.as_tensor(centre + shift, dtype=torch.float32)
    elastic_mm = float(rng.uniform(1.0, 2.5))
    src = src + (elastic_mm / spacing) * _smooth_field(gen, shape, coarse=5, channels=3).permute(1, 2, 3, 0)
    info.update(
        rotation_deg=np.rad2deg(angles).round(2).tolist(),
        scale=scale.round(3).tolist(),
        elastic_mm=round(elastic_mm, 2),
    )

    def warp(vol: torch.Tensor, grid_vox: torch.Tensor) -> torch.Tensor:
        size = torch.tensor(vol.shape[1:], dtype=torch.float32)
        norm = (2.0 * grid_vox / (size - 1) - 1.0).flip(-1)
        return F.grid_sample(
            vol[None], norm[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]

    maps = warp(tpl.maps, src)
    brain = maps[3] > 0.5
    lesion_core = torch.zeros(shape)
    lesion_halo = torch.zeros(shape)
    appearance = "none"
    mass_effect_mm = 0.0

    if kind != "healthy":
        if kind == "glioma":
            # deep white matter, away from the cortex
            c = _pick_voxel(gen, (maps[2] > 0.8) & (_erode(brain.float(), 6) > 0.5))
            radii = torch.as_tensor(rng.uniform(6, 12, 3) / spacing, dtype=torch.float32)
            appearance = str(rng.choice(["classic", "hypo", "iso"], p=[0.4, 0.3, 0.3]))
            halo_ratio = float(rng.uniform(1.35, 1.7))
            mass_effect_mm = float(rng.uniform(2.0, 5.0))
        elif kind == "meningioma":
            # dural based: a point on the upper/lateral brain surface; the tumour grows inwards from it
            surf = brain & (_erode(brain.float(), 1) < 0.5)
            upper = torch.zeros(shape, dtype=torch.bool)
            upper[:, :, int(shape[2] * 0.45) :] = True
            c0 = _pick_voxel(gen, surf & upper)
            inward = torch.as_tensor(centre, dtype=torch.float32) - c0
            inward = inward / inward.norm().clamp_min(1e-6)
            r = float(rng.uniform(9, 15)) / spacing
            # centred just inside the surface: the tumour fills the space the brain is pushed out of, and most
            # of it stays inside the brain mask after the evaluation's 2-voxel erosion
            c = c0 + 0.15 * r * inward
            radii = torch.full((3,), r)
            appearance = "iso"
            halo_ratio = 0.0
            mass_effect_mm = float(rng.uniform(3.0, 6.0))
        else:  # pituitary: suprasellar midline, just above the sella (MNI ~ (0, 2, -14))
            mni = np.array([0.0, 2.0, -14.0]) + rng.normal(0, 2, 3) * np.array([0.3, 1, 1])
            tpl_vox = np.linalg.inv(tpl.affine) @ np.append(mni, 1.0)
            # invert the subject's affine (the elastic part is small and ignored here)
            c_np = np.linalg.solve(lin, tpl_vox[:3] - centre - shift) + centre
            c = torch.as_tensor(c_np, dtype=torch.float32)
            ci = c.round().long().clamp(torch.zeros(3, dtype=torch.long), torch.tensor(shape) - 1)
            if not brain[tuple(ci)]:
                # move to the nearest brain voxel of the same sagittal plane
                cand = torch.nonzero(brain[ci[0]])
                d = (cand.float() - c[1:]).norm(dim=1)
                c = torch.cat([c[:1], cand[d.argmin()].float()])
            radii = torch.as_tensor(rng.uniform(3.5, 6.5, 3) / spacing, dtype=torch.float32)
            appearance = str(rng.choice(["hyper", "iso"], p=[0.6, 0.4]))
            halo_ratio = 0.0
            mass_effect_mm = 0.0

        # mass effect: a smooth radial expansion about the lesion centre, applied to the tissue maps
        d = ijk - c
        if mass_effect_mm > 0:
            R = float(radii.max()) * 1.8
            amp = mass_effect_mm / spacing / R  # dimensionless; < 1 keeps the map invertible
            u = amp * d * torch.exp(-(d**2).sum(-1, keepdim=True) / (2 * R * R))
            maps = warp(maps, ijk - u)
        # irregular boundary: ellipsoidal radius perturbed by smooth noise
        rho = ((d / radii) ** 2).sum(-1).sqrt()
        wobble = (
            0.18 * _smooth_field(gen, shape, coarse=9)[0]
            if kind == "glioma"
            else 0.05 * _smooth_field(gen, shape, coarse=6)[0]
        )
        lesion_core = torch.sigmoid((1.0 - rho + wobble) / 0.08)
        if halo_ratio > 0:
            lesion_halo = torch.sigmoid((halo_ratio - rho + wobble) / 0.12) * (1 - lesion_core)
        # the intracranial space the lesion may occupy: the brain before the mass effect
        # (extra-axial lesions fill the space the brain was pushed out of)
        brain = (maps[3] > 0.5) | (brain & ((lesion_core + lesion_halo) > 0.5))

    t1w, flair = _tissue_contrasts(maps)
    bm = brain.float()
    t1w, flair = t1w * bm, flair * bm

    if kind != "healthy":
        core, halo = lesion_core * bm, lesion_halo * bm
        local_t1 = (t1w * (core > 0.5)).sum() / (core > 0.5).sum().clamp_min(1)
        local_fl = (flair * (core > 0.5)).sum() / (core > 0.5).sum().clamp_min(1)
        texture = _smooth_field(gen, shape, coarse=max(8, shape[0] // 3))[0]
        if kind == "glioma":
            if appearance == "classic":
                t1_l, fl_l = 0.45, 0.95  # T1 hypo, FLAIR hyper (the brightest tissue)
            elif appearance == "hypo":
                t1_l, fl_l = 0.30, 0.22  # cyst-like: dark in both
            else:
                # iso-intense: the mean is that of the tissue it replaces, only the texture changes
                t1_l, fl_l = float(local_t1), float(local_fl)
            tex_amp = 0.22 if appearance == "iso" else 0.08
            t1w = t1w * (1 - core) + core * t1_l * (1 + tex_amp * texture)
            flair = flair * (1 - core) + core * fl_l * (1 + tex_amp * texture)
            # oedema: water raises FLAIR, lowers T1 a little
            t1w = t1w * (1 - 0.18 * halo)
            flair = flair * (1 + 0.35 * halo)
        elif kind == "meningioma":
            t1_l, fl_l = 0.58, 0.66  # iso to grey matter, homogeneous
            t1w = t1w * (1 - core) + core * t1_l * (1 + 0.04 * texture)
            flair = flair * (1 - core) + core * fl_l * (1 + 0.04 * texture)
        else:
            t1_l = 0.95 if appearance == "hyper" else 0.62
            fl_l = 0.64
            t1w = t1w * (1 - core) + core * t1_l * (1 + 0.05 * texture)
            flair = flair * (1 - core) + core * fl_l * (1 + 0.05 * texture)
        lesion = ((core + halo) > 0.5) & brain
        if not lesion.any():  # a lesion of at least its centre voxel, so no mask is ever empty
            ci = c.round().long()
            lesion[tuple(ci)] = True
            brain[tuple(ci)] = True
    else:
        lesion = torch.zeros(shape, dtype=torch.bool)

    # --- acquisition: bias field, gain/gamma, Rician noise (per contrast) ---
    bias_strength = float(rng.uniform(0.08, 0.4))
    out = []
    for img in (t1w, flair):
        bias = torch.exp(bias_strength * _smooth_field(gen, shape, coarse=3)[0])
        gamma = float(rng.uniform(0.85, 1.15))
        gain = float(rng.uniform(800, 1100))
        sigma = float(rng.uniform(0.01, 0.035)) * gain
        clean = gain * (img.clamp_min(0) ** gamma) * bias
        n1 = torch.randn(shape, generator=gen) * sigma
        n2 = torch.randn(shape, generator=gen) * sigma
        noisy = torch.sqrt((clean + n1) ** 2 + n2**2)
        out.append(noisy.round().clamp(0, 32767).to(torch.int16).numpy())
    info.update(
        appearance=appearance,
        mass_effect_mm=round(mass_effect_mm, 2),
        bias_strength=round(bias_strength, 3),
        lesion_voxels=int(lesion.sum()),
        lesion_volume_ml=round(float(lesion.sum()) * spacing**3 / 1000.0, 3),
        lesion_centre_vox=[int(v) for v in torch.nonzero(lesion).float().mean(0).round().tolist()]
        if lesion.any()
        else None,
    )
    return Subject(
        sid=f"sub-{index + 1:03d}",
        kind=kind,
        t1w=out[0],
        flair=out[1],
        brain=brain.numpy().astype(np.uint8),
        lesion=lesion.numpy().astype(np.uint8),
        info=info,
    )


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Affine of a 2D slice saved as (A, B) = the volume with ``axis`` removed, at ``index``."""
    keep = [a for a in range(3) if a != axis]
    out = np.eye(4)
    out[:3, 0] = affine[:3, keep[0]]
    out[:3, 1] = affine[:3, keep[1]]
    out[:3, 2] = affine[:3, axis]
    out[:3, 3] = affine[:3, 3] + affine[:3, axis] * index
    return out


def _take(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(vol, index, axis=axis))


def _classification_slices(s: Subject, n: int) -> list[int]:
    """Axial slice indices for the classification task (lesion slices, or central brain slices)."""
    if s.kind != "healthy":
        area = s.lesion.sum(axis=(0, 1))
        keep = np.nonzero(area >= max(8, 0.3 * area.max()))[0]
    else:
        area = s.brain.sum(axis=(0, 1))
        keep = np.nonzero(area >= 0.6 * area.max())[0]
    if len(keep) > n:
        keep = keep[np.linspace(0, len(keep) - 1, n).round().astype(int)]
    return [int(k) for k in keep]


def _findings(s: Subject) -> list[float]:
    f = dict.fromkeys(FINDINGS, 0.0)
    if s.kind == "healthy":
        f["no_finding"] = 1.0
    else:
        f[s.kind] = 1.0
        f["oedema"] = float(s.kind == "glioma")
        f["mass_effect"] = float(s.info["mass_effect_mm"] >= 3.0)
        f["t1_hypointense_lesion"] = float(s.kind == "glioma" and s.info["appearance"] in ("classic", "hypo"))
    f["strong_bias_field"] = float(s.info["bias_strength"] >= 0.3)
    return [f[k] for k in FINDINGS]


def build_demo_cohort(
    out: str | os.PathLike, cfg: DemoConfig | None = None, force: bool = False, verbose: bool = True
) -> Path:
    """Build (or reuse from cache) the demo cohort in ``out``.

    The cohort is written into a temporary sibling folder and moved into place only when complete,
    so an interrupted build never leaves a half-written cohort, and an existing one is replaced
    only by a complete new one. If ``out`` already holds a complete cohort with the same
    parameters (``.complete`` stamp), nothing is rebuilt unless ``force``.

    Args:
        out: output folder.
        cfg: cohort parameters (defaults: :class:`DemoConfig`).
        force: rebuild even if a complete cohort with the same parameters exists.
        verbose: print progress.

    Returns:
        The output folder.

    Raises:
        ValueError: for fewer than 6 subjects (every split needs healthy and pathological ones).
    """
    cfg = cfg or DemoConfig()
    if cfg.subjects < 6:
        raise ValueError(f"--subjects must be at least 6, got {cfg.subjects}.")
    out = Path(out).absolute()
    stamp = out / ".complete"
    if not force and stamp.is_file() and stamp.read_text().strip() == cfg.digest():
        if verbose:
            print(f"demo cohort: up to date in {out} (use --force to rebuild)")
        return out
    t0 = time.time()
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _build_into(tmp, cfg, verbose)
        atomic_write_text(tmp / ".complete", cfg.digest() + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"demo cohort: {cfg.subjects} subjects written to {out} in {time.time() - t0:.1f} s")
    return out


def _build_into(root: Path, cfg: DemoConfig, verbose: bool) -> None:
    torch_threads = torch.get_num_threads()
    tpl = load_template(cfg.spacing, cfg.shape)
    n_healthy = cfg.subjects // 2
    kinds = ["healthy"] * n_healthy + [KINDS[i % 3] for i in range(cfg.subjects - n_healthy)]
    sids = [f"sub-{i + 1:03d}" for i in range(cfg.subjects)]
    kind_of = dict(zip(sids, kinds, strict=True))
    # one global split by subject, stratified by kind (see module docstring)
    split_of: dict[str, str] = {}
    for group, fr in (("healthy", cfg.fractions_healthy), ("path", cfg.fractions_pathological)):
        members = [s for s in sids if (kind_of[s] == "healthy") == (group == "healthy")]
        parts = split_by_subject(members, fr, seed=cfg.seed, strata={s: kind_of[s] for s in members})
        split_of.update({s: p for p, ss in parts.items() for s in ss})
    # the classification split: one set of fractions for every kind (see module docstring)
    cls_parts = split_by_subject(sids, cfg.fractions_classification, seed=cfg.seed, strata=kind_of)
    cls_split_of = {s: p for p, ss in cls_parts.items() for s in ss}
    test_sids = [s for s in sids if split_of[s] == "test"]
    dicom_sids = (
        [s for s in test_sids if kind_of[s] == "healthy"][:1]
        + [s for s in test_sids if kind_of[s] != "healthy"]
    )[: cfg.n_dicom]

    aff = tpl.affine
    manifest: list[dict[str, Any]] = []
    anomaly: dict[str, dict[str, list[dict]]] = {
        c: {"training": [], "validation": [], "test": []} for c in CONTRASTS
    }
    supervised: dict[str, dict[str, list[dict]]] = {c: {"training": [], "validation": []} for c in CONTRASTS}
    cls_bin: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    cls_multi: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    studies: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    dicom_items: list[dict] = []

    for i, sid in enumerate(sids):
        s = _make_subject(tpl, i, kind_of[sid], cfg.seed, cfg.spacing)
        split = split_of[sid]
        sdir = root / "subjects" / sid
        paths = {
            "T1w": _save(s.t1w, aff, sdir / f"{sid}_T1w.nii.gz"),
            "FLAIR": _save(s.flair, aff, sdir / f"{sid}_FLAIR.nii.gz"),
            "brain": _save(s.brain, aff, sdir / f"{sid}_brainmask.nii.gz"),
            "lesion": _save(s.lesion, aff, sdir / f"{sid}_lesion.nii.gz"),
        }
        for c in CONTRASTS:
            item = {
                "image": paths[c],
                "brain_mask": paths["brain"],
                "label": paths["lesion"],
                "subject": sid,
                "kind": s.kind,
            }
            if s.kind == "healthy" and split in ("training", "validation"):
                anomaly[c][split].append({k: v for k, v in item.items() if k != "label"})
            if split == "test":
                anomaly[c]["test"].append(item)
            else:
                supervised[c][split].append(item)

        # classification: axial T1w slices
        for z in _classification_slices(s, cfg.slices_per_subject):
            p = _save(
                _take(s.t1w, 2, z), _slice_affine(aff, 2, z), root / "slices" / f"{sid}_z{z:03d}_T1w.nii.gz"
            )
            frac = float(_take(s.lesion, 2, z).sum()) / max(1, int(_take(s.brain, 2, z).sum()))
            base = {"image": p, "subject": sid, "slice_index": z, "lesion_fraction": round(frac, 4)}
            cls_bin[cls_split_of[sid]].append(
                {
                    **base,
                    "label": int(s.kind != "healthy"),
                    "class_name": "healthy" if s.kind == "healthy" else "tumour",
                }
            )
            cls_multi[cls_split_of[sid]].append(
                {**base, "label": CLASSES.index(s.kind), "class_name": s.kind}
            )

        # multi-view studies: planes through the lesion centre (or a central brain point), moved per study so
        # that the studies of one subject show other images of the same findings: by up to 1 voxel (2 mm)
        # through a lesion, so that the smallest (pituitary, 3.5 mm radius) stays in every view; 3 otherwise
        rng = np.random.default_rng([cfg.seed, i, 7])
        if s.info["lesion_centre_vox"] is not None:
            p0 = np.asarray(s.info["lesion_centre_vox"])
        else:
            cand = np.argwhere(_erode(torch.from_numpy(s.brain).float(), 10).numpy() > 0.5)
            p0 = cand[rng.integers(len(cand))]
        candidates = [
            (plane, ax, c) for plane, ax in (("axial", 2), ("coronal", 1), ("sagittal", 0)) for c in CONTRASTS
        ]
        for k in range(1, cfg.studies_per_subject + 1):
            amp = 1 if s.info["lesion_centre_vox"] is not None else 3
            point = p0 if k == 1 else p0 + rng.integers(-amp, amp + 1, size=3)
            point = np.clip(point, 0, np.asarray(s.t1w.shape) - 1)
            n_views = int(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.25, 0.3, 0.2, 0.15]))
            chosen = sorted(rng.choice(len(candidates), size=n_views, replace=False).tolist())
            views, names = [], []
            for j in chosen:
                plane, ax, c = candidates[j]
                vol = s.t1w if c == "T1w" else s.flair
                views.append(
                    _save(
                        _take(vol, ax, int(point[ax])),
                        _slice_affine(aff, ax, int(point[ax])),
                        root / "views" / f"{sid}_study{k}_{plane}_{c}.nii.gz",
                    )
                )
                names.append(f"{plane}_{c}")
            studies[split].append(
                {
                    "views": views,
                    "view_names": names,
                    "labels": _findings(s),
                    "subject": sid,
                    "study": f"{sid}_study{k}",
                }
            )

        if sid in dicom_sids:
            from data_prep.dicom import write_dicom_series  # imported lazily: pydicom is only needed here

            ddir = root / "dicom" / f"{sid}_T1w"
            write_dicom_series(
                s.t1w,
                aff,
                ddir,
                series_description="T1w demo",
                uid_seed=cfg.seed * 100003 + i,
                patient_id=sid,
            )
            dicom_items.append(
                {
                    "image": ddir,
                    "label": paths["lesion"],
                    "brain_mask": paths["brain"],
                    "subject": sid,
                    "kind": s.kind,
                }
            )

        manifest.append(
            {
                "subject": sid,
                "kind": s.kind,
                "split": split,
                "classification_split": cls_split_of[sid],
                "findings": ";".join(f for f, v in zip(FINDINGS, _findings(s), strict=True) if v),
                "dicom": sid in dicom_sids,
                **s.info,
            }
        )
        if verbose and (i + 1) % 8 == 0:
            print(f"demo cohort: {i + 1}/{len(sids)} subjects", flush=True)

    dl = root / "datalists"
    common = {
        "source": "synthetic, from the MNI152 2009a template shipped with nilearn",
        "spacing_mm": cfg.spacing,
    }
    for c in CONTRASTS:
        write_datalist(
            dl / f"anomaly_{c.lower()}.json",
            anomaly[c],
            name=f"demo-anomaly-{c.lower()}",
            description="training/validation: healthy volumes only; test: healthy and pathological volumes with lesion masks.",
            extra={**common, "contrast": c, "kinds": list(KINDS)},
        )
        # methods that learn from labels (classifier guidance) also see pathological training subjects
        write_datalist(
            dl / f"anomaly_supervised_{c.lower()}.json",
            {**supervised[c], "test": anomaly[c]["test"]},
            name=f"demo-anomaly-supervised-{c.lower()}",
            description="training/validation: healthy and pathological volumes with lesion masks; test: as anomaly_*.json. "
            "Slice classes (labels) come from the lesion masks, in the order of 'labels'.",
            extra={**common, "contrast": c, "kinds": list(KINDS), "labels": ["healthy", "diseased"]},
        )
    write_datalist(
        dl / "classification_binary.json",
        cls_bin,
        name="demo-classification-binary",
        extra={**common, "labels": ["healthy", "tumour"]},
    )
    write_datalist(
        dl / "classification_multiclass.json",
        cls_multi,
        name="demo-classification-multiclass",
        extra={**common, "labels": list(CLASSES)},
    )
    write_datalist(
        dl / "studies.json", studies, name="demo-studies", extra={**common, "findings": list(FINDINGS)}
    )
    if dicom_items:
        write_datalist(dl / "dicom.json", {"test": dicom_items}, name="demo-dicom", extra=common)

    cols = list(manifest[0].keys())
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for row in manifest:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    atomic_write_text(root / "manifest.csv", buf.getvalue())
    atomic_write_text(
        root / "manifest.json",
        json.dumps(
            {"config": asdict(cfg), "digest": cfg.digest(), "affine": aff.tolist(), "subjects": manifest},
            indent=1,
        ),
    )
    torch.set_num_threads(torch_threads)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m data_prep.demo --out DIR [--subjects N] [--seed S] [--force]``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    ap = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    ap.add_argument(
        "--subjects", type=int, default=DemoConfig.subjects, help="number of subjects (half healthy)"
    )
    ap.add_argument("--seed", type=int, default=0, help="master seed")
    ap.add_argument(
        "--dicom", type=int, default=DemoConfig.n_dicom, help="test subjects also written as DICOM"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if an up-to-date cohort exists")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        build_demo_cohort(
            a.out,
            DemoConfig(subjects=a.subjects, seed=a.seed, n_dicom=a.dicom),
            force=a.force,
            verbose=not a.quiet,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
