"""Errors raised on bad input data.

Every error about input data names the file (when one is known) and the fault, so that a user who
feeds a folder of PACS exports can find the offending file without a debugger.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["InputDataError", "source_name"]


class InputDataError(ValueError):
    """A problem with an input file or datalist: the message names the file and the fault.

    Args:
        fault: what is wrong, in words (e.g. ``"contains 12 NaN voxels"``).
        path: the file the fault was found in, if known.
    """

    def __init__(self, fault: str, path: str | os.PathLike | None = None) -> None:
        self.fault = fault
        self.path = None if path is None else os.fspath(path)
        msg = f"{self.path}: {fault}" if self.path else fault
        super().__init__(msg)


def source_name(meta: Mapping[str, Any] | None, default: str = "<in-memory image>") -> str:
    """The source file of an image as recorded by MONAI's ``LoadImage`` (``filename_or_obj``).

    Args:
        meta: a MetaTensor's ``.meta`` dictionary (or ``None``).
        default: returned when the metadata names no file.

    Returns:
        The file name (or the first one, for a DICOM series given as a list), else ``default``.
    """
    if not meta:
        return default
    name = meta.get("filename_or_obj", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return os.fspath(name) if name else default
