"""Atomic file writes: every file lipfast writes for the user (checkpoints,
metric states, predictions, tables, plots, data sets) goes through
:func:`atomic_file`, so an interrupted write never leaves a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """Yields a file object for a temporary file in ``path``'s folder; when the
    block ends normally the file is flushed to disk and renamed over ``path``
    (``os.replace``), otherwise it is removed. ``path`` therefore holds either
    its old or its complete new content. ``mode``: "wb" or "w" (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
