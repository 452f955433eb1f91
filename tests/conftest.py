"""Shared fixtures: the demo cohort is built once per test session and reused by every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo cohort (64 subjects), built once per session.

    ``MEDDIFF_DEMO_DIR`` points at an existing build to reuse (it is checked for completeness and
    rebuilt if stale, so a wrong cache cannot pass silently).
    """
    from data_prep.demo import build_demo_cohort

    out = os.environ.get("MEDDIFF_DEMO_DIR") or tmp_path_factory.mktemp("demo") / "cohort"
    return build_demo_cohort(out, verbose=False)
