"""Atomic file writes: every file lipfast writes for the user (checkpoints,
metric states, predictions, tables, plots, data sets) goes through
:func:`atomic_file`, so an interrupted write never leaves a partial file."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere it
    can only be read by setting it, which is done under a lock and undone at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _target_mode(path: str) -> int:
    """The permission bits the file at ``path`` should get: those of the file
    being replaced, else what ``open(path, "w")`` would give (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _fsync_dir(folder: str) -> None:
    """Makes a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """Yields a file object for a temporary file in ``path``'s folder; when the
    block ends normally the file is flushed to disk, given the permission bits
    of the file it replaces (or, for a new file, those a plain ``open`` gives
    under the umask; ``mkstemp``'s private 0600 is never kept), renamed over
    ``path`` (``os.replace``), and the folder is fsynced so that the rename
    survives a crash; otherwise the temporary file is removed. ``path``
    therefore holds either its old or its complete new content.
    ``mode``: "wb" or "w" (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _target_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
