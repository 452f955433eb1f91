"""Fields per second of multi-octave simplex noise: ``transforms.simplex`` (torch) vs ``opensimplex`` + numba.

Both produce the same work: ``--batch`` independent ``--size``x``--size`` fields, each the sum over
``--octaves`` octaves of 3D noise sampled on a 2D slice (``decay**o * noise(x f 2**o, y f 2**o,
z f 2**o)``), in one process, timed alternately (ours, opensimplex, ours, ...) so a change in machine
load hits both; the median over ``--repeats`` is reported.

* ours: ``simplex_noise((B, 1, S, S), normalise=False)``, torch eager, ``--threads`` intra-op threads
  (default: all cores), float32, independent permutation per field.
* opensimplex 0.4.5 with numba: ``OpenSimplex(seed).noise3array(x, y, z)`` per octave (numba
  ``parallel=True``, JIT-compiled on the first call: warmed up first, compile time excluded), octave sum
  in numpy, float64 (its only dtype). Two variants: a new seed per field (independent fields, as
  AnoDDPM's ``newSeed()``; the seeding is pure Python) and one seed with a different ``z`` per field.
  The ratio is taken against the faster variant.
* naive: a per-pixel Python loop over ``simplex3_reference`` at ``--naive-size`` (scale only).

Usage::

    python benchmarks/bench_simplex.py                       # CPU, prints a markdown table
    python benchmarks/bench_simplex.py --write docs/benchmarks.md
    python benchmarks/bench_simplex.py --device cuda         # ours on the GPU (opensimplex on CPU)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import cpu_model, load_average
from transforms.simplex import simplex3_reference, simplex_noise

__all__ = ["measure_simplex", "parse_args", "simplex_report"]


class Ours:
    def __init__(self, args: argparse.Namespace) -> None:
        self.shape = (args.batch, 1, args.size, args.size)
        self.kw = dict(frequency=args.frequency, octaves=args.octaves, decay=args.decay, normalise=False)
        self.device = torch.device(args.device)
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def __call__(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        simplex_noise(self.shape, generator=self.gen, device=self.device, **self.kw)
        sync()
        return time.perf_counter() - t0


class OpenSimplexNumba:
    def __init__(self, args: argparse.Namespace, reseed: bool) -> None:
        import numba  # noqa: F401  (opensimplex silently falls back to pure Python without it)
        from opensimplex import OpenSimplex

        self.cls = OpenSimplex
        self.args = args
        self.reseed = reseed
        self.coords = np.arange(args.size, dtype=np.float64)
        self.rng = np.random.default_rng(0)
        self.shared = OpenSimplex(1)
        self.field(self.shared, 1.0)  # JIT compile (cached on disk after the first run)

    def field(self, gen, z: float) -> np.ndarray:
        a = self.args
        out = np.zeros((1, a.size, a.size))
        for o in range(a.octaves):
            f = a.frequency * 2.0**o
            out += a.decay**o * gen.noise3array(self.coords * f, self.coords * f, np.array([z * f]))
        return out

    def __call__(self) -> float:
        seeds = self.rng.integers(0, 2**62, size=self.args.batch)
        zs = self.rng.uniform(0, 256, size=self.args.batch)
        t0 = time.perf_counter()
        out = np.empty((self.args.batch, 1, self.args.size, self.args.size))
        for b in range(self.args.batch):
            gen = self.cls(int(seeds[b])) if self.reseed else self.shared
            out[b] = self.field(gen, float(zs[b]))
        return time.perf_counter() - t0


def naive_fields_per_s(args: argparse.Namespace) -> float:
    perm = np.random.default_rng(0).permutation(256).tolist()
    n = args.naive_size
    t0 = time.perf_counter()
    for _ in range(args.naive_fields):
        z = 17.0
        for yy in range(n):
            for xx in range(n):
                v = 0.0
                for o in range(args.octaves):
                    f = args.frequency * 2.0**o
                    v += args.decay**o * simplex3_reference(xx * f, yy * f, z * f, perm)
    return args.naive_fields / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also the parameters of :func:`measure_simplex`; ``parse_args([])`` gives the defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--octaves", type=int, default=6)
    p.add_argument("--frequency", type=float, default=2**-5)
    p.add_argument("--decay", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu", help="cpu or cuda (ours only; opensimplex is CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--naive-size", type=int, default=16)
    p.add_argument("--naive-fields", type=int, default=2)
    p.add_argument("--no-opensimplex", action="store_true")
    p.add_argument("--write", type=Path, default=None, help="append the report to this markdown file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def measure_simplex(args: argparse.Namespace) -> dict[str, Any]:
    """Time ours, opensimplex (two variants) and the naive loop, alternating (see the module docstring).

    Args:
        args: the parameters (:func:`parse_args`).

    Returns:
        ``{"rows": [{"key", "label", "fields_per_s", "ms_per_field", "fields_per_s_min", "fields_per_s_max"}],
        "naive": {"label", "fields_per_s", "ms_per_field", "scaled_fields_per_s"}, "ratio": ours over the faster
        opensimplex variant (None without opensimplex), "load_before", "load_after", "threads"}``.
    """
    ours = Ours(args)
    for _ in range(3):
        ours()  # warm up (allocator, caches)
    runners: dict[str, Any] = {"ours": ours}
    if not args.no_opensimplex:
        try:
            runners["os_reseed"] = OpenSimplexNumba(args, reseed=True)
            runners["os_shared"] = OpenSimplexNumba(args, reseed=False)
        except ImportError as e:
            print(
                f"opensimplex/numba not installed ({e}); pip install 'opensimplex>=0.4.5,<0.5' 'numba>=0.60,<1'"
            )
    torch.set_num_threads(args.threads)  # after importing numba, whose OpenMP start-up resets it
    for r in runners.values():
        r()
    load0 = load_average()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, r in runners.items():  # alternate, so load changes hit every runner alike
            # torch and numba run separate OpenMP pools whose idle threads spin for a while after
            # a parallel region: pause, then one untimed call, so neither is timed against the other
            time.sleep(0.05)
            r()
            times[k].append(r())
    load1 = load_average()
    naive = naive_fields_per_s(args)

    dev = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} torch threads"
    )
    labels = {
        "ours": f"ours: `transforms.simplex.simplex_noise`, torch {torch.__version__} eager, float32, {dev}",
        "os_reseed": "opensimplex 0.4.5 + numba `noise3array`, new seed per field, float64",
        "os_shared": "opensimplex 0.4.5 + numba `noise3array`, one seed, own z per field, float64",
    }
    rows = []
    for k, ts in times.items():
        med = args.batch / statistics.median(ts)
        rows.append(
            {
                "key": k,
                "label": labels[k],
                "fields_per_s": med,
                "ms_per_field": 1e3 / med,
                "fields_per_s_min": args.batch / max(ts),
                "fields_per_s_max": args.batch / min(ts),
            }
        )
    fps = {r["key"]: r["fields_per_s"] for r in rows}
    ratio = fps["ours"] / max(fps["os_reseed"], fps["os_shared"]) if "os_shared" in fps else None
    return {
        "rows": rows,
        "naive": {
            "label": f"naive per-pixel Python loop over `simplex3_reference`, {args.naive_size}x{args.naive_size} "
            "fields",
            "fields_per_s": naive,
            "ms_per_field": 1e3 / naive,
            "scaled_fields_per_s": naive * args.naive_size**2 / args.size**2,
        },
        "ratio": ratio,
        "load_before": load0,
        "load_after": load1,
        "threads": torch.get_num_threads(),
    }


def simplex_report(args: argparse.Namespace, result: dict[str, Any], command: str) -> str:
    """The Markdown section of one run (the format of the existing entries in ``docs/benchmarks.md``)."""
    lines = [
        f"### simplex noise, {args.size}x{args.size}, {args.octaves} octaves, batch {args.batch} "
        f"({datetime.date.today().isoformat()})",
        "",
        f"- machine: {cpu_model()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}",
        f"- command: `{command.strip()}`",
        f"- frequency {args.frequency:g}/px, decay {args.decay}, median of {args.repeats} alternating "
        f"repeats; load average {result['load_before']:.2f} before, {result['load_after']:.2f} after",
        "",
        "| implementation | fields/s (median) | ms/field | fields/s range |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['fields_per_s']:.0f} | {r['ms_per_field']:.2f} "
            f"| {r['fields_per_s_min']:.0f} - {r['fields_per_s_max']:.0f} |"
        )
    n = result["naive"]
    lines.append(
        f"| {n['label']} (scale only; about {n['scaled_fields_per_s']:.3f} fields/s at {args.size}x{args.size} "
        f"by pixel count) | {n['fields_per_s']:.2f} | {n['ms_per_field']:.0f} | |"
    )
    if result["ratio"] is not None:
        lines += ["", f"ratio ours / opensimplex (faster variant): **{result['ratio']:.2f}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run, print the Markdown report and append it to ``--write``."""
    args = parse_args(argv)
    result = measure_simplex(args)
    cmd = "python benchmarks/bench_simplex.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = simplex_report(args, result, cmd)
    print(report)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        with args.write.open("a") as fh:
            fh.write("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
