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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transforms.simplex import simplex3_reference, simplex_noise


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or '?'}, {os.cpu_count()} cores"


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


def main(argv: list[str] | None = None) -> int:
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

    ours = Ours(args)
    for _ in range(3):
        ours()  # warm up (allocator, caches)
    runners: dict[str, object] = {"ours": ours}
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
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, r in runners.items():  # alternate, so load changes hit every runner alike
            # torch and numba run separate OpenMP pools whose idle threads spin for a while after
            # a parallel region: pause, then one untimed call, so neither is timed against the other
            time.sleep(0.05)
            r()
            times[k].append(r())
    load1 = os.getloadavg()
    naive = naive_fields_per_s(args)

    def fps(k: str) -> tuple[float, float, float]:
        ts = times[k]
        return args.batch / statistics.median(ts), args.batch / max(ts), args.batch / min(ts)

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
    cmd = "python benchmarks/bench_simplex.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"### simplex noise, {args.size}x{args.size}, {args.octaves} octaves, batch {args.batch} "
        f"({datetime.date.today().isoformat()})",
        "",
        f"- machine: {cpu_model()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}",
        f"- command: `{cmd.strip()}`",
        f"- frequency {args.frequency:g}/px, decay {args.decay}, median of {args.repeats} alternating "
        f"repeats; load average {load0[0]:.2f} before, {load1[0]:.2f} after",
        "",
        "| implementation | fields/s (median) | ms/field | fields/s range |",
        "|---|---:|---:|---:|",
    ]
    for k in runners:
        med, lo, hi = fps(k)
        lines.append(f"| {labels[k]} | {med:.0f} | {1e3 / med:.2f} | {lo:.0f} - {hi:.0f} |")
    scaled = naive * args.naive_size**2 / args.size**2
    lines.append(
        f"| naive per-pixel Python loop over `simplex3_reference`, {args.naive_size}x{args.naive_size} "
        f"fields (scale only; about {scaled:.3f} fields/s at {args.size}x{args.size} by pixel count) "
        f"| {naive:.2f} | {1e3 / naive:.0f} | |"
    )
    if "os_shared" in runners:
        best_os = max(fps("os_reseed")[0], fps("os_shared")[0])
        lines += ["", f"ratio ours / opensimplex (faster variant): **{fps('ours')[0] / best_os:.2f}**"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        with args.write.open("a") as fh:
            fh.write("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
