"""Small helpers that bundle configs call: where the bundle lives, where the data is, time budgets.

A MONAI bundle config cannot see the path of its own file, and ``python -m monai.bundle run`` is
run from the repository root as often as from the bundle folder; :func:`bundle_root` finds the
bundle either way (``--bundle_root`` on the command line still overrides it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUDGET_ELAPSED_KEY",
    "BudgetCosineLR",
    "TimeBudget",
    "bundle_root",
    "demo_dataset_dir",
    "lr_schedule_handler",
]

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


BUDGET_ELAPSED_KEY = "budget_elapsed_seconds"
"""Name of the ``engine.state`` attribute holding the training seconds spent under a time budget; registered in
``engine.state_dict_user_keys``, so every checkpoint of the trainer carries it."""


class _BudgetClock:
    """Seconds of training spent under a time budget, continued across a resume.

    One clock per engine, shared by :class:`TimeBudget` and :class:`BudgetCosineLR`. The seconds of this run
    (since ``STARTED``) are added to the seconds found in ``engine.state`` at the first reading after
    ``STARTED``: 0 for a fresh run, the saved value once :class:`engines.ResumeCheckpointLoader` (a ``STARTED``
    handler too, in either order) has restored the trainer. The attribute is updated after every iteration, so a
    checkpoint holds the time as of the last iteration it includes.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._offset: float | None = None

    @classmethod
    def of(cls, engine: Any) -> _BudgetClock:
        """The engine's clock, created and attached on first use.

        Args:
            engine: an Ignite engine.

        Returns:
            The clock.
        """
        clock = getattr(engine, "_budget_clock", None)
        if clock is None:
            from ignite.engine import Events

            clock = cls()
            engine._budget_clock = clock
            if BUDGET_ELAPSED_KEY not in engine.state_dict_user_keys:
                engine.state_dict_user_keys.append(BUDGET_ELAPSED_KEY)
            setattr(engine.state, BUDGET_ELAPSED_KEY, 0.0)
            engine.add_event_handler(Events.STARTED, clock._started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, clock._update)
        return clock

    def _started(self, engine: Any) -> None:
        self._t0, self._offset = time.monotonic(), None
        if engine.state.iteration == 0:
            # a fresh run (also a second run() of a finished engine); a resume overwrites it after this
            setattr(engine.state, BUDGET_ELAPSED_KEY, 0.0)

    def elapsed(self, engine: Any) -> float:
        """Budget seconds spent: saved seconds of earlier runs plus this run's.

        Args:
            engine: the engine the clock belongs to.

        Returns:
            The seconds.
        """
        if self._t0 is None:
            self._started(engine)
        if self._offset is None:
            self._offset = float(getattr(engine.state, BUDGET_ELAPSED_KEY, 0.0) or 0.0)
        return self._offset + time.monotonic() - self._t0

    def _update(self, engine: Any) -> None:
        setattr(engine.state, BUDGET_ELAPSED_KEY, self.elapsed(engine))


