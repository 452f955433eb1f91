"""Slice class labels from lesion masks, in the datalist's class order."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from transforms.labels import AMBIGUOUS, SliceClassLabeld, known_class_only


def _mask(n: int) -> MetaTensor:
    m = torch.zeros(1, 8, 8)
    m.view(-1)[:n] = 1
    return MetaTensor(m)


@pytest.mark.parametrize("names", [("healthy", "diseased"), ("diseased", "healthy")])
def test_labels_follow_the_class_order(names: tuple[str, str]) -> None:
    t = SliceClassLabeld("label", class_names=names, min_pixels=3)
    h, d = names.index("healthy"), names.index("diseased")
    assert t({"label": _mask(0)})["class_label"] == h
    assert t({"label": _mask(3)})["class_label"] == d
    assert t({"label": _mask(10)})["class_label"] == d
    assert t({"label": _mask(2)})["class_label"] == AMBIGUOUS  # a sliver: neither
    # a 2D dataset labelled per image keeps its label
    assert t({"label": _mask(10), "class_label": h})["class_label"] == h


def test_known_class_only_and_errors() -> None:
    keep = known_class_only()
    assert keep({"class_label": 0}) and keep({"class_label": 1}) and not keep({"class_label": AMBIGUOUS})
    assert not keep({}), "a slice without a class cannot train a classifier"
    with pytest.raises(ValueError, match="'diseased' is not in class_names"):
        SliceClassLabeld("label", class_names=("healthy", "tumour"))
    with pytest.raises(ValueError, match="one lesion-mask key"):
        SliceClassLabeld(["a", "b"])
    with pytest.raises(KeyError):
        SliceClassLabeld("label")({"image": torch.zeros(1, 4, 4)})
    assert "class_label" not in SliceClassLabeld("label", allow_missing_keys=True)({"image": 1})
