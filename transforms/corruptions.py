"""Deterministic MRI corruptions at fixed severity levels, for robustness curves of classifiers.

Each corruption kind (:data:`CORRUPTIONS`) has a small table of increasing severities
(:data:`SEVERITIES`, level 1 mild ... level 3 clearly visible on a ``[0, 1]``-scaled brain slice);
``level=0`` is the identity. :func:`corrupt` is a pure function of ``(image, kind, level, seed)``: the
same arguments give bit-identical output, so every model of a comparison is evaluated on the very
same corrupted images. The random part of a corruption (the noise realisation, the shape of the bias
field, the spike location, the motion directions) depends on ``seed`` and ``kind`` only, never on
``level``: the levels of one seed are the same corruption at increasing strength, so a robustness
curve measures severity, not a fresh draw per level.

Corrupt the de-normalised image. The corruptions model the acquisition, so they act on the
non-negative magnitude image at the intensity scale of the source (after loading, resampling and
slicing, BEFORE intensity normalisation such as :class:`~transforms.intensity.PercentileScaleIntensity`
or :class:`~transforms.intensity.MaskedZScore`). Any scale is accepted: noise and spike amplitudes are
fractions of the image's robust maximum (:func:`robust_max`: the 99.5th percentile of the voxels
``> 0``, per channel), the bias field is multiplicative, and k-space truncation, ghosting and motion
are linear. An image with clearly negative voxels (below ``-5%`` of its robust maximum, e.g. a
z-scored image) is refused with a :class:`~transforms.errors.InputDataError`.

Example (2D slices)::

    Compose([
        LoadVolumed(...), VolumeToSlicesd(...),
        Corruptd("image", kind="rician", level=2, seed=0, id_key="slice_id"),
        PercentileScaleIntensityd("image"),
    ])

Implementations: ``gaussian``, ``rician``, ``bias_field``, ``spikes`` and ``gibbs`` use MONAI's
``RandGaussianNoise``, ``RandRicianNoise``, ``RandBiasField``, ``KSpaceSpikeNoise`` and
``GibbsNoise``, the random ones with ``prob=1``, non-sampled parameters and a ``RandomState`` derived
from the seed; ``motion`` and ``ghosting`` use TorchIO's ``Motion`` and ``Ghosting`` (TorchIO < 2.0,
imported on first use) with parameters fixed here.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    GibbsNoise,
    KSpaceSpikeNoise,
    MapTransform,
    RandBiasField,
    RandGaussianNoise,
    RandRicianNoise,
    Transform,
)
from monai.utils import TransformBackends, look_up_option, optional_import
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from transforms.errors import InputDataError
from transforms.intensity import quantiles
from transforms.validate import check_finite, image_name

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corrupt",
    "CorruptD",
    "CorruptDict",
    "Corruptd",
    "corrupt",
    "corruption_grid",
    "corruption_seed",
    "robust_max",
]

CORRUPTIONS: tuple[str, ...] = ("gaussian", "rician", "bias_field", "spikes", "gibbs", "motion", "ghosting")

# Severity of levels 1, 2, 3 per kind (level 0 is the identity). Units:
#   gaussian   std of the additive noise, as a fraction of the robust max
#   rician     std of each of the two Gaussian (real, imaginary) noise channels, same unit
#   bias_field peak-to-peak of the log bias field: the field spans [exp(-s/2), exp(s/2)]
#              (0.3: x0.86 .. x1.16, 0.6: x0.74 .. x1.35, 1.0: x0.61 .. x1.65)
#   spikes     amplitude of the stripe (herringbone) pattern, as a fraction of the robust max
#   gibbs      MONAI GibbsNoise alpha: k-space is cut to a disc of radius (1 - alpha) * max(shape) / sqrt(2),
#              i.e. to about 92%, 71% and 49% of the Nyquist frequency along each axis
#   motion     fraction of the phase-encode lines acquired with the head moved (the outer lines, half on
#              each side; the movement itself is fixed, 3 degrees and 3 pixels). A fixed fraction with
#              growing movement does not work: the phase error of the outer lines saturates after about
#              one pixel, so the error is not monotonic in the movement, but it is in the fraction.
#   ghosting   TorchIO Ghosting intensity: every 4th phase-encode line is scaled by (1 - s)
# Level 1 is mild (barely visible), level 3 clearly visible on a [0, 1]-scaled brain slice.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian": (0.02, 0.05, 0.10),
    "rician": (0.02, 0.05, 0.10),
    "bias_field": (0.3, 0.6, 1.0),
    "spikes": (0.02, 0.05, 0.10),
    "gibbs": (0.35, 0.5, 0.65),
    "motion": (0.2, 0.4, 0.7),
    "ghosting": (0.25, 0.5, 0.8),
}

_PERCENTILE = 99.5  # robust max: this percentile of the voxels > 0
_NEGATIVE_TOLERANCE = 0.05  # voxels below -5% of the robust max mean "not a magnitude image"
_BIAS_DEGREE = 3  # degree of the Legendre polynomial of the log bias field (MONAI's default)
_SPIKE_MIN_RADIUS = 0.25  # spikes lie at >= 25% of the Nyquist frequency along some axis
_MOTION_AMPLITUDE = 3.0  # each movement: rotation in degrees, translation in pixels
_GHOSTS = 4  # ghost copies at shifts of 1/4 of the field of view


def corruption_grid(kinds: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """All ``(kind, level)`` pairs of a robustness study, levels ``1..n`` (the clean image is not listed).

    Args:
        kinds: the kinds to list, default :data:`CORRUPTIONS` (in that order).

    Returns:
        ``[(kind, 1), (kind, 2), ..., (next kind, 1), ...]``.

    Raises:
        ValueError: for an unknown kind.
    """
    kinds = CORRUPTIONS if kinds is None else tuple(look_up_option(k, CORRUPTIONS) for k in kinds)
    return [(kind, level) for kind in kinds for level in range(1, len(SEVERITIES[kind]) + 1)]


def corruption_seed(seed: int, *parts: Any) -> int:
    """A seed derived from ``seed`` and item identifiers, stable across processes and machines.

    Python's ``hash`` of a string changes from one interpreter to the next (hash randomisation), so the
    parts are hashed with BLAKE2b instead. Integers (also 0-d/one-element tensors and arrays) and their
    string form give different seeds (``3`` is not ``"3"``).

    Args:
        seed: the base seed, an integer ``>= 0``.
        parts: identifiers, e.g. a subject id, a slice index, a dictionary key.

    Returns:
        An integer in ``[0, 2**63)``.

    Raises:
        ValueError: for a negative or non-integer ``seed``.
    """
    tokens = [f"i{_check_seed(seed)}"]
    for part in parts:
        part = _scalar(part)
        tokens.append(f"i{part}" if isinstance(part, int) else f"s{part}")
    digest = hashlib.blake2b("\x1f".join(tokens).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def robust_max(img: NdarrayOrTensor, percentile: float = _PERCENTILE) -> torch.Tensor:
    """Per-channel robust maximum: the ``percentile`` of the voxels ``> 0`` (0 if there are none).

    Voxels ``<= 0`` are left out so that the zero background of a skull-stripped or padded image does
    not pull the percentile down; a few bright outliers (vessels, fat) stay above it.

    Args:
        img: channel-first image ``(C, *spatial)``.
        percentile: in ``[0, 100]``.

    Returns:
        A float64 tensor of shape ``(C,)``.
    """
    x = convert_to_tensor(img, track_meta=False)
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for c in range(x.shape[0]):
        values = x[c][x[c] > 0]
        if values.numel():
            out[c] = quantiles(values, (percentile,))[0]
    return out


def corrupt(
    image: NdarrayOrTensor, kind: str, level: int, seed: int = 0, phase_axis: int = -1
) -> NdarrayOrTensor:
    """Apply corruption ``kind`` at severity ``level`` to a de-normalised, non-negative image.

    Deterministic: the same ``(image, kind, level, seed, phase_axis)`` gives identical output. Random
    kinds (``gaussian``, ``rician``, ``bias_field``, ``spikes``, ``motion``) draw from a generator seeded
    by ``(seed, kind)``; ``gibbs`` and ``ghosting`` do not depend on ``seed``. Computed on the CPU in
    float64 (TorchIO's ``motion`` and ``ghosting`` in float32) and returned on the input's device.

    Kinds (see :data:`SEVERITIES` for the values and their units):

    * ``gaussian``: additive white Gaussian noise (may make background voxels negative).
    * ``rician``: ``sqrt((x + n1)**2 + n2**2)``, the magnitude of complex Gaussian noise: a zero
      background becomes Rayleigh noise with a positive mean.
    * ``bias_field``: multiplication by ``exp(p)``, ``p`` a random degree-3 Legendre polynomial scaled
      to peak-to-peak ``s`` and centred, so the field lies in ``[exp(-s/2), exp(s/2)]``; the same field
      multiplies every channel.
    * ``spikes``: one k-space coefficient (random location at >= 25% of Nyquist along some axis, same
      for all channels) is set so that the image gets a stripe pattern of amplitude ``s`` times the
      robust max.
    * ``gibbs``: k-space is truncated to a centred disc (ball), giving ringing at edges.
    * ``motion``: the head is moved (rotation 3 degrees in the slice plane, translation 3 pixels in a
      random direction; for volumes both about/along random 3D directions) while the outer fraction
      ``s`` of the phase-encode lines is acquired, to one pose before and another after the central
      lines, which come from the unmoved head (TorchIO's model, after Shaw et al. 2019).
    * ``ghosting``: every 4th phase-encode line is scaled by ``1 - s``: ghost copies shifted by a
      quarter of the field of view along the phase-encode axis.

    Args:
        image: channel-first ``(C, H, W)`` or ``(C, H, W, D)`` image (tensor, MetaTensor or array),
            non-negative, at the intensity scale of the source: corrupt before normalising.
        kind: one of :data:`CORRUPTIONS`.
        level: ``0`` (identity) to ``len(SEVERITIES[kind])``.
        seed: integer ``>= 0``; see :func:`corruption_seed` for per-item seeds.
        phase_axis: the phase-encode axis for ``motion`` and ``ghosting``, as a spatial axis (``0`` is
            the first axis after the channel; ``-1``, the default, the last).

    Returns:
        The corrupted image with the type, shape, dtype and device of ``image`` (a MetaTensor keeps its
        metadata; integer dtypes are rounded and clipped to their range). For ``level=0`` ``image``
        itself. Channels without any voxel ``> 0`` are returned unchanged (nothing to scale by).

    Raises:
        ValueError: for an unknown ``kind``, a ``level`` out of range, a bad ``seed`` or ``phase_axis``,
            or an image that is not 3D/4D.
        InputDataError: (a ValueError) naming the file, for NaN/Inf voxels or an image with clearly
            negative voxels (normalised already?).
    """
    kind, level, seed = _check_args(kind, level, seed)
    img_t = convert_to_tensor(image, track_meta=isinstance(image, MetaTensor))
    if img_t.ndim not in (3, 4):
        raise ValueError(f"image must be (C, H, W) or (C, H, W, D), got shape {tuple(img_t.shape)}.")
    if img_t.dtype == torch.bool or img_t.is_complex():
        raise ValueError(f"image must be a real-valued intensity image, got dtype {img_t.dtype}.")
    axis = _spatial_axis(phase_axis, img_t.ndim - 1)
    name = image_name(img_t)
    check_finite(img_t, name)  # before the level-0 shortcut: the outcome must not depend on the level
    if level == 0:
        return image

    x = img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t
    x = x.detach().to(device="cpu", dtype=torch.float64)
    scale = robust_max(x)
    minima = x.reshape(x.shape[0], -1).amin(dim=1)
    bad = minima < -_NEGATIVE_TOLERANCE * scale
    if bool(bad.any()):
        c = int(torch.nonzero(bad)[0])
        raise InputDataError(
            f"has negative voxels (channel {c}: min {float(minima[c]):.4g}, robust max "
            f"{float(scale[c]):.4g}): corruptions need the de-normalised magnitude image, apply them "
            "before intensity normalisation",
            name,
        )
    rng = np.random.RandomState(
        np.random.SeedSequence([seed, zlib.crc32(kind.encode())]).generate_state(1)[0]
    )
    out = _KINDS[kind](x, scale, float(SEVERITIES[kind][level - 1]), rng, axis)
    out = _plain(out).to(torch.float64)
    empty = scale <= 0
    if bool(empty.any()):
        out[empty] = x[empty]
    if not img_t.dtype.is_floating_point:
        info = torch.iinfo(img_t.dtype)
        out = out.round().clamp(info.min, info.max)
    dst = image if isinstance(image, (np.ndarray, torch.Tensor)) else img_t  # numpy in, numpy out
    return convert_to_dst_type(out, dst=dst, dtype=dst.dtype, device=img_t.device)[0]


class Corrupt(Transform):
    """Apply corruption ``kind`` at a fixed ``level`` with a fixed ``seed``: see :func:`corrupt`.

    Not randomisable on purpose: the output is a function of the image and the arguments only, so
    every model of a robustness study sees the same corrupted image.

    Args:
        kind: one of :data:`CORRUPTIONS`.
        level: ``0`` (identity) to ``len(SEVERITIES[kind])``.
        seed: integer ``>= 0``.
        phase_axis: phase-encode axis (spatial) for ``motion`` and ``ghosting``.

    Raises:
        ValueError: for an unknown ``kind``, a ``level`` out of range or a bad ``seed``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, kind: str, level: int, seed: int = 0, phase_axis: int = -1) -> None:
        self.kind, self.level, self.seed = _check_args(kind, level, seed)
        self.phase_axis = int(phase_axis)

    def __call__(self, img: NdarrayOrTensor, seed: int | None = None) -> NdarrayOrTensor:
        """Corrupt ``img``.

        Args:
            img: channel-first, de-normalised image ``(C, H, W)`` or ``(C, H, W, D)``.
            seed: overrides the seed given at construction (e.g. a per-item seed).

        Returns:
            See :func:`corrupt`.
        """
        return corrupt(img, self.kind, self.level, self.seed if seed is None else seed, self.phase_axis)


class Corruptd(MapTransform):
    """Dictionary version of :class:`Corrupt`, with a seed per item and key.

    Key ``k`` of an item is corrupted with seed ``corruption_seed(seed, data[id_key], k)`` when
    ``id_key`` is given, else ``corruption_seed(seed, k)``: the seed depends on the item's identity
    (subject id, slice index, row of the datalist), never on the order in which a data loader or its
    workers visit the items. Without ``id_key`` every item gets the same noise realisation.

    Args:
        keys: keys of the images to corrupt (de-normalised images: place before normalisation).
        kind: one of :data:`CORRUPTIONS`.
        level: ``0`` (identity) to ``len(SEVERITIES[kind])``.
        seed: integer ``>= 0``.
        id_key: key of a stable per-item identifier (int or str, or a one-element tensor/array).
        phase_axis: phase-encode axis (spatial) for ``motion`` and ``ghosting``.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        ValueError: for an unknown ``kind``, a ``level`` out of range or a bad ``seed``.
    """

    backend = Corrupt.backend

    def __init__(
        self,
        keys: KeysCollection,
        kind: str,
        level: int,
        seed: int = 0,
        id_key: str | None = None,
        phase_axis: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.corrupter = Corrupt(kind, level, seed, phase_axis)
        self.id_key = id_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Corrupt every key of ``data``; returns a shallow copy.

        Raises:
            KeyError: if ``id_key`` is set and missing from ``data``.
        """
        d = dict(data)
        if self.id_key is not None and self.id_key not in d:
            raise KeyError(f"id_key {self.id_key!r} is not in the data (keys: {list(d)})")
        item = () if self.id_key is None else (d[self.id_key],)
        for key in self.key_iterator(d):
            d[key] = self.corrupter(d[key], seed=corruption_seed(self.corrupter.seed, *item, key))
        return d


# --------------------------------------------------------------------------------------- helpers


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return int(seed)


def _check_args(kind: str, level: int, seed: int) -> tuple[str, int, int]:
    kind = look_up_option(kind, CORRUPTIONS)
    n = len(SEVERITIES[kind])
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= level <= n:
        raise ValueError(f"level for {kind!r} must be an integer in 0..{n}, got {level!r}.")
    return kind, int(level), _check_seed(seed)


def _scalar(part: Any) -> Any:
    """Identifiers from a collated batch arrive as one-element tensors or arrays: use their value."""
    if isinstance(part, (torch.Tensor, np.ndarray)) and math.prod(part.shape) == 1:
        part = part.item()
    if isinstance(part, numbers.Integral) and not isinstance(part, bool):
        return int(part)
    return str(part)


def _spatial_axis(axis: int, n_spatial: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -n_spatial <= axis < n_spatial:
        raise ValueError(f"phase_axis must be a spatial axis in [{-n_spatial}, {n_spatial}), got {axis!r}.")
    return int(axis) % n_spatial


def _plain(t: Any) -> torch.Tensor:
    return convert_to_tensor(t, track_meta=False)


def _torchio() -> Any:
    tio, ok = optional_import("torchio")
    if not ok:
        raise ImportError("the 'motion' and 'ghosting' corruptions need TorchIO: pip install 'torchio<2.0'")
    return tio


# ------------------------------------------------------------------------------------ the kinds
# Each takes the float64 CPU image (C, *spatial), the per-channel robust max (C,), the severity, the
# seeded RandomState and the phase-encode axis (spatial index), and returns the corrupted image.


def _gaussian(
    x: torch.Tensor, scale: torch.Tensor, s: float, rng: np.random.RandomState, _: int
) -> torch.Tensor:
    out = torch.empty_like(x)
    # RandGaussianNoise has one std for all channels: one transform per channel, all drawing from rng
    for c in range(x.shape[0]):
        noise = RandGaussianNoise(
            prob=1.0, mean=0.0, std=s * float(scale[c]), dtype=np.float64, sample_std=False
        )
        noise.set_random_state(state=rng)
        out[c : c + 1] = _plain(noise(x[c : c + 1]))
    return out


def _rician(
    x: torch.Tensor, scale: torch.Tensor, s: float, rng: np.random.RandomState, _: int
) -> torch.Tensor:
    noise = RandRicianNoise(
        prob=1.0,
        mean=0.0,
        std=[s * float(v) for v in scale],
        channel_wise=True,
        relative=False,
        sample_std=False,
        dtype=np.float64,
    )
    noise.set_random_state(state=rng)
    return _plain(noise(x.clone()))  # channel_wise writes into its input: never hand it ours


def _bias_field(
    x: torch.Tensor, _: torch.Tensor, s: float, rng: np.random.RandomState, __: int
) -> torch.Tensor:
    # RandBiasField's coefficients are uniform in coeff_range, so a fixed range still gives fields of
    # random strength. Its field on an image of ones is exp(p) for a random polynomial p; p is rescaled
    # here to peak-to-peak s, so the shape is random (seeded) and the strength fixed by the level.
    field = RandBiasField(degree=_BIAS_DEGREE, coeff_range=(-1.0, 1.0), dtype=np.float64, prob=1.0)
    field.set_random_state(state=rng)
    log_field = torch.log(_plain(field(torch.ones((1, *x.shape[1:]), dtype=torch.float64))).to(torch.float64))
    lo, hi = log_field.min(), log_field.max()
    log_field = (log_field - (lo + hi) / 2) * (s / float(hi - lo)) if float(hi - lo) > 0 else log_field * 0
    return x * torch.exp(log_field)


def _spike_location(shape: Sequence[int], rng: np.random.RandomState) -> tuple[int, ...]:
    """A k-space index (fft-shifted, DC at ``n // 2``) at >= 25% of Nyquist along at least one axis."""
    while True:  # rejection sampling: accepts with probability 1 - 0.25**ndim
        u = rng.uniform(-1.0, 1.0, size=len(shape))
        if np.abs(u).max() >= _SPIKE_MIN_RADIUS:
            break
    return tuple(
        int(np.clip(n // 2 + math.floor(v * n / 2), 0, n - 1)) for v, n in zip(u, shape, strict=True)
    )


def _spikes(
    x: torch.Tensor, scale: torch.Tensor, s: float, rng: np.random.RandomState, _: int
) -> torch.Tensor:
    loc = _spike_location(x.shape[1:], rng)
    n_voxels = math.prod(x.shape[1:])
    # KSpaceSpikeNoise sets the log-magnitude at loc; a coefficient of magnitude A there adds a cosine of
    # amplitude A / n_voxels to the (real part of the) image, so A = s * robust max * n_voxels.
    magnitude = [max(s * float(v) * n_voxels, 1e-30) for v in scale]
    spikes = KSpaceSpikeNoise(
        loc=[(c, *loc) for c in range(x.shape[0])], k_intensity=[math.log(m) for m in magnitude]
    )
    return _plain(spikes(x))


def _gibbs(x: torch.Tensor, _: torch.Tensor, s: float, __: np.random.RandomState, ___: int) -> torch.Tensor:
    return _plain(GibbsNoise(alpha=s)(x))


def _unit_vector(rng: np.random.RandomState, n: int) -> np.ndarray:
    v = rng.normal(size=n)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _motion(
    x: torch.Tensor, _: torch.Tensor, s: float, rng: np.random.RandomState, axis: int
) -> torch.Tensor:
    tio = _torchio()
    # TorchIO's Motion fills k-space segments along the LAST axis of a 3D image: move the phase-encode
    # axis there, and give a 2D slice a singleton axis in the middle, (C, A, 1, PE), so that the slice
    # plane is the (first, last) plane and the in-plane rotation is about the middle axis.
    y = torch.movedim(x, axis + 1, -1)
    is_2d = y.ndim == 3
    if is_2d:
        y = y.unsqueeze(2)
    # two movements, before and after the central lines; Motion gives the segment holding the centre
    # of k-space (the first time > 0.5) to the unmoved image, so the outer fraction s is corrupted
    times = np.array([s / 2, 1.0 - s / 2])
    a = _MOTION_AMPLITUDE
    degrees = np.zeros((len(times), 3))
    translation = np.zeros((len(times), 3))
    for i in range(len(times)):
        if is_2d:
            degrees[i, 1] = a * rng.choice((-1.0, 1.0))
            translation[i, [0, 2]] = a * _unit_vector(rng, 2)
        else:
            degrees[i] = a * _unit_vector(rng, 3)
            translation[i] = a * _unit_vector(rng, 3)
    motion = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear")
    # the default affine of a tensor input is the identity: translations are in pixels
    out = _plain(motion(y)).to(torch.float64)
    if is_2d:
        out = out.squeeze(2)
    return torch.movedim(out, -1, axis + 1)


def _ghosting(
    x: torch.Tensor, _: torch.Tensor, s: float, __: np.random.RandomState, axis: int
) -> torch.Tensor:
    tio = _torchio()
    y = x.unsqueeze(-1) if x.ndim == 3 else x  # TorchIO images are 3D: a slice gets a singleton depth
    ghosting = tio.Ghosting(num_ghosts=_GHOSTS, axis=axis, intensity=s, restore=None)
    out = _plain(ghosting(y)).to(torch.float64)
    return out.squeeze(-1) if x.ndim == 3 else out


_KINDS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, np.random.RandomState, int], torch.Tensor]] = {
    "gaussian": _gaussian,
    "rician": _rician,
    "bias_field": _bias_field,
    "spikes": _spikes,
    "gibbs": _gibbs,
    "motion": _motion,
    "ghosting": _ghosting,
}


CorruptD = CorruptDict = Corruptd
