"""Multi-octave 3D simplex noise in torch, for AnoDDPM-style diffusion (Wyatt et al. 2022).

AnoDDPM (Wyatt, Leach, Schmon, Willcocks: "AnoDDPM: Anomaly Detection with Denoising Diffusion
Probabilistic Models using Simplex Noise", CVPR Workshops 2022) replaces the Gaussian noise of a
DDPM by fractal simplex noise: 3D simplex noise sampled on a 2D slice of the field, summed over
octaves,

    noise(x, y) = sum_{o=0}^{O-1} decay**o * simplex(x * f * 2**o, y * f * 2**o, z * f * 2**o),

with ``f`` the base frequency in 1/pixel (the reference code passes the period ``1/f`` and halves it
per octave) and ``z`` the third coordinate of the slice, scaled like ``x`` and ``y`` (the reference
``rand_3d_fixed_T_octaves`` uses the diffusion step ``T`` as ``z``; here it is drawn uniformly in
``[0, 256)`` per field). Amplitudes are ``1, decay, decay**2, ...`` and are not renormalised, as in
the reference.

Differences from the reference code (github.com/Julian-Wyatt/AnoDDPM, ``simplex.py``):

* the reference wraps OpenSimplex (Kurt Spencer's algorithm, via the ``opensimplex`` package); this
  module implements Stefan Gustavson's 3D simplex noise ("Simplex noise demystified", 2005: skew
  1/3, unskew 1/6, radius**2 0.6, 12 gradient directions, output factor 32). Both are gradient noise
  on a simplex lattice with the same role; values differ point by point and in scale (see
  :func:`simplex_noise` for the measured std).
* the reference draws one field per call and repeats it across the batch (and fails for batch > 1
  in ``generate_simplex_noise`` of some versions); here every field, one per sample and channel,
  has its own random permutation table and its own ``z``, drawn from a ``torch.Generator`` on the
  requested device.
* the field is computed for all samples and octaves at once in torch (CPU or CUDA); no numba.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

__all__ = [
    "RandSimplexNoise",
    "RandSimplexNoiseD",
    "RandSimplexNoiseDict",
    "RandSimplexNoised",
    "simplex3",
    "simplex3_reference",
    "simplex_noise",
    "simplex_noise_like",
]

_F3 = 1.0 / 3.0  # skew factor (sqrt(4) - 1) / 3
_G3 = 1.0 / 6.0  # unskew factor (1 - 1 / sqrt(4)) / 3
_RADIUS2 = 0.6  # Gustavson's kernel radius**2 (0.5 would be continuous; 0.6 is the published value)
_SCALE = 32.0  # output factor: values lie in about [-1, 1]
# the 12 gradient directions: midpoints of the edges of a cube
_GRAD3 = (
    (1, 1, 0),
    (-1, 1, 0),
    (1, -1, 0),
    (-1, -1, 0),
    (1, 0, 1),
    (-1, 0, 1),
    (1, 0, -1),
    (-1, 0, -1),
    (0, 1, 1),
    (0, -1, 1),
    (0, 1, -1),
    (0, -1, -1),
)
_Z_RANGE = 256.0  # the per-field third coordinate (in pixels) is uniform in [0, _Z_RANGE)
_CHUNK_POINTS = 1 << 17  # CPU: points per evaluation block and torch thread (see simplex_noise)
_CHUNK_POINTS_CUDA = 1 << 24


def simplex3_reference(x: float, y: float, z: float, perm: Sequence[int]) -> float:
    """Gustavson's 3D simplex noise at one point, in pure Python (the reference for tests).

    A line-by-line transcription of Stefan Gustavson's ``SimplexNoise.noise(x, y, z)`` (2005,
    public domain): skew ``F3 = 1/3``, unskew ``G3 = 1/6``, kernel ``max(0, 0.6 - r**2)**4``, 12
    gradient directions chosen by ``perm[...] % 12``, output scaled by 32.

    Args:
        x: first coordinate.
        y: second coordinate.
        z: third coordinate.
        perm: a permutation of ``0..255`` (256 entries; a 512-entry doubled table is accepted too).

    Returns:
        The noise value, in about [-1, 1]; exactly 0 at lattice points.

    Raises:
        ValueError: if ``perm`` has fewer than 256 entries.
    """
    if len(perm) < 256:
        raise ValueError(f"perm must have 256 entries, got {len(perm)}.")
    p = [int(perm[n & 255]) for n in range(512)]
    s = (x + y + z) * _F3
    i, j, k = math.floor(x + s), math.floor(y + s), math.floor(z + s)
    t = (i + j + k) * _G3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)
    if x0 >= y0:
        if y0 >= z0:
            i1, j1, k1, i2, j2, k2 = 1, 0, 0, 1, 1, 0
        elif x0 >= z0:
            i1, j1, k1, i2, j2, k2 = 1, 0, 0, 1, 0, 1
        else:
            i1, j1, k1, i2, j2, k2 = 0, 0, 1, 1, 0, 1
    elif y0 < z0:
        i1, j1, k1, i2, j2, k2 = 0, 0, 1, 0, 1, 1
    elif x0 < z0:
        i1, j1, k1, i2, j2, k2 = 0, 1, 0, 0, 1, 1
    else:
        i1, j1, k1, i2, j2, k2 = 0, 1, 0, 1, 1, 0
    corners = (
        (0, 0, 0, x0, y0, z0),
        (i1, j1, k1, x0 - i1 + _G3, y0 - j1 + _G3, z0 - k1 + _G3),
        (i2, j2, k2, x0 - i2 + 2 * _G3, y0 - j2 + 2 * _G3, z0 - k2 + 2 * _G3),
        (1, 1, 1, x0 - 1 + 3 * _G3, y0 - 1 + 3 * _G3, z0 - 1 + 3 * _G3),
    )
    ii, jj, kk = i & 255, j & 255, k & 255
    total = 0.0
    for ci, cj, ck, dx, dy, dz in corners:
        tc = _RADIUS2 - dx * dx - dy * dy - dz * dz
        if tc < 0:
            continue
        gx, gy, gz = _GRAD3[p[ii + ci + p[jj + cj + p[kk + ck]]] % 12]
        tc *= tc
        total += tc * tc * (gx * dx + gy * dy + gz * dz)
    return _SCALE * total


@functools.lru_cache(maxsize=16)
def _grad3(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 12 gradients as a (12, 3) tensor, copied to each device once."""
    return torch.tensor(_GRAD3, dtype=dtype).to(device)


