"""Parses the benchmark commands of ``benchmarks/run_gpu.sh --dry-run`` without a GPU.

Usage: python benchmarks/_dryrun.py FILE, FILE holding one line per command:
``STAGE/STEP python benchmarks/SCRIPT.py ARGS...`` (shell-quoted). Every command
runs through its script's own main() in parse-only mode (LIPFAST_BENCH_PARSE_ONLY=1:
the script checks its arguments and exits 0 before touching a device); the
measuring functions are replaced by ones that raise, so a script that forgot its
parse-only exit fails here instead of benchmarking. One process for all commands
(torch is imported once). Exit status 1 when any command does not parse.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["LIPFAST_BENCH_PARSE_ONLY"] = "1"

import _roofline  # noqa: E402
import _timing  # noqa: E402


def _refuse(*args, **kwargs):
    raise RuntimeError("parse-only run reached a measurement: the script must call "
                       "_timing.exit_if_parse_only(args, __file__) right after parsing")


_timing.measure = _refuse
_timing.machine_check = _refuse
_roofline.from_args = _refuse
_roofline.measure = _refuse

_MODULES: dict = {}


def _load(path: Path):
    key = str(path.resolve())
    if key not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"lipfast_dryrun_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _MODULES[key] = mod
    return _MODULES[key]


def check(label: str, cmd: list[str]) -> str | None:
    """None when the command parses, else why not."""
    if len(cmd) < 2 or not Path(cmd[0]).name.startswith("python") or not cmd[1].endswith(".py"):
        return f"not a 'python benchmarks/SCRIPT.py ...' command: {cmd}"
    path = Path(cmd[1])
    if not path.is_file():
        return f"{cmd[1]} not found"
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod = _load(path)
            mod.main(cmd[2:])
    except SystemExit as e:
        if e.code in (0, None) and "parse-only:" in out.getvalue():
            return None
        tail = (err.getvalue() or out.getvalue() or str(e.code)).strip().splitlines()[-3:]
        return f"exit {e.code}: " + " | ".join(tail)
    except Exception as e:  # noqa: BLE001 - report every command
        return f"{type(e).__name__}: {e}"
    return "main() returned without the parse-only exit"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lines = [ln for ln in Path(argv[0]).read_text().splitlines() if ln.strip()]
    bad = 0
    for ln in lines:
        label, *cmd = shlex.split(ln)
        why = check(label, cmd)
        if why is None:
            print(f"DRY-RUN ok {label}: flags parse: {' '.join(cmd[1:])}")
        else:
            bad += 1
            print(f"DRY-RUN FAIL {label}: {' '.join(cmd[1:])}: {why}")
    print(f"benchmark commands: {len(lines) - bad} of {len(lines)} parse")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
