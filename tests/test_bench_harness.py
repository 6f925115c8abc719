"""The benchmarks' shared timing harness (benchmarks/_timing.py), with fake steps on
a fake clock: interleaving, warm-up, stopping rules, percentiles, warnings; then
every benchmark script's --help, the flags benchmarks/run_gpu.sh passes, and a
smoke run of each script's quickest mode with --json."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import _timing  # noqa: E402

SCRIPTS = ("attn", "abn", "loss", "miou", "train_step", "parse", "pose", "gpu_ceilings")


class FakeClock:
    """A clock that only moves when a fake step (or setup) advances it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def fake_steps(clock, durations_ms: dict, log: list | None = None):
    """name -> step; each call advances the clock by the next duration (a list:
    consumed in order, the last one repeated; a number: constant)."""
    calls = {n: 0 for n in durations_ms}

    def make(name):
        def step(*args):
            d = durations_ms[name]
            if isinstance(d, (list, tuple)):
                d = d[min(calls[name], len(d) - 1)]
            calls[name] += 1
            clock.advance(d / 1e3)
            if log is not None:
                log.append((name, args))
        return step

    return {n: make(n) for n in durations_ms}, calls


def run(durations_ms, log=None, setup=None, **kw):
    clock = FakeClock()
    steps, calls = fake_steps(clock, durations_ms, log)
    m = _timing.measure(steps, None, setup=setup(clock) if setup else None, clock=clock,
                        probe=False, **kw)
    return m, calls, clock


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("data", [
    [3.0, 1.0, 2.0],
    [5.0],
    [1.0, 2.0],
    [9.1, 0.5, 7.7, 3.3, 3.3, 12.0, 4.4, 8.8, 1.0, 6.6, 2.2],
    list(np.random.default_rng(0).lognormal(3.0, 0.5, size=57)),
])
def test_percentile_matches_numpy(data):
    for q in (0, 5, 20, 25, 50, 80, 95, 100):
        assert _timing.percentile(data, q) == pytest.approx(np.percentile(data, q), rel=1e-12)


def test_percentile_matches_statistics_quantiles():
    data = [12.5, 10.0, 11.0, 30.0, 10.5, 11.5, 13.0, 10.2, 10.8]
    q = statistics.quantiles(data, n=5, method="inclusive")  # 20th, 40th, 60th, 80th
    assert _timing.percentile(data, 20) == pytest.approx(q[0])
    assert _timing.percentile(data, 80) == pytest.approx(q[3])
    assert _timing.percentile(data, 50) == pytest.approx(statistics.median(data))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        _timing.percentile([], 50)
    with pytest.raises(ValueError):
        _timing.percentile([1.0], 101)


def test_timing_summary():
    t = _timing.Timing("x", times_ms=[10.0, 12.0, 11.0, 30.0, 9.0], warmup_ms=[100.0])
    assert t.rounds == 5
    assert t.median == 11.0 and t.min == 9.0 and t.max == 30.0
    assert t.p20 == pytest.approx(np.percentile(t.times_ms, 20))
    assert t.p80 == pytest.approx(np.percentile(t.times_ms, 80))
    assert t.spread == pytest.approx((t.p80 - t.p20) / 11.0)
    s = t.summary()
    assert s["median_ms"] == 11.0 and s["rounds"] == 5 and s["warmup_ms"] == [100.0]
    assert s["p20_ms"] <= s["median_ms"] <= s["p80_ms"]


def test_format():
    assert _timing.fmt_spread(182.4, 178.1, 190.2) == "182 [178-190]"
    assert _timing.fmt_spread(13.42, 13.08, 13.91) == "13.4 [13.1-13.9]"
    assert _timing.fmt_spread(1.234, 1.2, 1.3) == "1.23 [1.20-1.30]"
    assert _timing.fmt_spread(None, None, None) == "-"
    assert _timing.fmt_ms(0.1234) == "0.123"
    assert _timing.Timing("x", times_ms=[2.0, 2.0, 2.0]).fmt() == "2.00 [2.00-2.00]"


# --------------------------------------------------------------------------- harness