class _Tables:
    """Per-field lookup tables for :func:`_simplex3_core` (flattened over fields).

    ``idx[b * 512 + n] = b * 512 + perm_b[n % 256]``: the field offset is folded into the values, so
    the nested lookups ``perm[i + perm[j + perm[k]]]`` need no per-point offset arithmetic except the
    first one. ``gx/gy/gz[b * 512 + n]`` hold the gradient of ``perm_b[n % 256] % 12`` (the last
    lookup and the gradient table composed into one gather per component).
    """

    def __init__(self, perm: torch.Tensor, dtype: torch.dtype) -> None:
        n_fields = perm.shape[0]
        device = perm.device
        perm512 = torch.cat([perm, perm], dim=1).to(torch.int32)  # (B, 512)
        base = (torch.arange(n_fields, device=device, dtype=torch.int32) * 512).view(-1, 1)
        self.idx = (perm512 + base).reshape(-1)
        grad = _grad3(device, dtype)[(perm512 % 12).long()]  # (B, 512, 3)
        # gathered through an int32 view (same bits): index_select on int32 is faster than on float on CPU
        itype = torch.int64 if dtype == torch.float64 else torch.int32
        self.ftype = dtype
        self.gx = grad[..., 0].reshape(-1).contiguous().view(itype)
        self.gy = grad[..., 1].reshape(-1).contiguous().view(itype)
        self.gz = grad[..., 2].reshape(-1).contiguous().view(itype)
        self.base = base.view(-1)  # (B,) int32


