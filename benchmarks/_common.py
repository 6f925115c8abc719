"""Helpers shared by the benchmark scripts: the environment record written with
every --json result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import lipfast

HERE = Path(__file__).resolve().parent


def _git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, device, threads, load and commit: what a reader needs to judge a figure."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        triton_version = None
    status = _git("status", "--porcelain")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "lipfast": getattr(lipfast, "__version__", None),
        "lipfast_build_info": lipfast.build_info(),
    }
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    return env
