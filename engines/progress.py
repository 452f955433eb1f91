"""A tqdm progress bar showing the loss, for Ignite/MONAI engines and bundle handler lists.

By default the bar is drawn only when its output (stderr unless ``file=`` is given) is a terminal:
tqdm's ``disable=None``. Under batch schedulers, ``nohup`` or pytest capture the output is a file or
pipe, and a bar there would write a carriage-return line per update into the log; MONAI's
``StatsHandler`` already logs the loss in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ignite.handlers import ProgressBar

from engines.outputs import loss_dict_from_output

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ProgressBarHandler", "attach_progress_bar"]


def attach_progress_bar(
    engine: Engine,
    desc: str | None = None,
    output_transform: Callable[[Any], Any] = loss_dict_from_output,
    persist: bool = False,
    disable: bool | None = None,
    **tqdm_kwargs: Any,
) -> ProgressBar:
    """Attach Ignite's ``ProgressBar`` (one bar per epoch, advanced every iteration) showing the loss.

    Args:
        engine: the Ignite engine (a MONAI trainer or evaluator).
        desc: bar description; default ``"Epoch [e/E]"`` (``"Iteration"`` for single-epoch runs).
        output_transform: ``engine.state.output`` → ``{name: value}`` shown after the bar; the
            default reads MONAI's decollated ``"loss"``.
        persist: keep each finished epoch's bar on screen.
        disable: ``None`` (default) draws the bar only on a terminal; ``True``/``False`` force it.
        tqdm_kwargs: more ``tqdm`` arguments, e.g. ``file=`` or ``ncols=``.

    Returns:
        The attached ``ProgressBar``.
    """
    kwargs = dict(tqdm_kwargs)
    if desc is not None:
        kwargs["desc"] = desc
    bar = ProgressBar(persist=persist, disable=disable, **kwargs)
    bar.attach(engine, output_transform=output_transform)
    return bar


class ProgressBarHandler:
    """MONAI-style handler wrapping :func:`attach_progress_bar`, for a bundle's ``handlers`` list.

    Example bundle config entry::

        {"_target_": "engines.ProgressBarHandler", "desc": "train"}

    Args:
        desc: bar description (default: Ignite's ``"Epoch [e/E]"``).
        output_transform: ``engine.state.output`` → ``{name: value}`` to show.
        persist: keep finished bars on screen.
        disable: ``None`` draws only on a terminal; ``True``/``False`` force it.
        tqdm_kwargs: more ``tqdm`` arguments.
    """

    def __init__(
        self,
        desc: str | None = None,
        output_transform: Callable[[Any], Any] = loss_dict_from_output,
        persist: bool = False,
        disable: bool | None = None,
        **tqdm_kwargs: Any,
    ) -> None:
        self.desc = desc
        self.output_transform = output_transform
        self.persist = persist
        self.disable = disable
        self.tqdm_kwargs = tqdm_kwargs
        self.bar: ProgressBar | None = None

    def attach(self, engine: Engine) -> None:
        """Attach the bar to ``engine``.

        Args:
            engine: the Ignite engine.
        """
        self.bar = attach_progress_bar(
            engine,
            desc=self.desc,
            output_transform=self.output_transform,
            persist=self.persist,
            disable=self.disable,
            **self.tqdm_kwargs,
        )
