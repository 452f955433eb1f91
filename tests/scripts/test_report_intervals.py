"""Intervals and paired differences as the report shows them."""

from __future__ import annotations

import math

from scripts.report_intervals import Difference, difference_sentence, differences, fmt, interval_cell

METRICS = {
    "t250/pixel_auprc": 0.0421,
    "t250/pixel_auprc_ci_low": 0.031,
    "t250/pixel_auprc_ci_high": 0.055,
    "t250/pixel_auroc": 0.8,
    "diff/t250-intensity_baseline/pixel_auprc": 0.012,
    "diff/t250-intensity_baseline/pixel_auprc_ci_low": 0.004,
    "diff/t250-intensity_baseline/pixel_auprc_ci_high": 0.02,
    "diff/t100-t250/pixel_auprc": -0.003,
    "diff/t100-t250/pixel_auprc_ci_low": -0.01,
    "diff/t100-t250/pixel_auprc_ci_high": 0.004,
    "diff/t100-t250/dice_fpr5": 0.1,  # no bounds: not a complete difference
    "diff/mae/probe-random_init/probe/mean_auroc": 0.08,
    "diff/mae/probe-random_init/probe/mean_auroc_ci_low": 0.02,
    "diff/mae/probe-random_init/probe/mean_auroc_ci_high": 0.15,
}


def test_cells_show_the_interval_only_where_bounds_were_logged():
    assert interval_cell(METRICS, "t250/pixel_auprc") == "0.0421 [0.031, 0.055]"
    assert interval_cell(METRICS, "t250/pixel_auroc") == 0.8
    assert math.isnan(interval_cell(METRICS, "t60/pixel_auprc"))
    assert fmt(math.nan) == "—" and fmt(0.5) == "0.500"


def test_differences_are_parsed_from_the_metric_names_and_judged_by_their_interval():
    ds = differences(METRICS, "pixel_auprc")
    assert [(d.a, d.b) for d in ds] == [("t100", "t250"), ("t250", "intensity_baseline")]
    assert not ds[0].resolved and ds[1].resolved
    assert differences(METRICS, "dice_fpr5") == []
    (study,) = differences(METRICS, "mean_auroc")
    assert (study.a, study.b) == ("mae/probe", "random_init/probe")
    assert difference_sentence(ds[1], "pixel AUPRC") == (
        "t250 vs intensity_baseline, pixel AUPRC: +0.012 [+0.004, +0.020], resolved: t250 is better than "
        "intensity_baseline."
    )
    assert difference_sentence(ds[0]).endswith("not resolved: the test set does not tell which is better.")
    worse = Difference("a", "b", "accuracy", -0.2, -0.3, -0.1)
    assert "resolved: b is better than a" in difference_sentence(worse)
