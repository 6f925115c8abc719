"""Helpers shared by the benchmark scripts: the environment record written with
every --json result and the command line that produced it. The timing harness
is benchmarks/_timing.py."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
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


def command(script: str, argv=None) -> str:
    """The command that reproduces a run, e.g. 'python benchmarks/attn.py --quick'
    (argv None: this process's own arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{Path(script).name}"] + [shlex.quote(str(a))
                                                                    for a in argv])


def machine(device: torch.device) -> str:
    """One line naming the machine: device, CPUs and torch threads."""
    name = device_name(device)
    cpus = os.cpu_count()
    if device.type == "cuda":
        return f"{name} (CUDA {torch.version.cuda}), host {cpus} CPUs, torch {torch.__version__}"
    return (f"{name}, {cpus} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


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


def environment(device: torch.device, script: str | None = None, argv=None) -> dict:
    """Versions, device, threads, load and commit: what a reader needs to judge a figure;
    with ``script``, also the command line (see command())."""
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
    env["machine"] = machine(device)
    if script is not None:
        env["command"] = command(script, argv)
    return env


def run_environment(device: torch.device, script: str, argv, threads) -> tuple:
    """The start of a timed run: the machine check, the thread choice (before the
    environment is recorded, so that it holds the threads used) and the
    environment record with both in it. Returns ``(env, machine, threads_note)``."""
    import _timing

    machine = _timing.machine_check()
    threads_note = _timing.choose_threads(threads, device, machine)
    env = environment(device, script, argv)
    env["machine_check"], env["threads_note"] = machine, threads_note
    return env, machine, threads_note


def saved_bytes(fn):
    """(fn(), bytes of the distinct storages autograd saves for backward while fn
    runs), counted with saved_tensors_hooks (a storage saved twice counts once)."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001  (tensors without a storage)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def rss_bytes() -> int:
    """This process's resident set size (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size from now on (``growth()``: bytes above the level at
    construction): the kernel's high-water mark (VmHWM) reset through
    /proc/self/clear_refs, or, where that is refused, a 1 ms sampling thread."""

    def __init__(self):
        self.base = rss_bytes()
        self.thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM"
        except OSError:
            import threading

            self.how = "sampled"
            self.peak, self.stop = self.base, threading.Event()

            def sample():
                while not self.stop.wait(0.001):
                    self.peak = max(self.peak, rss_bytes())

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()

    def growth(self) -> int:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            return max(0, self.peak - self.base)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(0, int(line.split()[1]) * 1024 - self.base)
        return 0
