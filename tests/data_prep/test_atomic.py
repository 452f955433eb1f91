"""The one atomic-output mechanism: complete files only, failures leave the destination untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.atomic import atomic_path, atomic_write_bytes, atomic_write_text, default_file_mode


def test_atomic_path_renames_on_success_with_normal_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "map.nii.gz"
    with atomic_path(dest, ".nii.gz") as tmp:
        assert (
            tmp.parent == dest.parent and tmp.name.startswith(".map.nii.gz.") and tmp.name.endswith(".nii.gz")
        )
        assert not dest.exists(), "nothing at the destination while writing"
        tmp.write_bytes(b"abc")
    assert dest.read_bytes() == b"abc" and not tmp.exists()
    assert (dest.stat().st_mode & 0o777) == default_file_mode(), "not tempfile's 0600"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "datalist.json"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert dest.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["datalist.json"]
    atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["datalist.json"]