class TimeBudget:
    """Stop training cleanly once a wall-clock budget is spent (checked after every iteration).

    Ignite's ``TimeLimit`` does the same but has no ``attach``, so it cannot stand in a bundle's
    handler list; this wrapper calls ``engine.terminate()``, after which ``COMPLETED`` still fires
    and the final checkpoint is written. The time spent is saved with the trainer's state
    (:data:`BUDGET_ELAPSED_KEY`), so a run resumed from a checkpoint continues the budget where the
    checkpoint left it rather than starting a full one (the repeated part of an unfinished epoch counts again).

    Args:
        minutes: the budget; ``None`` or ``<= 0`` disables it.
    """

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None or minutes <= 0 else float(minutes) * 60.0
        self._clock: _BudgetClock | None = None

    def attach(self, engine: Any) -> None:
        """Register with the trainer.

        Args:
            engine: an Ignite engine.
        """
        from ignite.engine import Events

        if self.seconds is None:
            return
        self._clock = _BudgetClock.of(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _check(self, engine: Any) -> None:
        if self._clock is None or self.seconds is None:
            return
        spent = self._clock.elapsed(engine) > self.seconds
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


class BudgetCosineLR:
    """Linear warm-up, then cosine decay of the learning rate to ``min_lr_ratio`` over a wall-clock budget.

    A cosine schedule over ``epochs x iterations`` is cut short by :class:`TimeBudget` at an unknown point, so
    training stops at a high learning rate and the final weights are wherever the last large steps left them
    (measured on the demo's 4-class task: validation accuracy of consecutive epochs swinging between 0.2 and
    0.65, and the final-epoch model 0.22 where the epoch before gave 0.66). Decaying over the budget itself ends
    every run annealed. Set at every iteration from the budget time spent, which the trainer's checkpoints carry
    (see :class:`TimeBudget`): a resumed run continues the warm-up and the decay where its checkpoint left them.
    Under DDP rank 0's clock decides, as in :class:`TimeBudget`, so all ranks step with the same rate.

    Args:
        optimizer: the optimizer; each group's ``initial_lr`` (set by a torch LR scheduler) or else its ``lr`` at
            start is its peak rate.
        minutes: the budget (> 0).
        warmup_iterations: iterations of linear warm-up from 0.
        min_lr_ratio: the rate at the end of the budget, as a fraction of the peak.

    Raises:
        ValueError: a non-positive budget or a ratio outside [0, 1].
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        minutes: float,
        warmup_iterations: int = 0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not minutes or minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.optimizer, self.seconds = optimizer, float(minutes) * 60.0
        self.warmup, self.min_ratio = int(warmup_iterations), float(min_lr_ratio)
        self._peaks: list[float] = []

    def attach(self, engine: Any) -> None:
        """Register with the trainer.

        Args:
            engine: an Ignite engine.
        """
        from ignite.engine import Events

        _BudgetClock.of(engine)  # attached before the first ITERATION_STARTED
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set)

    def _started(self, engine: Any) -> None:
        # a torch LR scheduler built on the same optimizer (kept for the epoch-based mode and the checkpoint) has
        # already set lr to its own step-0 value (0 for a warm-up); its "initial_lr" is the configured peak (and
        # survives a resume, which restores the optimizer's decayed "lr")
        self._peaks = [float(g.get("initial_lr", g["lr"])) for g in self.optimizer.param_groups]

    def factor(self, progress: float, iteration: int) -> float:
        """The multiplier of the peak rate.

        Args:
            progress: fraction of the budget spent (clipped to [0, 1]).
            iteration: iterations done before this one (counting those of resumed runs).

        Returns:
            warm-up factor x (min + (1 - min) x (1 + cos(pi x progress)) / 2).
        """
        p = min(max(progress, 0.0), 1.0)
        warm = min(1.0, (iteration + 1) / self.warmup) if self.warmup > 0 else 1.0
        return warm * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))

    def _set(self, engine: Any) -> None:
        if not self._peaks:
            self._started(engine)
        progress = _BudgetClock.of(engine).elapsed(engine) / self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([progress], device=_dist_device())
            torch.distributed.broadcast(t, src=0)
            progress = float(t.item())
        # Ignite counts the iteration before ITERATION_STARTED fires; a resumed trainer counts on from its checkpoint
        f = self.factor(progress, engine.state.iteration - 1)
        for g, peak in zip(self.optimizer.param_groups, self._peaks, strict=True):
            g["lr"] = peak * f


def lr_schedule_handler(
    lr_scheduler: Any, optimizer: torch.optim.Optimizer, minutes: float | None, warmup_iterations: int = 0
) -> Any:
    """The learning-rate handler of a training: over the time budget when there is one, else per iteration.

    Args:
        lr_scheduler: the iteration-based scheduler used without a budget (e.g. MONAI ``WarmupCosineSchedule``
            over ``epochs x iterations``).
        optimizer: its optimizer.
        minutes: the time budget; ``None`` or ``<= 0``: no budget.
        warmup_iterations: warm-up of the budget schedule.

    Returns:
        :class:`BudgetCosineLR` or MONAI's ``LrScheduleHandler(lr_scheduler, epoch_level=False)``.
    """
    if minutes is not None and minutes > 0:
        return BudgetCosineLR(optimizer, minutes, warmup_iterations)
    from monai.handlers import LrScheduleHandler

    return LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False)


def _dist_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
