"""Small helpers that bundle configs call: where the bundle lives, where the data is, time budgets.

A MONAI bundle config cannot see the path of its own file, and ``python -m monai.bundle run`` is
run from the repository root as often as from the bundle folder; :func:`bundle_root` finds the
bundle either way (``--bundle_root`` on the command line still overrides it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["TimeBudget", "bundle_root", "demo_dataset_dir"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


def bundle_root(name: str) -> str:
    """The folder of bundle ``name``.

    Looked for, in order: ``$MEDDIFF_BUNDLE_ROOT``; the working folder when it is the bundle
    (``configs/metadata.json`` present and the folder named ``name``); ``./bundles/<name>``; the
    ``bundles/<name>`` folder beside the installed packages.

    Args:
        name: the bundle's folder name, e.g. ``"anoddpm_simplex"``.

    Returns:
        The absolute path.

    Raises:
        FileNotFoundError: when none of these exist.
    """
    env = os.environ.get("MEDDIFF_BUNDLE_ROOT")
    cands = [Path(env)] if env else []
    cwd = Path.cwd()
    cands += [cwd, cwd / "bundles" / name, _REPO / "bundles" / name]
    for c in cands:
        if (c / "configs" / "metadata.json").is_file() and (c.name == name or (c == cands[0] and env)):
            return str(c.resolve())
    raise FileNotFoundError(
        f"bundle {name!r} not found (looked in {[str(c) for c in cands]}); pass --bundle_root"
    )


def demo_dataset_dir(path: str | None = None, build: bool = True) -> str:
    """The demo cohort folder, built on first use (cached; a second call is instant).

    Args:
        path: the folder; default ``$MEDDIFF_DEMO_DIR`` or ``~/.cache/meddiff-bundles/demo``.
        build: build the cohort if it is missing or stale.

    Returns:
        The absolute path of the cohort (with ``datalists/`` inside).
    """
    from data_prep.demo import build_demo_cohort

    p = Path(
        path or os.environ.get("MEDDIFF_DEMO_DIR") or Path.home() / ".cache" / "meddiff-bundles" / "demo"
    )
    if build:
        build_demo_cohort(p, verbose=True)
    return str(p.absolute())


class TimeBudget:
    """Stop training cleanly once a wall-clock budget is spent (checked after every iteration).

    Ignite's ``TimeLimit`` does the same but has no ``attach``, so it cannot stand in a bundle's
    handler list; this wrapper calls ``engine.terminate()``, after which ``COMPLETED`` still fires
    and the final checkpoint is written.

    Args:
        minutes: the budget; ``None`` or ``<= 0`` disables it.
    """

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None or minutes <= 0 else float(minutes) * 60.0
        self._start: float | None = None

    def attach(self, engine: Any) -> None:
        """Register with the trainer.

        Args:
            engine: an Ignite engine.
        """
        from ignite.engine import Events

        if self.seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Any) -> None:
        self._start = time.monotonic()

    def _check(self, engine: Any) -> None:
        if self._start is None or self.seconds is None:
            return
        spent = time.monotonic() - self._start > self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same iteration, or the others hang in the next all-reduce:
            # rank 0's clock decides (one tiny broadcast per iteration)
            flag = torch.tensor([float(spent)], device=_dist_device())
            torch.distributed.broadcast(flag, src=0)
            spent = bool(flag.item())
        if spent:
            logger.info(
                "time budget of %.1f min spent at epoch %d, iteration %d: stopping",
                self.seconds / 60,
                engine.state.epoch,
                engine.state.iteration,
            )
            engine.terminate()


def _dist_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
