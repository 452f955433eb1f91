"""A tiny deterministic training setup shared by the engine tests (CPU, a few milliseconds per epoch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader

N_ITEMS = 8
BATCH = 2
ITERS_PER_EPOCH = N_ITEMS // BATCH


def make_parts(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A 2-layer net (no dropout), SGD with momentum and a StepLR decaying after epoch 3.

    Momentum buffers and the scheduler's epoch count are state a resume must restore to match an
    uninterrupted run, so an exact-resume test fails if either is lost.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    return net, opt, sched


def make_loader() -> DataLoader:
    """8 fixed random items, 4 iterations per epoch, fixed order (shuffle=False) for exact replays."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N_ITEMS, 4, generator=g)
    y = torch.randn(N_ITEMS, 1, generator=g)
    data = [{"image": x[i], "label": y[i]} for i in range(N_ITEMS)]
    return DataLoader(data, batch_size=BATCH, shuffle=False, num_workers=0)


def make_trainer(
    net: nn.Module, opt: torch.optim.Optimizer, max_epochs: int, handlers: Sequence[Any] = ()
) -> SupervisedTrainer:
    """A MONAI SupervisedTrainer on CPU with the given handlers (attached in list order)."""
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=make_loader(),
        network=net,
        optimizer=opt,
        loss_function=nn.MSELoss(),
        train_handlers=list(handlers),
    )


def record_losses(trainer: SupervisedTrainer) -> list[float]:
    """Attach a recorder of the per-iteration loss; returns the (growing) list."""
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _rec(engine: Any) -> None:
        losses.append(float(engine.state.output[0]["loss"]))

    return losses


class GaussianEps(nn.Module):
    """The optimal epsilon-predictor for data ``x0 ~ N(mu, sigma^2)`` i.i.d. per pixel.

    ``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)`` with ``a = alpha_bar_t``.
    """

    def __init__(self, scheduler: Any, mu: float = 0.0, sigma: float = 0.3) -> None:
        super().__init__()
        self.a = scheduler.alphas_cumprod
        self.mu, self.sigma = mu, sigma
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append(int(timesteps[0]))
        a = self.a[timesteps].view(-1, *([1] * (x.ndim - 1))).to(x)
        return (1 - a) ** 0.5 * (x - a**0.5 * self.mu) / (a * self.sigma**2 + 1 - a)