def test_rounds_are_interleaved_and_rotated():
    log = []
    m, _, _ = run({"a": 1.0, "b": 1.0, "c": 1.0}, log=log, warmup=0, min_rounds=6,
                  max_rounds=6)
    names = [n for n, _ in log]
    rounds = [names[i:i + 3] for i in range(0, len(names), 3)]
    assert len(rounds) == 6 == m.rounds
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each once per round
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    # every implementation goes first equally often
    assert sorted(r[0] for r in rounds) == ["a", "a", "b", "b", "c", "c"]


def test_shuffled_order_is_seeded_and_interleaved():
    orders = []
    for _ in range(2):
        log = []
        run({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, log=log, warmup=0, min_rounds=8,
            max_rounds=8, order="shuffle", seed=3)
        names = [n for n, _ in log]
        rounds = [tuple(names[i:i + 4]) for i in range(0, len(names), 4)]
        assert all(sorted(r) == ["a", "b", "c", "d"] for r in rounds)
        orders.append(rounds)
    assert orders[0] == orders[1]  # the same seed, the same orders
    assert len(set(orders[0])) > 1  # not one fixed order


def test_min_rounds():
    m, calls, _ = run({"a": 1.0, "b": 2.0}, warmup=0, min_rounds=5)
    assert m.rounds == 5 and calls == {"a": 5, "b": 5}
    assert m["a"].times_ms == pytest.approx([1.0] * 5)
    assert m["b"].median == pytest.approx(2.0)
    assert m.stop_reason == "min_rounds"


def test_min_seconds_counts_timed_steps():
    # 30 ms of steps per round: 0.295 s needs 10 rounds (more than min_rounds = 2).
    m, _, _ = run({"a": 10.0, "b": 20.0}, warmup=0, min_rounds=2, min_seconds=0.295)
    assert m.rounds == 10 and m.stop_reason == "min_seconds"


def test_max_rounds_caps():
    m, _, _ = run({"a": 1.0}, warmup=0, min_rounds=3, min_seconds=100.0, max_rounds=7)
    assert m.rounds == 7 and m.stop_reason == "max_rounds"


def test_max_seconds_caps_with_a_floor_and_warns():
    m, _, _ = run({"a": 1000.0}, warmup=0, min_rounds=100, max_seconds=5.0)
    assert m.rounds == 5 and m.stop_reason == "max_seconds"
    assert any("only 5 of 100 rounds" in w for w in m.warnings)
    # at least min(min_rounds, 3) rounds, however small the cap
    m, _, _ = run({"a": 1000.0}, warmup=0, min_rounds=10, max_seconds=0.5)
    assert m.rounds == 3


def test_warmup_absorbs_a_cold_start():
    # first call 7572 ms (compilation, thread pool, allocator), then settling
    m, calls, _ = run({"a": [7572.0, 300.0, 270.0, 265.0, 265.0], "b": 100.0}, warmup=1,
                      max_warmup=10, warmup_tol=0.05, min_rounds=5)
    assert m["a"].warmup_ms == pytest.approx([7572.0, 300.0, 270.0, 265.0])
    assert m.warmup_rounds == 4 and m.warmup_settled
    assert m["a"].times_ms == pytest.approx([265.0] * 5)
    assert m["a"].median == pytest.approx(265.0)
    assert calls["b"] == 4 + 5  # warm-up rounds are interleaved too
    assert not m.warnings


def test_warmup_cap_warns_when_unsettled():
    m, _, _ = run({"a": [10.0, 20.0] * 50}, warmup=2, max_warmup=6, warmup_tol=0.1,
                  min_rounds=4)
    assert m.warmup_rounds == 6 and not m.warmup_settled
    assert any("warm-up did not settle in 6 rounds" in w for w in m.warnings)


def test_warmup_time_cap():
    m, _, _ = run({"a": [1000.0 * k for k in range(1, 60)]}, warmup=1, max_warmup=50,
                  max_warmup_seconds=5.0, min_rounds=1)
    # rounds start while under 5 s of warm-up: 1 + 2 + 3 s, then the cap
    assert m.warmup_rounds == 3


def test_fixed_and_no_warmup():
    m, calls, _ = run({"a": [50.0, 10.0]}, warmup=0, min_rounds=2)
    assert m.warmup_rounds == 0 and calls["a"] == 2 and m["a"].times_ms[0] == 50.0
    m, calls, _ = run({"a": [50.0, 10.0, 30.0]}, warmup=1, max_warmup=1, min_rounds=2)
    assert m.warmup_rounds == 1 and m.warmup_settled and m["a"].warmup_ms == [50.0]


def test_setup_is_not_timed_and_feeds_the_step():
    log = []
    n = {"i": 0}

    def setup(clock):
        def s():
            clock.advance(5.0)  # an expensive untimed setup
            n["i"] += 1
            return (n["i"],)
        return s

    m, _, _ = run({"a": 2.0, "b": 3.0}, log=log, setup=setup, warmup=1, max_warmup=1,
                  min_rounds=3)
    assert m["a"].times_ms == pytest.approx([2.0] * 3)
    assert m["b"].times_ms == pytest.approx([3.0] * 3)
    assert [args for _, args in log] == [(i,) for i in range(1, 9)]


def test_per_implementation_setup():
    log = []

    def setup(clock):
        return {"a": lambda: ("x", 1)}

    run({"a": 1.0, "b": 1.0}, log=log, setup=setup, warmup=0, min_rounds=2)
    assert {n: args for n, args in log} == {"a": ("x", 1), "b": ()}


def test_wide_spread_warning():
    m, _, _ = run({"steady": 10.0, "noisy": [10.0, 20.0] * 20}, warmup=0, min_rounds=10)
    w = [x for x in m.warnings if "wide spread" in x]
    assert len(w) == 1 and "noisy" in w[0] and "steady" not in w[0]
    m, _, _ = run({"steady": 10.0}, warmup=0, min_rounds=10)
    assert m.warnings == []
    m, _, _ = run({"noisy": [10.0, 20.0] * 20}, warmup=0, min_rounds=10, spread_warn=2.0)
    assert m.warnings == []


def test_busy_machine_warning():
    busy = _timing.Load(wall_s=2.0, cpus=2, self_cores=1.0, others_cores=1.2, steal=0.0,
                        loadavg_start=None, loadavg_end=None)
    quiet = _timing.Load(wall_s=2.0, cpus=2, self_cores=2.0, others_cores=0.05, steal=0.0,
                         loadavg_start=None, loadavg_end=None)
    stolen = _timing.Load(wall_s=2.0, cpus=2, self_cores=1.5, others_cores=0.0, steal=0.2,
                          loadavg_start=None, loadavg_end=None)
    assert any("machine busy" in w and "1.2 of 2" in w for w in _timing.load_warnings(busy, 0.25))
    assert _timing.load_warnings(quiet, 0.25) == []
    assert any("steal 20%" in w for w in _timing.load_warnings(stolen, 0.25))
    assert _timing.load_warnings(None, 0.25) == []


def test_load_probe_reads_this_machine():
    probe = _timing.LoadProbe().start()
    x = 0
    for i in range(200000):
        x += i
    load = probe.stop()
    assert load.wall_s > 0 and load.cpus >= 1 and load.self_cores >= 0
    if os.path.exists("/proc/stat"):
        assert load.others_cores is not None and load.others_cores >= 0


def test_real_clock_measure():
    import time

    m = _timing.measure({"sleep": lambda: time.sleep(0.002)}, None, warmup=1, max_warmup=1,
                        min_rounds=3)
    assert m.rounds == 3 and m["sleep"].min >= 2.0
    assert m.summary()["timings"]["sleep"]["rounds"] == 3


def test_settings_validation_and_arguments():
    with pytest.raises(ValueError):
        _timing.Settings(min_rounds=5, max_rounds=4)
    with pytest.raises(ValueError):
        _timing.Settings(warmup=3, max_warmup=2)
    with pytest.raises(ValueError):
        _timing.Settings(order="random")
    with pytest.raises(ValueError):
        _timing.measure({}, None)
    p = argparse.ArgumentParser()
    _timing.add_arguments(p, "defaults")
    base = _timing.Settings(warmup=1, max_warmup=1, min_rounds=3, max_rounds=3)
    st = _timing.settings_from_args(p.parse_args(["--reps", "7", "--warmup", "4",
                                                  "--budget", "9"]), base)
    assert (st.min_rounds, st.max_rounds, st.warmup, st.max_warmup, st.max_seconds) == \
        (7, 7, 4, 4, 9.0)
    st = _timing.settings_from_args(p.parse_args(["--repeats", "2", "--min-time", "1.5",
                                                  "--order", "shuffle"]), base)
    assert (st.min_rounds, st.max_rounds, st.min_seconds, st.order) == (2, 3, 1.5, "shuffle")
    assert _timing.settings_from_args(p.parse_args([]), base) == base


# --------------------------------------------------------------------------- the floor


def test_floor_is_the_larger_of_memory_and_compute():
    import _roofline

    c = _roofline.Ceilings("test", bandwidth_GBps=100.0, compute_GFLOPs={"fp32": 1000.0})
    f = _roofline.floor(1e9, 1e9, c)  # 10 ms moving bytes, 1 ms computing
    assert f["memory_ms"] == pytest.approx(10.0) and f["compute_ms"] == pytest.approx(1.0)
    assert f["floor_ms"] == pytest.approx(10.0) and f["bound"] == "memory"
    f = _roofline.floor(1e6, 1e11, c)
    assert f["floor_ms"] == pytest.approx(100.0) and f["bound"] == "compute"
    roof = _roofline.Roofline(c, ["h200"])
    r = roof.row(1e9, 1e9, "bf16", measured_ms=40.0)  # a CPU's one rate serves bf16 too
    assert r["fraction"] == pytest.approx(0.25)
    h = r["models"]["h200"]  # 1 GB at 4.8 TB/s vs 1 GFLOP at 989 TFLOP/s
    assert h["floor_ms"] == pytest.approx(1e9 / 4.8e12 * 1e3) and h["bound"] == "memory"
    assert roof.row(1e9, 0, "fp32", None)["fraction"] is None
    cells = roof.cells(r)
    assert cells[0] == "10.0 m" and cells[1] == "0.250" and cells[2].endswith(" m")
    assert len(roof.headers()) == len(cells) == 3


def test_datasheet_and_gpu_ceilings_conversion():
    import _roofline

    h = _roofline.datasheet("h200")
    assert h.bandwidth_GBps == 4800 and h.rate("bf16") == 989e3 and h.rate("fp32") == 67e3
    c = _roofline.from_gpu_ceilings(dict(copy_GBps=4300.0, matmul_bf16_TFLOPs=780.0,
                                         matmul_fp32_TFLOPs=50.0), "x")
    assert c.bandwidth_GBps == 4300 and c.rate("bf16") == 780e3 and c.rate("fp32") == 50e3
    assert c.rate("tf32") == 50e3  # no tf32 figure: fp32's
    assert _roofline.compute_dtype("cpu", "fp32") == "fp32"
    assert _roofline.compute_dtype("cpu", "bf16") == "bf16"
    assert _roofline.fmt_count(1.5e9, "B") == "1.5 GB" and _roofline.fmt_count(None) == "n/a"


def test_cpu_ceilings_measured_with_the_harness():
    import _roofline

    c = _roofline.measure_cpu(quick=True)
    assert c.bandwidth_GBps > 0.1 and c.rate("fp32") > 0.1
    assert c.details["copy_bytes"] == _roofline.CPU_COPY_BYTES_QUICK
    assert c.details["matmul_n"] == _roofline.CPU_MATMUL_N_QUICK


def test_ceilings_file_is_read(tmp_path):
    import _roofline

    p = tmp_path / "ceilings.json"
    p.write_text(json.dumps(dict(copy_GBps=4000.0, matmul_bf16_TFLOPs=700.0)))
    c = _roofline.measure_cuda("cuda", path=str(p))
    assert c.bandwidth_GBps == 4000 and c.rate("bf16") == 700e3 and str(p) in c.source


@pytest.mark.parametrize("name", SCRIPTS)
def test_parse_only(name, monkeypatch, capsys):
    """--parse-only (or LIPFAST_BENCH_PARSE_ONLY=1) exits 0 after parsing, before any
    device work; a bad flag still fails."""
    mod = _load(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--parse-only", "--min-rounds", "2", "--json", "/nonexistent/x.json"])
    assert e.value.code == 0 and "parse-only:" in capsys.readouterr().out
    monkeypatch.setenv(_timing.PARSE_ONLY_ENV, "1")
    with pytest.raises(SystemExit) as e:
        mod.main(["--device", "cuda:0"] if name not in ("gpu_ceilings",) else [])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        mod.main(["--no-such-flag"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", ("attn", "abn", "loss", "miou", "train_step"))
def test_datasheet_option(name, capsys):
    """--datasheet h200 adds the data-sheet floor (it was --model before train_step.py's
    --model picked the network); the old spelling is refused with a pointer to it."""
    mod = _load(name)
    args = mod.build_parser().parse_args(["--datasheet", "h200", "--datasheet", "h200"])
    assert args.datasheet == ["h200", "h200"]
    with pytest.raises(SystemExit) as e:
        mod.main(["--parse-only", "--datasheet", "h200"])
    assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main(["--parse-only", "--model", "h200"])
    assert e.value.code == 2 and "--datasheet h200" in capsys.readouterr().err


def test_formulas():
    attn, abn, loss, miou = (_load(n) for n in ("attn", "abn", "loss", "miou"))
    cfg = attn._core(2, 30, 30, 64, 32)
    n = 900
    assert attn.core_flops(cfg) == 2 * 2 * n * n * (64 + 32)
    fwd, fb = attn.core_bytes(cfg, "bf16")
    assert fwd == 2 * 2 * n * (64 + 2 * 32) and fb == fwd + 2 * 2 * n * (2 * 64 + 3 * 32)
    pyr = attn._core(1, 60, 60, 8, 8, (1, 2))
    assert attn.core_flops(pyr) == 2 * 16 * (3600 ** 2 + 4 * 900 ** 2)
    k = attn.kernel_flops(cfg, __import__("torch").device("cpu"))
    assert k["needed_fwdbwd"] == pytest.approx(3.5 * k["needed_fwd"])
    assert k["executed_fwdbwd"] == k["needed_fwdbwd"]  # CPU: executed = needed
    nbytes, flops = abn.stack_work(4, 16, 10, 3, "float32")
    act, wt = 4 * 4 * 16 * 100, 4 * 9 * 256
    assert nbytes == 3 * (10 * act + 3 * wt) and flops == 3 * 3 * 18 * 4 * 100 * 256
    assert loss.loss_work("upsample_ce", 2, 20, 30, 119) == (2 * 4 * 2 * 20 * 900
                                                            + 8 * 2 * 119 ** 2,
                                                            16 * 2 * 20 * 119 ** 2)
    assert miou.case_work(2, 20, 119, 119) == (4 * 2 * 20 * 119 ** 2 + 2 * 119 ** 2, 0.0)


# --------------------------------------------------------------------------- the scripts


def _load(name):
    spec = importlib.util.spec_from_file_location(f"lipfast_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_reads_complete(name):
    mod = _load(name)
    parser = mod.build_parser()
    text = parser.format_help()
    desc = parser.description.strip()
    assert desc == mod.__doc__.strip()  # the whole docstring, not its first line
    assert desc.endswith("."), desc[-80:]
    assert desc.splitlines()[-1].strip() in text
    for opt in ("--min-rounds", "--min-time", "--max-time", "--warmup", "--json"):
        assert opt in text


def test_run_gpu_flags_parse():
    """Every benchmark command in benchmarks/run_gpu.sh's plan parses with its script
    (argparse alone; tests/test_run_gpu.py runs the whole --dry-run)."""
    plan = subprocess.run(["bash", str(BENCH / "run_gpu.sh"), "/tmp/out", "--plan"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    cmds = re.findall(r"python3? (benchmarks/(\w+)\.py)([^\n]*)", plan)
    seen = set()
    for _, name, rest in cmds:
        argv = shlex.split(rest)
        args = _load(name).build_parser().parse_args(argv)
        assert args.json and args.json.startswith("/tmp/out/")
        seen.add(name)
    assert seen == set(SCRIPTS)


def _smoke(tmp_path, name, *argv, timeout=120):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *argv, "--json", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "median [p20-p80]" in r.stdout and f"benchmarks/{name}.py" in r.stdout
    data = json.loads(out.read_text())
    env_ = data.get("environment", data.get("env"))
    assert env_["command"].startswith(f"python benchmarks/{name}.py") and env_["machine"]
    return data


def _check_spread(d, med="ms", lo="p20_ms", hi="p80_ms", rounds=None):
    assert d[lo] <= d[med] <= d[hi]
    if rounds is not None:
        assert d["rounds"] == rounds


@pytest.mark.slow
def test_smoke_attn(tmp_path):
    data = _smoke(tmp_path, "attn", "--quick", "--rows", "lip-os16", "--threads", "1",
                  "--datasheet", "h200")
    assert not data["aborted"] and not data["partial"]
    assert data["roofline"]["measured"]["bandwidth_GBps"] > 0
    for r in (r for r in data["results"] if r["status"] == "ok"):
        fb = r["floor_fwdbwd"]
        assert fb["floor_ms"] > 0 and 0 < fb["fraction"] == pytest.approx(
            fb["floor_ms"] / r["fwdbwd_ms"])
        assert fb["flops"] == pytest.approx(3.5 * r["floor_fwd"]["flops"])
        assert fb["models"]["h200"]["floor_ms"] > 0
        if r["method"] == "lipfast":  # CPU: executed = needed, stated as such
            assert r["exec_flops_fwdbwd"] == fb["flops"] and "executed = needed" in \
                r["exec_flops_source"]
        elif r["method"] == "reference":  # counted by torch.utils.flop_counter
            assert r["exec_flops_fwdbwd"] == pytest.approx(3 * r["exec_flops_fwd"])
    res = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["method"] for r in res} == {"lipfast", "reference", "sdpa"}
    for r in res:
        _check_spread(r, "fwdbwd_ms", "fwdbwd_p20_ms", "fwdbwd_p80_ms", rounds=3)
        _check_spread(r, "fwd_ms", "fwd_p20_ms", "fwd_p80_ms")
        assert len(r["fwdbwd_times_ms"]) == 3 and len(r["fwdbwd_warmup_ms"]) == 1
    assert data["config"]["timing"]["min_rounds"] == 3


@pytest.mark.slow
def test_smoke_abn(tmp_path):
    data = _smoke(tmp_path, "abn", "--quick", "--threads", "1", "--sizes", "16",
                  "--channels", "16", "--variants", "lipfast InPlaceABN")
    timed = [r for r in data["rows"] if r["time_ms"] is not None]
    assert {r["variant"] for r in timed} == {"bn+leaky", "lipfast InPlaceABN"}
    for r in timed:
        _check_spread(r, "time_ms", rounds=3)
        assert r["floor"]["floor_ms"] > 0 and r["floor"]["fraction"] > 0
    (shape,) = data["timing"].values()
    assert shape["rounds"] == 3 and shape["warmup_rounds"] == 1


@pytest.mark.slow
def test_smoke_loss(tmp_path):
    data = _smoke(tmp_path, "loss", "--quick", "--threads", "1")
    assert [r["row"] for r in data["rows"]] == ["generate_edge", "upsample_ce", "lovasz",
                                               "edge_loss", "schp"]
    for r in data["rows"]:
        assert r["ok"]
        for impl in ("lipfast", "reference"):
            _check_spread(r[impl], rounds=3)
            assert r[impl]["floor_fraction"] > 0
        assert r["floor"]["bytes"] > 0
    assert data["lovasz_cpu_peak_rss"]["shape"]["H"] == 60


@pytest.mark.slow
def test_smoke_miou(tmp_path):
    data = _smoke(tmp_path, "miou", "--quick", "--threads", "1")
    assert len(data["rows"]) == 8
    for r in data["rows"]:
        _check_spread(r, rounds=3)
        assert r["matrix_diff_vs_numpy"] <= 4
        assert r["floor"]["floor_ms"] > 0 and r["floor"]["fraction"] > 0
        if "resize" not in r["case"]:  # argmax and counting: 0 FLOPs counted
            assert r["floor"]["flops"] == 0 and r["floor"]["bound"] == "memory"


@pytest.mark.slow
def test_smoke_train_step(tmp_path):
    data = _smoke(tmp_path, "train_step", "--quick", "--threads", "1", "--in-process",
                  "--configs", "psp16", "--reps", "2", "--warmup", "0", "--size", "33")
    (row,) = data["rows"]
    assert row["loss0_ok"]
    for stack in ("reference", "lipfast"):
        _check_spread(row[stack], rounds=2)
        assert row[stack]["best_ms"] == min(row[stack]["times_ms"])
        assert row[stack]["warmup_ms"] == []
        assert row[stack]["floor"]["flops"] > 0 and row[stack]["floor"]["fraction"] > 0


def test_gpu_ceilings_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: run_gpu.sh measures it")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        _load("gpu_ceilings").main(["--min-rounds", "3", "--json", "/nonexistent/x.json"])
