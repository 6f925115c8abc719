#!/usr/bin/env python
"""lipfast's main benchmark command.

The OCNet attention benchmark belongs here, but the attention op is not
implemented yet (a later issue). Until it is, this command says so and runs the
benchmarks that exist: benchmarks/abn.py (In-Place ABN), with the same flags
(--device, --json PATH, and any other abn.py flag, passed through unchanged).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    """Imports benchmarks/<name>.py by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lipfast_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--json", metavar="PATH", help="write the results of abn.py there")
    args, rest = p.parse_known_args(argv)
    print("OC attention benchmark: NOT IMPLEMENTED YET (the attention op comes in a later "
          "issue); nothing about attention is measured.")
    print("Running the benchmarks that exist instead: benchmarks/abn.py (In-Place ABN).\n",
          flush=True)
    forwarded = ["--device", args.device] + (["--json", args.json] if args.json else []) + rest
    return _load("abn").main(forwarded)


if __name__ == "__main__":
    main(sys.argv[1:])
