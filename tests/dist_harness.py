"""Multi-process test harness (CPU, gloo) shared by the tests/test_*_dist.py files.

``spawn(scenario, world, tmp_path, name)`` starts ``world`` ranks with
torch.multiprocessing ('spawn'); each rank joins one gloo process group
(FileStore rendezvous in ``tmp_path``, loopback interface only, one thread),
runs ``scenario(rank, world)`` -- a module-level function returning the list of
checks it made -- and writes a JSON report. The parent re-raises a rank's
exception (torch.multiprocessing kills the other ranks), kills every rank after
``deadline_s`` (a hang fails instead of blocking CI), and returns the reports
after asserting that every rank wrote one and succeeded.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 60     # a collective that waits longer raises in the rank
JOIN_DEADLINE_S = 150  # the parent gives up (and kills the ranks) after this


def loopback_ifname() -> str | None:
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, scenario) -> None:
    ifname = loopback_ifname()
    if ifname is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    report = {"rank": rank, "ok": False, "checks": []}
    try:
        report["checks"] = scenario(rank, world)
        report["ok"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def spawn(scenario, world: int, tmp_path, name: str,
          deadline_s: float = JOIN_DEADLINE_S) -> list[dict]:
    out_dir = tmp_path / f"{name}-{world}"
    out_dir.mkdir()
    init_file = str(tmp_path / f"store-{name}-{world}")
    ctx = mp.start_processes(_rank_main, args=(world, init_file, str(out_dir), scenario),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    # join() re-raises a rank's exception (with its traceback) and kills the others
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"{name} with {world} ranks did not finish in {deadline_s} s")
    reports = []
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report"
        report = json.loads(path.read_text())
        assert report["ok"], f"rank {rank} failed:\n{report.get('error')}"
        reports.append(report)
    return reports
