"""Inference of a trained slice classifier: an image (2D slice) or a volume (every brain slice) → class,
probabilities and a conformal prediction set, written as JSON.

The slice goes through the same steps as at training (longest side resized to the model's size, zero padding,
per-slice percentile normalisation); a volume is read with the project's volume loader (RAS, checked), cut into
slices along ``slice_axis``, and slices with too little foreground (``min_foreground``) are skipped. The conformal set uses the thresholds that ``evaluate.json``
calibrated for this model (``conformal_<model>.json``); its guarantee holds for data exchangeable with the
calibration split, which a different scanner or protocol is not.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize, SpatialPad
from torch import nn

from data_prep.atomic import atomic_write_text
from engines.robust_eval import conformal_set, load_conformal, predict_probabilities
from transforms.errors import InputDataError
from transforms.mask import ForegroundMask

__all__ = ["ClassifierInference"]

logger = logging.getLogger(__name__)


class ClassifierInference:
    """Classify 2D slices or every brain slice of 3D volumes with one trained model.

    Args:
        model: images ``(B, 1, S, S)`` → logits.
        class_names: the class order of the model.
        conformal_file: ``conformal_<model>.json`` from ``evaluate.json``.
        slice_loader: dict transform loading a 2D file as a raw ``(1, H, W)`` image (``image`` key).
        volume_loader: dict transform loading a 3D file (NIfTI or DICOM series folder) as ``(1, X, Y, Z)``.
        normalise: ``(1, S, S)`` raw → normalised (the training normalisation).
        output_dir: where ``<input name>_classes.json`` files go.
        image_size: the model's input side length ``S``.
        slice_axis: axis of the volume slices (2: axial for RAS volumes).
        min_foreground: slices of a volume whose foreground area (Otsu mask, largest component) is below this
            fraction of the largest slice's area are skipped (the demo's classification slices are those above
            0.6; slices at the top and bottom of the head are unlike anything the models saw).
        score: conformal score of the set.
        alpha: miscoverage rate of the set (one of those calibrated).
        device: where the model runs.
        model_name: recorded in the output.
        allow_failures: when some inputs fail, end :meth:`run` normally (the failures are reported in
            ``failures.json`` either way) instead of raising once the others are done.

    Raises:
        InputDataError: the conformal file is missing or calibrated for other classes.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        conformal_file: str | os.PathLike,
        slice_loader: Callable[[dict], dict],
        volume_loader: Callable[[dict], dict],
        normalise: Callable[[Any], Any],
        output_dir: str | os.PathLike,
        image_size: int = 64,
        slice_axis: int = 2,
        min_foreground: float = 0.6,
        score: str = "aps",
        alpha: float = 0.1,
        device: torch.device | str = "cpu",
        model_name: str = "",
        allow_failures: bool = False,
    ) -> None:
        self.model, self.class_names = model, list(class_names)
        self.allow_failures = bool(allow_failures)
        self.conformal = load_conformal(conformal_file, self.class_names)
        self.slice_loader, self.volume_loader, self.normalise = slice_loader, volume_loader, normalise
        self.output_dir = Path(output_dir)
        self.image_size, self.slice_axis = int(image_size), int(slice_axis)
        self.min_foreground, self.score, self.alpha = float(min_foreground), score, float(alpha)
        self.device, self.model_name = torch.device(device), model_name
        # fail now, not after the first image, on a score/alpha that was not calibrated
        conformal_set(
            np.full((1, len(self.class_names)), 1.0 / len(self.class_names)), self.conformal, score, alpha
        )
        self._resize = Resize(
            spatial_size=self.image_size, size_mode="longest", mode="bilinear", anti_aliasing=True
        )
        self._pad = SpatialPad(spatial_size=(self.image_size, self.image_size), value=0.0)

    @staticmethod
    def _ndim_of(path: str | os.PathLike) -> int:
        """Spatial dimensions of a file: 3 for a DICOM folder or a 3D NIfTI, else 2."""
        p = Path(path)
        if not p.exists():
            raise InputDataError("file does not exist", p)
        if p.is_dir():
            return 3
        name = p.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            try:
                shape = nib.load(str(p)).shape
            except Exception as e:
                raise InputDataError(
                    f"cannot be read as an image (NIfTI header: {type(e).__name__}: {e})", p
                ) from e
            return 3 if len([s for s in shape if s > 1]) >= 3 else 2
        return 2

    def _slices(self, path: str | os.PathLike) -> tuple[torch.Tensor, list[int | None]]:
        if self._ndim_of(path) == 2:
            img = torch.as_tensor(self.slice_loader({"image": os.fspath(path)})["image"]).float()
            return img[None], [None]
        vol = torch.as_tensor(self.volume_loader({"image": os.fspath(path)})["image"]).float()
        v = vol[0]
        # Otsu + largest component: MR background is noisy (Rician), a fixed threshold keeps air slices
        fg = torch.as_tensor(ForegroundMask()(vol))[0].bool()
        axis = self.slice_axis
        area = fg.float().sum(dim=[d for d in range(3) if d != axis])
        if float(area.max()) == 0:
            raise InputDataError("the volume has no foreground (constant image?)", path)
        keep = [int(i) for i in torch.nonzero(area >= self.min_foreground * area.max()).flatten()]
        out = []
        for i in keep:
            s = torch.select(v, axis, i)[None]
            out.append(self._pad(self._resize(s)))
        return torch.stack([torch.as_tensor(x).float() for x in out]), keep

    def __call__(self, path: str | os.PathLike) -> dict[str, Any]:
        """Classify one file and write ``<output_dir>/<name>_classes.json``.

        Args:
            path: a 2D slice (NIfTI, DICOM file, PNG/JPEG) or a volume (NIfTI, DICOM series folder).

        Returns:
            The written record: ``model``, ``class_names``, ``score``, ``alpha``, ``slices`` (one entry per
            classified slice: ``slice_index`` (``None`` for a 2D input), ``predicted_class``, ``probabilities``,
            ``conformal_set``), and for volumes ``summary`` (slices per predicted class, the largest probability
            of every non-healthy class over the slices).

        Raises:
            InputDataError: naming the file, for unreadable input or a volume without brain slices.
        """
        raw, index = self._slices(path)
        x = torch.stack([torch.as_tensor(self.normalise(s)).float() for s in raw])
        probs = predict_probabilities(self.model, x, self.device)
        sets = conformal_set(probs, self.conformal, self.score, self.alpha)
        slices = [
            {
                "slice_index": idx,
                "predicted_class": self.class_names[int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(self.class_names, p, strict=True)},
                "conformal_set": s,
            }
            for idx, p, s in zip(index, probs, sets, strict=True)
        ]
        record: dict[str, Any] = {
            "model": self.model_name,
            "class_names": self.class_names,
            "score": self.score,
            "alpha": self.alpha,
            "coverage_target": 1.0 - self.alpha,
            "slices": slices,
        }
        if index != [None]:
            counts = {c: sum(1 for s in slices if s["predicted_class"] == c) for c in self.class_names}
            record["summary"] = {
                "slice_axis": self.slice_axis,
                "n_slices": len(slices),
                "slices_per_class": counts,
                "max_probability": {
                    c: round(float(probs[:, k].max()), 6) for k, c in enumerate(self.class_names)
                },
            }
        name = Path(path).name
        for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        out = self.output_dir / f"{name}_classes.json"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")
        logger.info("%s: %d slice(s) classified -> %s", name, len(slices), out)
        return record

    def run(self, paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[dict[str, Any]]:
        """Classify every file; a file that fails is reported and skipped, the others are still classified.

        Args:
            paths: one path or several.

        Returns:
            The records of the files classified, in order.

        Raises:
            BatchInputError: after every other file was classified and written, when some failed and
                ``allow_failures`` is False; ``<output_dir>/failures.json`` lists them (it is written either
                way).
            InputDataError: no path given.
        """
        from engines.batch import FailureLog

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise InputDataError("no inputs to classify (empty input list)")
        failures = FailureLog(self.output_dir)
        records = []
        for p in paths:
            try:
                records.append(self(p))
            except Exception as e:  # one bad file must not stop the batch
                failures.record(p, e)
        failures.finish(len(paths), self.allow_failures)
        return records
