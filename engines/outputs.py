"""Reading the loss out of an Ignite/MONAI engine's ``state.output``, for loggers and progress bars.

MONAI engines store their iteration output as a *decollated* list of per-sample dicts (the batch loss
is replicated into every item) or, with ``decollate=False``, as a single dict; plain Ignite engines
store whatever their process function returns. One tolerant reader keeps every handler's default
working with all of them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import CommonKeys

__all__ = ["loss_dict_from_output", "loss_from_output"]


def loss_from_output(output: Any, key: str = CommonKeys.LOSS) -> float | None:
    """The scalar loss in an engine output, or ``None`` when there is none (nothing is logged then).

    Args:
        output: ``engine.state.output``: a decollated list of dicts, a dict, a 1-element tensor or a number.
        key: the dict key holding the loss (MONAI's ``CommonKeys.LOSS``, ``"loss"``).

    Returns:
        The loss as a Python float, or ``None`` when ``output`` holds no scalar loss.
    """
    # a decollated batch: every item carries the same replicated batch loss, the first one suffices
    if isinstance(output, (list, tuple)):
        if not output:
            return None
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get(key)
    if isinstance(output, torch.Tensor):
        return float(output.detach().item()) if output.numel() == 1 else None
    if isinstance(output, numbers.Real) and not isinstance(output, bool):
        return float(output)
    return None


def loss_dict_from_output(output: Any, key: str = CommonKeys.LOSS) -> dict[str, float]:
    """Like :func:`loss_from_output` but as ``{key: value}`` (empty when there is no loss).

    Ignite's ``ProgressBar`` renders a dict as ``key=value`` postfixes and would warn on ``None``.

    Args:
        output: ``engine.state.output``.
        key: the dict key holding the loss, also used as the displayed name.

    Returns:
        ``{key: loss}`` or ``{}``.
    """
    value = loss_from_output(output, key)
    return {} if value is None else {key: value}
