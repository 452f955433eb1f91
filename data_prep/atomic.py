"""Atomic file output: one mechanism for every writer of the project (datalists, images, checkpoints,
figures, exported networks).

Everything is written to a hidden temporary file in the destination's folder and renamed over the
destination only once complete, so a reader (or a resumed run) never sees a half-written file and an
existing file is replaced only by a complete new one. A failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "default_file_mode", "fsync_dir"]


def _current_umask() -> int:
    # /proc gives the umask without changing it; os.umask() has to set it to read it, which is a
    # (brief) race with other threads creating files
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file: ``0o666 & ~umask``.

    Returns:
        The mode bits.
    """
    return 0o666 & ~_current_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows).

    Args:
        folder: the folder whose entries changed.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; renamed over ``path`` when the block succeeds.

    The temporary file lies in the destination folder (so the rename is atomic), is hidden
    (``.<name>.<random>.tmp<suffix>``) and ends in ``suffix`` so that writers choosing the format by
    extension (nibabel, SimpleITK, matplotlib) write the right one. Before the rename it gets the
    permissions a normally created file would have (``0o666 & ~umask``, not ``tempfile``'s 0600).

    Args:
        path: the destination; its folder is created if missing.
        suffix: extension of the temporary file, e.g. ``".nii.gz"``.

    Yields:
        The temporary path (it exists, empty).

    Raises:
        Exception: whatever the block raised; the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` atomically (:func:`atomic_path`), flushed to disk before the rename.

    Args:
        path: destination file.
        data: content.

    Returns:
        The destination as a ``Path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`).

    Args:
        path: destination file.
        text: content.

    Returns:
        The destination as a ``Path``.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))