def _simplex3_core(
    u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, tables: _Tables, base: torch.Tensor
) -> torch.Tensor:
    """Vectorised Gustavson simplex noise; ``u, v, w`` broadcast to ``(B, ...)``, row ``b`` uses table
    offset ``base[b]`` (a multiple of 512, see :class:`_Tables`).

    Every step is an elementwise op or a gather over all points at once (no branches: the corner
    choice uses comparisons with exactly the tie-breaking of :func:`simplex3_reference`). Written for
    few passes over memory on CPU: in-place ops, no mixed-dtype arithmetic (which would copy), the
    ``p[k]``/``p[k + 1]`` lookups shared by the four corners.
    """
    shape = torch.broadcast_shapes(u.shape, v.shape, w.shape)
    ftype = torch.promote_types(torch.promote_types(u.dtype, v.dtype), w.dtype)
    s = torch.add(u, v + w).mul_(_F3)
    if s.shape != shape:
        s = s.expand(shape).contiguous()
    # skewed coordinates -> cell origin (float) and the unskewed offsets x0, y0, z0 from it
    fi = torch.add(u, s).floor_()
    fj = torch.add(v, s).floor_()
    fk = s.add_(w).floor_()
    t = torch.add(fi, fj).add_(fk).mul_(_G3)
    x0 = torch.sub(u, fi).add_(t).reshape(-1)
    y0 = torch.sub(v, fj).add_(t).reshape(-1)
    z0 = torch.sub(w, fk).add_(t).reshape(-1)
    bview = base.to(torch.int32).view((-1,) + (1,) * (len(shape) - 1))
    ii = fi.to(torch.int32).bitwise_and_(255).reshape(-1)
    jj = fj.to(torch.int32).bitwise_and_(255).reshape(-1)
    kk = fk.to(torch.int32).bitwise_and_(255).add_(bview).reshape(-1)  # the table offset enters once, here
    del s, t, fi, fj, fk
    # which of the 6 tetrahedra: a = x0 >= y0, b = y0 >= z0, c = x0 >= z0 (Gustavson's branch order);
    # second corner (i1, j1, k1) = the largest coordinate, third (i2, j2, k2) = the two largest
    a = x0 >= y0
    b = y0 >= z0
    c = x0 >= z0
    bc = b | c
    masks = (
        a & c,  # i1
        b > a,  # j1 = b & ~a
        bc.logical_not_(),  # k1 = ~b & ~c
        a | c,  # i2
        b >= a,  # j2 = b | ~a
        (b & c).logical_not_(),  # k2 = ~b | ~c
    )
    del a, b, c
    imask = [m.to(torch.int32) for m in masks]
    fmask = [m.to(ftype) for m in masks]
    del masks
    # hash p[i + p[j + p[k]]]: p[k] and p[k + 1] once; the corners pick between them
    idx = tables.idx
    pk0 = idx.index_select(0, kk)
    pk1 = idx.index_select(0, kk.add_(1))
    dpk = torch.sub(pk1, pk0)
    del kk
    out = None
    for corner in range(4):
        if corner == 0:
            dx, dy, dz = x0, y0, z0
            h = idx.index_select(0, torch.add(pk0, jj)).add_(ii)
        elif corner == 3:
            off = 3 * _G3 - 1.0
            dx, dy, dz = x0 + off, y0 + off, z0 + off
            h = idx.index_select(0, pk1.add_(jj).add_(1)).add_(ii).add_(1)
        else:
            ci, cj, ck = imask[3 * corner - 3 : 3 * corner]
            fi_, fj_, fk_ = fmask[3 * corner - 3 : 3 * corner]
            off = corner * _G3
            dx = torch.sub(x0, fi_).add_(off)
            dy = torch.sub(y0, fj_).add_(off)
            dz = torch.sub(z0, fk_).add_(off)
            h = torch.mul(dpk, ck).add_(pk0).add_(jj).add_(cj)
            h = idx.index_select(0, h).add_(ii).add_(ci)
        # kernel max(0, 0.6 - r2)**4 == min(0, r2 - 0.6)**4
        tc = torch.mul(dx, dx).addcmul_(dy, dy).addcmul_(dz, dz).sub_(_RADIUS2).clamp_max_(0.0)
        tc.mul_(tc)
        tc.mul_(tc)
        ft = tables.ftype
        g = tables.gx.index_select(0, h).view(ft).mul_(dx)
        g.addcmul_(tables.gy.index_select(0, h).view(ft), dy).addcmul_(
            tables.gz.index_select(0, h).view(ft), dz
        )
        if out is None:
            out = g.mul_(tc)
        else:
            out.addcmul_(tc, g)
    assert out is not None
    return out.mul_(_SCALE).view(shape)


def _check_perm(perm: torch.Tensor) -> torch.Tensor:
    if perm.ndim == 1:
        perm = perm.unsqueeze(0)
    if perm.ndim != 2 or perm.shape[-1] != 256:
        raise ValueError(f"perm must have shape (256,) or (B, 256), got {tuple(perm.shape)}.")
    return perm


