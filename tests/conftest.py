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

    if os.environ.get("MEDDIFF_DEMO_DIR"):
        return build_demo_cohort(os.environ["MEDDIFF_DEMO_DIR"], verbose=False)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_demo_cohort(tmp_path_factory.mktemp("demo") / "cohort", verbose=False)
    # pytest-xdist: the workers share the base temp folder's parent; the first to take the lock builds the
    # cohort, the others wait and find it complete (build_demo_cohort checks its stamp), so it is built once
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "demo_cohort.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build_demo_cohort(shared / "demo_cohort", verbose=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
