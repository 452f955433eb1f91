"""Time-budget helpers of bundle configs: TimeBudget stops a run, BudgetCosineLR anneals over the budget."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

import engines.bundle as bundle
from engines.bundle import BudgetCosineLR, TimeBudget, lr_schedule_handler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_cosine_lr_follows_the_clock_and_time_budget_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(bundle.time, "monotonic", clock)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = BudgetCosineLR(opt, minutes=1.0, warmup_iterations=2, min_lr_ratio=0.1)
    seen: list[float] = []

    def step(engine: Engine, _: object) -> None:
        seen.append(opt.param_groups[0]["lr"])
        clock.now += 15.0  # every iteration takes a quarter of the budget

    engine = Engine(step)
    sched.attach(engine)
    TimeBudget(1.0).attach(engine)
    engine.run(range(100), max_epochs=1)
    # progress 0, 0.25, 0.5, 0.75, 1.0 (the budget is spent after the 5th iteration); warm-up halves the first
    expected = [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for p in (0, 0.25, 0.5, 0.75, 1.0)]
    expected[0] *= 0.5
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.01), "the run ends at min_lr_ratio x the peak"


def test_peak_is_the_configured_rate_beside_a_warmup_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MONAI warm-up scheduler built on the same optimizer sets lr to 0 at construction; the peak must not be
    read from there (it was: every run then trained at lr 0)."""
    from monai.optimizers import WarmupCosineSchedule

    clock = Clock()
    monkeypatch.setattr(bundle.time, "monotonic", clock)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    WarmupCosineSchedule(opt, warmup_steps=10, t_total=100)
    assert opt.param_groups[0]["lr"] == 0.0
    sched = BudgetCosineLR(opt, minutes=1.0)
    engine = Engine(lambda e, b: None)
    sched.attach(engine)
    engine.run([0], max_epochs=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_lr_schedule_handler_picks_by_budget() -> None:
    from monai.handlers import LrScheduleHandler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    steps = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert isinstance(lr_schedule_handler(steps, opt, 2.0), BudgetCosineLR)
    assert isinstance(lr_schedule_handler(steps, opt, 0), LrScheduleHandler)
    assert isinstance(lr_schedule_handler(steps, opt, None), LrScheduleHandler)
    with pytest.raises(ValueError, match="minutes"):
        BudgetCosineLR(opt, 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        BudgetCosineLR(opt, 1, min_lr_ratio=2)


def test_time_budget_and_its_lr_schedule_continue_after_a_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget time spent is part of the trainer's state dict: a resumed run stops and anneals as the
    uninterrupted run would, instead of starting a full budget (and a new warm-up) again."""
    clock = Clock()
    monkeypatch.setattr(bundle.time, "monotonic", clock)

    def make() -> tuple[Engine, list[float]]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        seen: list[float] = []

        def step(engine: Engine, _: object) -> None:
            seen.append(opt.param_groups[0]["lr"])
            clock.now += 10.0

        engine = Engine(step)
        BudgetCosineLR(opt, minutes=1.0, warmup_iterations=3).attach(engine)
        TimeBudget(1.0).attach(engine)
        return engine, seen

    ref, ref_lrs = make()
    ref.run(range(2), max_epochs=10)
    assert ref.state.iteration == 7  # 70 s > 60 s after the 7th iteration

    clock.now = 0.0
    first, _ = make()
    first.run(range(2), max_epochs=2)  # 40 s of the 60 s budget
    saved = first.state_dict()
    assert saved[bundle.BUDGET_ELAPSED_KEY] == pytest.approx(40.0)

    clock.now = 1000.0  # a later start: only the time spent training counts
    resumed, lrs = make()
    # as engines.ResumeCheckpointLoader does: the saved state, with this run's max_epochs
    resumed.add_event_handler(Events.STARTED, lambda e: e.load_state_dict({**saved, "max_epochs": 10}))
    resumed.run(range(2), max_epochs=10)
    assert resumed.state.iteration == ref.state.iteration
    assert lrs == pytest.approx(ref_lrs[4:])
    assert resumed.state_dict()[bundle.BUDGET_ELAPSED_KEY] == pytest.approx(70.0)

    clock.now = 0.0
    fresh, _ = make()
    fresh.run(range(2), max_epochs=10)  # nothing loaded: a full budget
    assert fresh.state.iteration == 7