def simplex3(
    x: torch.Tensor | float, y: torch.Tensor | float, z: torch.Tensor | float, perm: torch.Tensor
) -> torch.Tensor:
    """Gustavson's 3D simplex noise at a set of points, vectorised in torch.

    Args:
        x: first coordinates; ``x``, ``y``, ``z`` broadcast to one shape. With a ``(B, 256)`` ``perm``
            that shape must start with ``B`` (point set ``b`` uses permutation ``b``).
        y: second coordinates.
        z: third coordinates.
        perm: a permutation of ``0..255``, shape ``(256,)``, or one per point set, ``(B, 256)``.

    Returns:
        Noise values, same shape as the broadcast coordinates, dtype of the coordinates (float32
        if they are not floating point); equal to :func:`simplex3_reference` up to rounding.

    Raises:
        ValueError: if ``perm`` has the wrong shape or the coordinates do not start with ``B``.
    """
    squeeze = torch.as_tensor(perm).ndim == 1
    perm = _check_perm(torch.as_tensor(perm))
    device = perm.device
    ts = [torch.as_tensor(c, device=device) for c in (x, y, z)]
    dtype = torch.promote_types(torch.promote_types(ts[0].dtype, ts[1].dtype), ts[2].dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    ts = [c.to(dtype) for c in ts]
    shape = torch.broadcast_shapes(*(c.shape for c in ts))
    if squeeze:
        ts = [c.unsqueeze(0) for c in ts]
    elif len(shape) == 0 or shape[0] != perm.shape[0]:
        raise ValueError(
            f"coordinates of shape {tuple(shape)} must start with B={perm.shape[0]} for perm of shape (B, 256)."
        )
    tables = _Tables(perm, dtype)
    out = _simplex3_core(ts[0], ts[1], ts[2], tables, tables.base)
    return out[0] if squeeze else out


def _positive(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _check_params(frequency: float, octaves: int, decay: float) -> None:
    if not _positive(frequency):
        raise ValueError(f"frequency must be a finite number > 0 (in 1/pixel), got {frequency!r}.")
    if isinstance(octaves, bool) or not isinstance(octaves, numbers.Integral) or octaves < 1:
        raise ValueError(f"octaves must be an integer >= 1, got {octaves!r}.")
    if not _positive(decay):
        raise ValueError(f"decay must be a finite number > 0, got {decay!r}.")


def _draw_fields(
    n_fields: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-field randomness: a permutation of 0..255 (``(n, 256)`` int64) and ``z`` in ``[0, 256)``."""
    gen_device = generator.device if generator is not None else device
    keys = torch.rand((n_fields, 256), generator=generator, device=gen_device)
    zoff = torch.rand((n_fields,), generator=generator, device=gen_device, dtype=dtype) * _Z_RANGE
    # stable: ties between keys (possible in float32) must not make the permutation device-dependent
    perm = torch.argsort(keys, dim=1, stable=True)
    return perm.to(device, non_blocking=True), zoff.to(device, non_blocking=True)


def simplex_noise(
    shape: Sequence[int],
    frequency: float = 2**-5,
    octaves: int = 6,
    decay: float = 0.8,
    normalise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Multi-octave simplex noise, one independent field per sample and channel (AnoDDPM).

    Field ``(b, c)`` is ``sum_o decay**o * simplex3(x * f_o, y * f_o, z_bc * f_o)`` with
    ``f_o = frequency * 2**o``, ``x`` the column and ``y`` the row index in pixels (for volumes
    ``(H, W, D)`` the third coordinate is ``d + z_bc``), its own random permutation table and its own
    ``z_bc`` uniform in ``[0, 256)``, all drawn from ``generator`` on ``device``: the same seed gives
    the same tensor, and nothing is synchronised between host and device. See Wyatt et al., "AnoDDPM:
    Anomaly Detection with Denoising Diffusion Probabilistic Models using Simplex Noise", CVPRW 2022.

    Args:
        shape: ``(B, C, H, W)``, or ``(B, C, H, W, D)`` for volumes.
        frequency: base frequency in 1/pixel; default ``2**-5``. The reference code's
            ``frequency`` argument is the period ``1 / frequency`` (its training default 64 is
            ``2**-6`` here).
        octaves: number of octaves ``O``; octave ``o`` has frequency ``frequency * 2**o``.
        decay: amplitude ratio between consecutive octaves (the reference's ``persistence``).
        normalise: if True (default), each field is shifted and scaled to mean 0 and std 1 over its
            pixels (population std), so it can stand in for ``torch.randn``. If False, the raw
            octave sum is returned, as AnoDDPM uses it. Measured with the defaults: per-field std
            0.68 at 64**2, 128**2 and 256**2 (single octave: 0.42); AnoDDPM's OpenSimplex sum has
            0.50 (``docs/benchmarks.md``), so multiply by about 0.73 for its raw amplitude. Values
            are bounded by ``(1 - decay**O) / (1 - decay)`` in magnitude.
        generator: source of randomness; if its device differs from ``device`` the random draws
            are made there and copied over (pass a generator on ``device`` to avoid the copy).
            None uses torch's default generator for ``device``.
        device: where the noise is computed and returned; default: the generator's device, or CPU.
        dtype: floating-point dtype of the result (half types are computed in float32).

    Returns:
        A tensor of ``shape``.

    Raises:
        ValueError: if ``shape`` does not have 4 or 5 entries (or has a non-positive one),
            ``frequency <= 0``, ``octaves < 1`` or ``decay <= 0``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5) or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, H, W) or (B, C, H, W, D) with positive sizes, got {shape}.")
    _check_params(frequency, octaves, decay)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n_fields = shape[0] * shape[1]
    spatial = shape[2:]
    perm, zoff = _draw_fields(n_fields, generator, device, work)

    octv = torch.arange(octaves, device=device, dtype=work)
    freqs = frequency * torch.pow(2.0, octv)  # (O,)
    amps = torch.pow(float(decay), octv)  # (O,)
    height = spatial[0]
    ys = torch.arange(height, device=device, dtype=work)
    xs = torch.arange(spatial[1], device=device, dtype=work)
    ds = torch.arange(spatial[2], device=device, dtype=work) if len(spatial) == 3 else None
    tables = _Tables(perm, work)
    base = tables.base
    noise = torch.zeros((n_fields, *spatial), device=device, dtype=work)
    # Blocks of (fields, octaves, rows of the image): on CPU a block holds about _CHUNK_POINTS points
    # per torch thread, so the ~20 temporaries stay in cache while the per-call overhead of ~130
    # torch calls per block stays small (1 thread, 16 x 128**2 x 6 octaves: 2**17 points about 10%
    # faster than 2**16 or 2**18); on CUDA one block is usually everything.
    if device.type == "cpu":
        chunk = _CHUNK_POINTS * max(1, torch.get_num_threads())
    else:
        chunk = _CHUNK_POINTS_CUDA
    per_row = math.prod(spatial)
    if octaves * per_row <= chunk:
        fb, ob, hb = chunk // (octaves * per_row), octaves, height
    elif per_row <= chunk:
        fb, ob, hb = 1, chunk // per_row, height
    else:
        fb, ob, hb = 1, 1, max(1, chunk // (per_row // height))
    extra = (1,) * (len(spatial) - 2)
    for f0 in range(0, n_fields, fb):
        f1 = min(n_fields, f0 + fb)
        m = f1 - f0
        for o0 in range(0, octaves, ob):
            o1 = min(octaves, o0 + ob)
            k = o1 - o0
            f = freqs[o0:o1].view(1, k, 1, 1, *extra)
            for h0 in range(0, height, hb):
                h1 = min(height, h0 + hb)
                # one row per (field, octave): x = column, y = row, z = the field's offset (+ depth)
                u = (xs.view(1, 1, 1, -1, *extra) * f).expand(m, -1, -1, -1, *extra)
                v = (ys[h0:h1].view(1, 1, -1, 1, *extra) * f).expand(m, -1, -1, -1, *extra)
                z = zoff[f0:f1].view(m, 1, 1, 1, *extra)
                w = (z if ds is None else z + ds.view(1, 1, 1, 1, -1)) * f
                shape_rows = (m * k,)
                val = _simplex3_core(
                    u.reshape(shape_rows + u.shape[2:]),
                    v.reshape(shape_rows + v.shape[2:]),
                    w.expand(m, k, *w.shape[2:]).reshape(shape_rows + w.shape[2:]),
                    tables,
                    base[f0:f1].view(m, 1).expand(m, k).reshape(-1),
                )
                val = val.view(m, k, -1).mul_(amps[o0:o1].view(1, k, 1)).sum(1)
                noise[f0:f1, h0:h1] += val.view(m, h1 - h0, *spatial[1:])
    noise = noise.view(n_fields, -1)
    if normalise:
        std, mean = torch.std_mean(noise, dim=1, correction=0, keepdim=True)
        noise = (noise - mean) / std.clamp_min(torch.finfo(work).tiny)
    return noise.view(shape).to(dtype)


def simplex_noise_like(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """:func:`simplex_noise` with the shape, device and dtype of ``x`` (like ``torch.randn_like``).

    Args:
        x: a ``(B, C, H, W)`` or ``(B, C, H, W, D)`` tensor.
        kwargs: passed to :func:`simplex_noise` (``frequency``, ``octaves``, ``decay``,
            ``normalise``, ``generator``; ``device``/``dtype`` override those of ``x``).

    Returns:
        A tensor like ``x``.

    Raises:
        ValueError: as :func:`simplex_noise`.
    """
    kwargs.setdefault("device", x.device)
    kwargs.setdefault("dtype", x.dtype if x.dtype.is_floating_point else torch.float32)
    return simplex_noise(tuple(x.shape), **kwargs)


class RandSimplexNoise(RandomizableTransform):
    """Add multi-octave simplex noise (AnoDDPM, Wyatt et al. 2022) to a channel-first image.

    With probability ``prob`` adds ``std * simplex_noise(...)`` (unit-variance noise per channel,
    one independent field per channel) to a ``(C, H, W)`` or ``(C, H, W, D)`` image. The noise
    field is seeded from ``self.R``, so ``set_random_state`` makes it reproducible.

    Args:
        prob: probability of adding noise.
        std: standard deviation of the added noise (in image intensity units).
        frequency: base frequency in 1/pixel.
        octaves: number of octaves.
        decay: amplitude ratio between consecutive octaves.

    Raises:
        ValueError: for ``std < 0`` or invalid ``frequency``, ``octaves``, ``decay``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.1,
        std: float = 0.1,
        frequency: float = 2**-5,
        octaves: int = 6,
        decay: float = 0.8,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        _check_params(frequency, octaves, decay)
        if not (isinstance(std, numbers.Real) and math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}.")
        self.std = float(std)
        self.frequency = float(frequency)
        self.octaves = int(octaves)
        self.decay = float(decay)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Add the noise (with probability ``prob``).

        Args:
            img: channel-first image, ``(C, H, W)`` or ``(C, H, W, D)``.
            randomize: draw a new decision and seed first (False: reuse the last ones).

        Returns:
            The image with noise added (same type, float dtype), or ``img`` unchanged.

        Raises:
            ValueError: if ``img`` is not 3D or 4D.
        """
        if randomize:
            self.randomize()
        if not self._do_transform or self.std == 0:
            return img
        x = convert_to_tensor(img, track_meta=True)
        if x.ndim not in (3, 4):
            raise ValueError(f"img must be (C, H, W) or (C, H, W, D), got shape {tuple(x.shape)}.")
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        gen = torch.Generator(device=x.device).manual_seed(self._seed)
        noise = simplex_noise(
            (1, *x.shape),
            frequency=self.frequency,
            octaves=self.octaves,
            decay=self.decay,
            generator=gen,
            device=x.device,
            dtype=dtype,
        )[0]
        out = x.to(dtype) + self.std * noise
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class RandSimplexNoised(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandSimplexNoise`: every key gets the same draw.

    Args:
        keys: keys of the images to noise.
        prob: probability of adding noise (one decision for all keys).
        std: standard deviation of the added noise.
        frequency: base frequency in 1/pixel.
        octaves: number of octaves.
        decay: amplitude ratio between consecutive octaves.
        allow_missing_keys: do not raise for missing keys.
    """

    backend = RandSimplexNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        std: float = 0.1,
        frequency: float = 2**-5,
        octaves: int = 6,
        decay: float = 0.8,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.rand_simplex_noise = RandSimplexNoise(
            prob=1.0, std=std, frequency=frequency, octaves=octaves, decay=decay
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSimplexNoised:
        super().set_random_state(seed, state)
        self.rand_simplex_noise.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Add one noise draw to every key (with probability ``prob``, decided once)."""
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.rand_simplex_noise.randomize()
        for key in self.key_iterator(d):
            d[key] = self.rand_simplex_noise(d[key], randomize=False)
        return d


RandSimplexNoiseD = RandSimplexNoiseDict = RandSimplexNoised
