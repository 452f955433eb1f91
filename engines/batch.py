"""Batch inference that survives bad inputs: one faulty file is reported, the others are still processed.

A hospital folder export mixes good volumes with truncated files, localisers, CT series and half-copied
DICOM folders. Every bundle's inference therefore runs input by input: an input whose loading (or
inference) fails is recorded with the file and the fault, the run goes on with the next one, and at the
end ``failures.json`` lists every failure. By default the run then ends with :class:`BatchInputError` (a
non-zero exit status for scripts and schedulers) *after* all other results were written; with
``allow_failures`` it ends normally. Results already written are never touched: every writer in this
project writes through a temporary file and an atomic rename.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from monai.data import DataLoader
from monai.handlers import CheckpointLoader

from data_prep.atomic import atomic_write_text
from engines.checkpoint import load_weights
from transforms.errors import InputDataError
from transforms.pipeline import find_input_error

__all__ = [
    "BatchInputError",
    "BatchVolumeInference",
    "FailureLog",
    "InputFailure",
    "SafeCheckpointLoader",
    "describe_failure",
]

logger = logging.getLogger(__name__)

#: the report every batch inference writes into its output folder
FAILURES_FILE = "failures.json"


class BatchInputError(InputDataError):
    """Some inputs of a batch failed; raised after every other input was processed and written.

    ``path`` is the ``failures.json`` report; the message lists the failed inputs and their faults.
    """


@dataclass(frozen=True)
class InputFailure:
    """One input that could not be processed.

    Attributes:
        input: the input as given (a file, a DICOM folder, or a study's description).
        error: one line naming the faulty file and the fault.
        kind: the exception class (``InputDataError`` for recognised input faults).
    """

    input: str
    error: str
    kind: str


def describe_failure(exc: BaseException, source: str | os.PathLike | None) -> tuple[str, str]:
    """A one-line description of why an input failed, naming the file.

    Args:
        exc: the exception raised while loading or processing the input.
        source: the input (used when the error itself names no file).

    Returns:
        ``(message, kind)``: the :class:`InputDataError` in the exception chain when there is one (its
        message names the file and the fault), else ``"<source>: <Type>: <first line>"``.
    """
    err = find_input_error(exc)
    if err is not None:
        return str(err), type(err).__name__
    detail = (str(exc).strip().splitlines() or [""])[0][:500]
    where = os.fspath(source) if source is not None else "<input>"
    return f"{where}: {type(exc).__name__}: {detail}", type(exc).__name__


class FailureLog:
    """Collects the failed inputs of a batch run and reports them at the end.

    Args:
        output_dir: folder of the run's outputs; ``failures.json`` is written there.
        what: what an input is called in messages (``"input"``, ``"study"``).
    """

    def __init__(self, output_dir: str | os.PathLike, what: str = "input") -> None:
        self.output_dir = Path(output_dir)
        self.what = what
        self.failures: list[InputFailure] = []

    def record(self, source: str | os.PathLike | None, exc: BaseException) -> InputFailure:
        """Record one failure and log it as a warning (the run goes on).

        Args:
            source: the input that failed.
            exc: what was raised.

        Returns:
            The recorded failure.
        """
        message, kind = describe_failure(exc, source)
        failure = InputFailure(os.fspath(source) if source is not None else "", message, kind)
        self.failures.append(failure)
        logger.warning("skipping %s (%s); continuing with the others", self.what, message)
        return failure

    def finish(self, n_inputs: int, allow_failures: bool = False) -> Path:
        """Write ``failures.json`` and report; raise when inputs failed (unless allowed).

        The report is written even when nothing failed, so a pipeline can always read it.

        Args:
            n_inputs: how many inputs the run was given.
            allow_failures: end normally even when some inputs failed.

        Returns:
            The report's path.

        Raises:
            BatchInputError: some inputs failed and ``allow_failures`` is False; raised after the report
                and every other result were written. The message lists each failure.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        report = self.output_dir / FAILURES_FILE
        body = {
            "n_inputs": int(n_inputs),
            "n_failed": len(self.failures),
            "failures": [asdict(f) for f in self.failures],
        }
        atomic_write_text(report, json.dumps(body, indent=2) + "\n")
        if not self.failures:
            logger.info("all %d %s(s) processed", n_inputs, self.what)
            return report
        listing = "\n".join(f"  - {f.error}" for f in self.failures)
        summary = (
            f"{len(self.failures)} of {n_inputs} {self.what}(s) failed (the others were written):\n{listing}"
        )
        if allow_failures:
            logger.warning("%s\nreport: %s", summary, report)
            return report
        raise BatchInputError(summary, report)


def _source(item: Any, key: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(key)
    return item


class BatchVolumeInference:
    """Run an inference evaluator input by input, recording the inputs that fail instead of stopping.

    Each input is loaded with ``transform`` first (outside the engine, so a bad file never leaves the engine
    half-way through an epoch), then the evaluator runs on that one loaded input; its handlers write the
    outputs. Loading and inference failures are recorded in a :class:`FailureLog`.

    Args:
        evaluator: a MONAI ``SupervisedEvaluator`` (``decollate=False``, batch size 1) whose handlers write
            the outputs; its data loader is replaced per input.
        data: the inputs, dicts such as ``{"image": path}``.
        transform: the loading/preprocessing transform of one input dict.
        output_dir: where ``failures.json`` goes (the outputs' folder).
        allow_failures: end normally when some inputs failed (the report is written either way).
        image_key: the key naming the input file, for messages.
        name_key: key added to each input (when absent) with ``volume<n>`` (1-based input position), used by
            the figure handler to name files per input.

    Raises:
        BatchInputError: from :meth:`run`, after all inputs, when some failed and failures are not allowed.
    """

    def __init__(
        self,
        evaluator: Any,
        data: Sequence[Mapping[str, Any]],
        transform: Callable[[Any], Any],
        output_dir: str | os.PathLike,
        allow_failures: bool = False,
        image_key: str = "image",
        name_key: str = "subject",
    ) -> None:
        self.evaluator, self.data, self.transform = evaluator, list(data), transform
        self.allow_failures, self.image_key, self.name_key = bool(allow_failures), image_key, name_key
        self.failures = FailureLog(output_dir)
        self.succeeded: list[str] = []

    def run(self) -> list[str]:
        """Process every input.

        Returns:
            The inputs processed successfully, in order.

        Raises:
            BatchInputError: see the class.
        """
        if not self.data:
            raise InputDataError("no inputs to process (empty input list)")
        for i, item in enumerate(self.data):
            item = dict(item)
            item.setdefault(self.name_key, f"volume{i + 1:04d}")
            source = _source(item, self.image_key)
            try:
                loaded = self.transform(item)
            except Exception as e:  # any loading failure is this input's, not the run's
                self.failures.record(source, e)
                continue
            self.evaluator.data_loader = DataLoader([loaded], batch_size=1, shuffle=False, num_workers=0)
            # the engine keeps the epoch length of the loader it was built with; Ignite would cycle this
            # one-input loader to fill it
            self.evaluator.state.epoch_length = 1
            try:
                self.evaluator.run()
            except Exception as e:
                self.failures.record(source, e)
                # Ignite 0.5 keeps the generator of a run that raised and would resume it (doing nothing) on
                # the next run() instead of starting afresh; there is no public reset, so drop it here
                self.evaluator._internal_run_generator = None
                continue
            self.succeeded.append(os.fspath(source) if source is not None else "")
        self.failures.finish(len(self.data), self.allow_failures)
        return self.succeeded


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` for inference that loads the weights at once, safely, and only once.

    MONAI's loader opens the file when the engine starts, so in a batch run a missing, corrupt or unsafe
    checkpoint would surface as the first input's failure (and again for every input), with torch's own
    message. Here the weights are read and copied into ``load_dict`` when the bundle config builds the
    handler, through :func:`engines.load_checkpoint` (``weights_only=True``, pickled code refused, errors
    naming the file); attaching it to an engine then does nothing more. Not for resuming a trainer: use
    :class:`engines.ResumeCheckpointLoader`, which restores at ``STARTED``.

    Args:
        load_path: the checkpoint file.
        load_dict: name → network (usually ``{"model": network}``); each is filled strictly from the entry of
            that name, or from the whole file when it is a bare state dict (as the bundles' final model files
            are), and put in eval mode.
        map_location: where tensors are read (``load_state_dict`` copies them to the parameters' device).
        name: logger name.

    Raises:
        InputDataError: the file is missing, truncated or corrupt, or its weights do not fit the network
            (names the file).
        UnsafeCheckpointError: the file carries pickled code.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: dict,
        map_location: Any = "cpu",
        name: str | None = None,
    ) -> None:
        super().__init__(
            load_path=os.fspath(load_path), load_dict=load_dict, name=name, map_location=map_location
        )
        for key, network in load_dict.items():
            # the same checked, weights_only load and strict fit every other bundle uses (load_weights)
            load_weights(network, load_path, map_location=map_location, key=key)
        logger.info("loaded weights from %s", load_path)

    def attach(self, engine: Any) -> None:
        """Nothing to do: the weights were loaded at construction.

        Args:
            engine: the evaluator.
        """

    def __call__(self, engine: Any) -> None:
        """Nothing to do: the weights were loaded at construction.

        Args:
            engine: the engine.
        """
