"""The progress bar shows epochs, iterations and the loss; it is silent on a non-terminal."""

from __future__ import annotations

import io

import pytest
import torch
from monai.bundle import ConfigParser
from tqdm import tqdm

from engines import ProgressBarHandler, attach_progress_bar, loss_dict_from_output, loss_from_output
from tests.engines._toy import ITERS_PER_EPOCH, make_parts, make_trainer, record_losses


def test_bar_shows_epoch_iterations_and_loss() -> None:
    out = io.StringIO()
    handler = ProgressBarHandler(file=out, disable=False, persist=True)
    net, opt, _ = make_parts()
    trainer = make_trainer(net, opt, 2, [handler])
    losses = record_losses(trainer)
    trainer.run()
    text = out.getvalue()
    assert "Epoch [1/2]" in text and "Epoch [2/2]" in text
    assert f"[{ITERS_PER_EPOCH}/{ITERS_PER_EPOCH}]" in text
    assert f"loss={tqdm.format_num(losses[-1])}" in text  # the last iteration's loss is displayed


def test_attach_progress_bar_custom_desc() -> None:
    out = io.StringIO()
    net, opt, _ = make_parts()
    trainer = make_trainer(net, opt, 1)
    bar = attach_progress_bar(trainer, desc="toy-train", file=out, disable=False, persist=True)
    trainer.run()
    assert "toy-train" in out.getvalue() and "loss=" in out.getvalue()
    assert bar.pbar is None  # closed at the end of the epoch


def test_silent_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Default disable=None: a StringIO (or pytest's captured stderr) is not a TTY, so no output,
    and the run is unaffected."""
    out = io.StringIO()
    handlers = [ProgressBarHandler(file=out), ProgressBarHandler(desc="stderr")]
    net, opt, _ = make_parts()
    trainer = make_trainer(net, opt, 2, handlers)
    trainer.run()
    assert out.getvalue() == ""
    assert "stderr" not in capsys.readouterr().err
    assert trainer.state.iteration == 2 * ITERS_PER_EPOCH


def test_handler_from_bundle_config() -> None:
    parser = ConfigParser({"bar": {"_target_": "engines.ProgressBarHandler", "desc": "train"}})
    bar = parser.get_parsed_content("bar")
    assert isinstance(bar, ProgressBarHandler) and bar.desc == "train"


def test_loss_readers() -> None:
    t = torch.tensor(0.5)
    assert loss_from_output([{"loss": t, "pred": torch.ones(3)}]) == 0.5  # MONAI decollated output
    assert loss_from_output({"loss": t}) == 0.5  # decollate=False
    assert loss_from_output(t) == 0.5 and loss_from_output(2) == 2.0
    assert loss_from_output([]) is None and loss_from_output({"pred": t}) is None
    assert loss_from_output(torch.ones(3)) is None  # not a scalar
    assert loss_dict_from_output([{"loss": t}]) == {"loss": 0.5}
    assert loss_dict_from_output(None) == {}
