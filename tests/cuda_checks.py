"""Checks shared by the CUDA tests (``@pytest.mark.cuda``) of the op test files."""

from __future__ import annotations

import subprocess
import sys

import torch


def twice_without_sync(step):
    """(first result, second result) of ``step()``: the first call warms up (Triton
    compiles, cached tables), the second runs under
    ``torch.cuda.set_sync_debug_mode("error")``, so any host synchronisation in it raises."""
    ref = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return ref, got


def assert_device_assert(code: str, must_launch: bool = True) -> None:
    """Runs ``code`` in a child process (a device-side assert leaves the CUDA context
    unusable) and requires it to fail with a device-side assertion, after printing
    'launched' (the op itself returned without a host sync) and before 'no error'."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no error" not in r.stdout, (r.stdout, r.stderr)
    if must_launch:
        assert "launched" in r.stdout, (r.stdout, r.stderr)
    assert "assert" in r.stderr.lower(), r.stderr
