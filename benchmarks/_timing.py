"""Timing and machine-description helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CallCounter",
    "cpu_model",
    "device_name",
    "load_average",
    "machine_info",
    "measure",
    "sync",
    "timeit",
]


class CallCounter:
    """Counts calls of a module (a forward pre-hook): the network calls per reconstruction are read off the run
    instead of derived from the schedule, so the table cannot disagree with what was timed.

    Args:
        module: the module to watch.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        """The calls since the last ``take``, and reset."""
        n, self.count = self.count, 0
        return n

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU): CUDA calls return before the work is done,
    so a timing without it measures the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` runs of ``fn`` after ``warmup`` untimed runs, each synchronised on CUDA.

    Args:
        fn: the work to time.
        repeats: timed runs (at least 1).
        device: where the work runs (CUDA work is synchronised before and after each run).
        warmup: untimed runs first (allocator, cuDNN algorithm choice, lazy initialisation, compilation).

    Returns:
        Seconds per run, in run order.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timeit(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised).

    Args:
        fn: the work to time.
        repeats: timed runs.
        device: where the work runs (CUDA work is synchronised before and after each run).
        warmup: untimed runs first.

    Returns:
        Seconds.
    """
    return statistics.median(measure(fn, repeats, device, warmup))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's processor string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """``lscpu``'s model name and the core count, e.g. ``"AMD EPYC 7B13, 2 cores"``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or '?'}, {os.cpu_count()} cores"


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_info() -> dict[str, Any]:
    """What a benchmark entry records about the machine: CPU, Python, torch, threads and GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info
