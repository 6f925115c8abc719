"""The timing harness shared by every benchmark script (benchmarks/*.py).

One call of :func:`measure` times one row: a dict of named step callables (the
implementations compared in that row, each one step, e.g. forward + backward).

1. Warm-up, untimed in the results (kept in ``warmup_ms``): at least
   ``warmup`` rounds, then more until every implementation's last two warm-up
   times agree within ``warmup_tol`` (relative), at most ``max_warmup`` rounds
   or ``max_warmup_seconds``. This absorbs cold-start costs (first kernel
   compilation, thread-pool spin-up, allocator growth, lazy imports).
2. Timed rounds: each round runs every implementation once; the order is
   rotated every round (``order="rotate"``: A B C, B C A, C A B, ...) or
   shuffled (``order="shuffle"``, seeded), so that drift and load from other
   processes hit the implementations alike. Rounds continue until at least
   ``min_rounds`` ran and the timed steps add up to ``min_seconds`` (summed
   over the implementations), and stop at ``max_rounds`` or after
   ``max_seconds`` of wall time in the timed phase (at least
   ``min(min_rounds, 3)`` rounds run).
3. Per implementation: median, 20th and 80th percentiles (linear interpolation
   between closest ranks, as numpy.percentile's default), min, max, the number
   of rounds and the raw times (ms).
4. Warnings: a wide spread ((p80 - p20) / median above ``spread_warn``), a
   warm-up that did not settle, a row cut short by ``max_seconds``, and a busy
   machine: CPU time used by other processes during the timed rounds (from
   /proc/stat minus this process's own CPU time) above ``busy_warn`` of the
   cores, or CPU steal (hypervisor) above 5%.

Timers: ``"wall"`` (default) reads ``time.perf_counter`` around the step, with
``torch.cuda.synchronize`` before and after it on CUDA; ``"events"`` (CUDA)
uses CUDA events recorded around the step. ``clock`` and ``sync`` can be
injected (the unit tests use a fake clock).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Mapping

STEAL_WARN = 0.05


# --------------------------------------------------------------------------- statistics


def percentile(values, q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest
    ranks: numpy.percentile's default method, statistics.quantiles(method='inclusive')."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q = {q} is outside [0, 100]")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _digits(x: float) -> int:
    ax = abs(x)
    if ax >= 100:
        return 0
    if ax >= 10:
        return 1
    if ax >= 1:
        return 2
    return 3


def fmt_ms(ms: float | None, digits: int | None = None) -> str:
    """A time in ms with precision by magnitude (1234, 123, 12.3, 1.23, 0.123)."""
    if ms is None:
        return "-"
    return f"{ms:.{_digits(ms) if digits is None else digits}f}"


def fmt_spread(median: float | None, p20: float | None, p80: float | None) -> str:
    """'median [p20-p80]' with the median's precision, e.g. '182 [178-190]'."""
    if median is None:
        return "-"
    d = _digits(median)
    return f"{median:.{d}f} [{p20:.{d}f}-{p80:.{d}f}]"


@dataclass
class Timing:
    """The times of one implementation in one row (ms)."""

    name: str
    times_ms: list = field(default_factory=list)
    warmup_ms: list = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p20(self) -> float:
        return percentile(self.times_ms, 20)

    @property
    def p80(self) -> float:
        return percentile(self.times_ms, 80)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: the relative width of the middle 60% of the rounds."""
        m = self.median
        return (self.p80 - self.p20) / m if m > 0 else 0.0

    def fmt(self) -> str:
        return fmt_spread(self.median, self.p20, self.p80) if self.times_ms else "-"

    def summary(self) -> dict:
        if not self.times_ms:
            return dict(name=self.name, rounds=0, median_ms=None, p20_ms=None, p80_ms=None,
                        min_ms=None, max_ms=None, spread=None, times_ms=[],
                        warmup_ms=list(self.warmup_ms))
        return dict(name=self.name, rounds=self.rounds, median_ms=self.median,
                    p20_ms=self.p20, p80_ms=self.p80, min_ms=self.min, max_ms=self.max,
                    spread=self.spread, times_ms=list(self.times_ms),
                    warmup_ms=list(self.warmup_ms))


# --------------------------------------------------------------------------- machine load


def _proc_stat():
    """(busy seconds, steal seconds, total seconds, cpus) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        vals = [int(v) for v in lines[0].split()[1:]]
        ncpu = sum(1 for ln in lines[1:] if ln.startswith("cpu") and ln[3:4].isdigit())
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    vals += [0] * (10 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    busy = user + nice + system + irq + softirq  # guest time is inside user already
    total = busy + idle + iowait + steal
    return busy / hz, steal / hz, total / hz, ncpu or (os.cpu_count() or 1)


def _loadavg():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


@dataclass
class Load:
    """What else ran on the machine over an interval."""

    wall_s: float
    cpus: int
    self_cores: float  # this process's CPU time / wall time (all its threads)
    others_cores: float | None  # CPUs kept busy by other processes, on average
    steal: float | None  # share of CPU time stolen by the hypervisor
    loadavg_start: tuple | None
    loadavg_end: tuple | None

    def summary(self) -> dict:
        return asdict(self)


class LoadProbe:
    """Samples /proc/stat, this process's CPU time and the load average at start();
    stop() returns a :class:`Load` for the interval."""

    def start(self) -> "LoadProbe":
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.stat0 = _proc_stat()
        self.load0 = _loadavg()
        return self

    def stop(self) -> Load:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        own = time.process_time() - self.cpu0
        stat1 = _proc_stat()
        others = steal = None
        cpus = os.cpu_count() or 1
        if self.stat0 is not None and stat1 is not None:
            busy = stat1[0] - self.stat0[0]
            total = stat1[2] - self.stat0[2]
            cpus = stat1[3]
            others = max(0.0, busy - own) / wall
            steal = (stat1[1] - self.stat0[1]) / total if total > 0 else 0.0
        return Load(wall_s=wall, cpus=cpus, self_cores=own / wall, others_cores=others,
                    steal=steal, loadavg_start=self.load0, loadavg_end=_loadavg())


def load_warnings(load: Load | None, busy_warn: float, when: str = "while timing") -> list[str]:
    if load is None:
        return []
    out = []
    # /proc/stat counts in clock ticks (10 ms): too coarse to judge a short interval.
    if load.others_cores is not None and load.wall_s >= 0.2 and \
            load.others_cores > busy_warn * load.cpus:
        out.append(f"machine busy: other processes kept {load.others_cores:.1f} of "
                   f"{load.cpus} CPUs busy on average {when} (/proc/stat); the "
                   "figures are not those of a quiet machine")
    if load.steal is not None and load.wall_s >= 0.2 and load.steal > STEAL_WARN:
        out.append(f"CPU steal {100 * load.steal:.0f}% {when}: the hypervisor gave "
                   "these CPUs to other guests")
    return out


def machine_check(window: float = 0.5, busy_warn: float = 0.25) -> dict:
    """Other processes' load just before a run (this process idle for ``window`` s):
    {cpus, others_cores, steal, loadavg, warning (str or None)}."""
    probe = LoadProbe().start()
    time.sleep(window)
    load = probe.stop()
    warn = load_warnings(load, busy_warn, "just before the start")
    la = load.loadavg_end
    if la and la[0] > load.cpus and not warn:
        warn = [f"load average {la[0]:.1f} on {load.cpus} CPUs"]
    return dict(cpus=load.cpus, others_cores=load.others_cores, steal=load.steal,
                loadavg=la, warning="; ".join(warn) or None)


def choose_threads(requested: int | None, device, machine: dict | None) -> str | None:
    """torch.set_num_threads(requested) when given; otherwise, on CPU, one thread when
    other processes kept half the cores or more busy just before the start (``machine``
    from machine_check()): multi-threaded (OpenMP) kernels stall at every barrier on a
    descheduled thread, several-fold slowdowns, and one thread is far steadier.
    Returns a note when it chose one thread, else None."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return None
    cpus = os.cpu_count() or 1
    if getattr(device, "type", str(device)) == "cuda" or cpus < 2 or not machine:
        return None
    busy = machine.get("others_cores")
    if busy is None or busy < 0.5 * cpus:
        return None
    torch.set_num_threads(1)
    return (f"other processes kept {busy:.1f} of {cpus} CPUs busy just before the start, so "
            "this run uses 1 thread (torch.set_num_threads(1)); --threads N overrides")


def print_run_header(env: dict, settings: "Settings") -> None:
    """The lines every benchmark prints before its rows: the command, the machine
    and how rows are timed."""
    print(f"command: {env['command']}\nmachine: {env['machine']}\ntiming: "
          f"{settings.describe()}; median [p20-p80] reported", flush=True)


def print_machine_notes(machine: dict, threads_note: str | None) -> list[str]:
    """Prints the start-of-run machine warning and the thread-count note (when there
    are any) and returns them."""
    notes = []
    if machine["warning"]:
        print("WARNING: " + machine["warning"])
        notes.append(machine["warning"])
    if threads_note:
        print("note: " + threads_note)
        notes.append(threads_note)
    return notes


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Settings:
    """How one row is timed (see the module docstring)."""

    warmup: int = 2  # minimum warm-up rounds (0: none)
    max_warmup: int = 10
    warmup_tol: float = 0.10
    max_warmup_seconds: float = 30.0
    min_rounds: int = 10
    min_seconds: float = 0.0  # timed steps of the row, summed over implementations
    max_rounds: int = 1000
    max_seconds: float = 0.0  # wall time of the timed rounds; 0 = no cap
    order: str = "rotate"  # or "shuffle"
    seed: int = 0
    spread_warn: float = 0.10
    busy_warn: float = 0.25  # other processes' busy CPUs / CPUs

    def __post_init__(self):
        if self.min_rounds < 1:
            raise ValueError(f"min_rounds = {self.min_rounds}: at least one round")
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds = {self.max_rounds} < min_rounds = {self.min_rounds}")
        if self.warmup < 0 or self.max_warmup < self.warmup:
            raise ValueError(f"warmup = {self.warmup}, max_warmup = {self.max_warmup}: need "
                             "0 <= warmup <= max_warmup")
        if self.order not in ("rotate", "shuffle"):
            raise ValueError(f"order = {self.order!r}: 'rotate' or 'shuffle'")

    def with_(self, **kw) -> "Settings":
        """A copy with the given fields replaced (None values ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def as_flags(self) -> str:
        """These settings written as the command-line flags that give them."""
        return (f"--warmup {self.warmup} --max-warmup {self.max_warmup} --min-rounds "
                f"{self.min_rounds} --min-time {self.min_seconds:g} --max-rounds "
                f"{self.max_rounds} --max-time {self.max_seconds:g}")

    def describe(self) -> str:
        if self.warmup == 0:
            s = "no warm-up"
        elif self.max_warmup == self.warmup:
            s = f"{self.warmup} warm-up round{'s' if self.warmup > 1 else ''}"
        else:
            s = (f"warm-up {self.warmup}-{self.max_warmup} rounds (until each step's last two "
                 f"agree within {100 * self.warmup_tol:.0f}%)")
        s += f", then >= {self.min_rounds} interleaved rounds"
        if self.min_seconds:
            s += f" and >= {self.min_seconds:g} s of timed steps"
        s += f", at most {self.max_rounds} rounds"
        if self.max_seconds:
            s += f" or {self.max_seconds:g} s"
        return s



# The smoke-run settings every script's --quick uses: 1 warm-up, 3 rounds.
QUICK = Settings(warmup=1, max_warmup=1, min_rounds=3, max_rounds=3)


def defaults_help(cpu: Settings, cuda: Settings, quick: Settings = QUICK, unit: str = "",
                  notes: str = "") -> str:
    """The sentence of a script's --help that gives its timing defaults as flags."""
    per = f" (per {unit})" if unit else ""
    text = (f"Defaults{per}: CPU {cpu.as_flags()}; CUDA {cuda.as_flags()}; --quick "
            f"{quick.as_flags()}.")
    return f"{text} {notes}" if notes else text

@dataclass
class Measurement:
    """The result of :func:`measure` for one row."""

    timings: dict
    rounds: int
    warmup_rounds: int
    warmup_settled: bool
    stop_reason: str
    elapsed_s: float
    load: Load | None
    warnings: list
    settings: Settings

    def __getitem__(self, name: str) -> Timing:
        return self.timings[name]

    def summary(self, times: bool = True) -> dict:
        ts = {}
        for k, t in self.timings.items():
            s = t.summary()
            if not times:
                s.pop("times_ms")
                s.pop("warmup_ms")
            ts[k] = s
        return dict(rounds=self.rounds, warmup_rounds=self.warmup_rounds,
                    warmup_settled=self.warmup_settled, stop_reason=self.stop_reason,
                    elapsed_s=self.elapsed_s,
                    load=None if self.load is None else self.load.summary(),
                    warnings=list(self.warnings), timings=ts)


def _cuda_sync(device):
    import torch

    return lambda: torch.cuda.synchronize(device)


def measure(steps: Mapping[str, Callable], device=None, settings: Settings | None = None, *,
            setup: Mapping[str, Callable] | Callable | None = None, timer: str = "wall",
            clock: Callable[[], float] | None = None, sync: Callable[[], None] | None = None,
            probe: bool = True, **overrides) -> Measurement:
    """Times ``steps`` (name -> callable, one step each) interleaved; see the module
    docstring. ``setup``: one callable for all, or name -> callable, run before every
    step (warm-up included) and not timed; it returns None (the step is called with no
    argument) or a tuple of arguments for the step. ``overrides``: Settings fields."""
    if not steps:
        raise ValueError("measure: no steps")
    st = (settings or Settings()).with_(**overrides)
    names = list(steps)
    cuda = device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"
    if sync is None:
        sync = _cuda_sync(device) if cuda else (lambda: None)
    clock = clock or time.perf_counter
    if timer not in ("wall", "events"):
        raise ValueError(f"timer = {timer!r}: 'wall' or 'events'")
    if timer == "events" and not cuda:
        raise ValueError("timer='events' needs a CUDA device")

    def get_setup(name):
        if setup is None:
            return None
        if callable(setup):
            return setup
        return setup.get(name)

    def one(name) -> float:
        fn = steps[name]
        s = get_setup(name)
        args = s() if s is not None else None
        args = () if args is None else tuple(args)
        if timer == "events":
            import torch

            sync()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn(*args)
            b.record()
            b.synchronize()
            del out
            return a.elapsed_time(b)
        sync()
        t0 = clock()
        out = fn(*args)
        sync()
        dt = (clock() - t0) * 1e3
        del out
        return dt

    rng = random.Random(st.seed)

    def order(rnd: int) -> list:
        if st.order == "shuffle":
            o = names[:]
            rng.shuffle(o)
            return o
        k = rnd % len(names)
        return names[k:] + names[:k]

    timings = {n: Timing(n) for n in names}
    warnings_: list[str] = []

    # Warm-up.
    # warmup = 0: none; a fixed count (max_warmup == warmup) needs no agreement.
    w = 0
    converge = 0 < st.warmup < st.max_warmup
    settled = not converge
    t_w = clock()
    while w < (st.max_warmup if st.warmup else 0) and (w < st.warmup or not settled):
        if w >= st.warmup and clock() - t_w > st.max_warmup_seconds:
            break
        for n in order(w):
            timings[n].warmup_ms.append(one(n))
        w += 1
        if converge and w >= 2:
            settled = all(_agree(timings[n].warmup_ms[-2:], st.warmup_tol) for n in names)
    if not settled:
        worst = max(names, key=lambda n: _disagreement(timings[n].warmup_ms[-2:]))
        last = timings[worst].warmup_ms[-2:]
        warnings_.append(
            f"warm-up did not settle in {w} rounds: {worst}'s last warm-up times "
            + (f"{fmt_ms(last[0])} and {fmt_ms(last[1])} ms differ by more than "
               f"{100 * st.warmup_tol:.0f}%" if len(last) == 2 else "are too few to compare"))

    # Timed rounds.
    lp = LoadProbe().start() if probe else None
    t0 = clock()
    stepped = 0.0
    rnd = 0
    reason = ""
    while True:
        for n in order(w + rnd):
            dt = one(n)
            timings[n].times_ms.append(dt)
            stepped += dt / 1e3
        rnd += 1
        elapsed = clock() - t0
        if rnd >= st.max_rounds:
            reason = "max_rounds"
            break
        if st.max_seconds and elapsed >= st.max_seconds and rnd >= min(st.min_rounds, 3):
            reason = "max_seconds"
            break
        if rnd >= st.min_rounds and stepped >= st.min_seconds:
            reason = "min_seconds" if rnd > st.min_rounds else "min_rounds"
            break
    elapsed = clock() - t0
    load = lp.stop() if lp is not None else None

    if reason == "max_seconds" and rnd < st.min_rounds:
        warnings_.append(f"only {rnd} of {st.min_rounds} rounds: the {st.max_seconds:g} s cap "
                         "(max_seconds / --max-time) was reached")
    wide = [f"{n} {100 * timings[n].spread:.0f}%" for n in names
            if timings[n].rounds >= 2 and timings[n].spread > st.spread_warn]
    if wide:
        warnings_.append(f"wide spread, (p80 - p20) / median above "
                         f"{100 * st.spread_warn:.0f}% ({rnd} rounds): " + ", ".join(wide))
    warnings_ += load_warnings(load, st.busy_warn)
    return Measurement(timings=timings, rounds=rnd, warmup_rounds=w, warmup_settled=settled,
                       stop_reason=reason, elapsed_s=elapsed, load=load, warnings=warnings_,
                       settings=st)


def _agree(pair, tol: float) -> bool:
    if len(pair) < 2:
        return False
    a, b = pair
    lo = min(a, b)
    return abs(a - b) <= tol * lo if lo > 0 else a == b


def _disagreement(pair) -> float:
    if len(pair) < 2:
        return math.inf
    lo = min(pair)
    return abs(pair[0] - pair[1]) / lo if lo > 0 else math.inf


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The timing options every benchmark script takes; ``defaults`` describes the
    script's defaults (printed at the end of the group's help)."""
    g = parser.add_argument_group(
        "timing (benchmarks/_timing.py: warm-up, then interleaved rounds; median [p20-p80])",
        textwrap.fill(defaults, 78, initial_indent="  ", subsequent_indent="  ",
                      break_on_hyphens=False, break_long_words=False))
    g.add_argument("--min-rounds", "--repeats", "--reps", dest="min_rounds", type=int,
                   default=None, metavar="N", help="timed rounds per row at least")
    g.add_argument("--min-time", dest="min_seconds", type=float, default=None, metavar="S",
                   help="keep timing a row until its timed steps add up to S seconds")
    g.add_argument("--max-rounds", dest="max_rounds", type=int, default=None, metavar="N",
                   help="timed rounds per row at most")
    g.add_argument("--max-time", "--budget", dest="max_seconds", type=float, default=None,
                   metavar="S", help="stop a row's timed rounds after S seconds of wall time "
                   "(at least min(N, 3) rounds run); 0 = no cap")
    g.add_argument("--warmup", dest="warmup", type=int, default=None, metavar="N",
                   help="warm-up rounds at least (0: none); more follow until each "
                        "implementation's last two warm-up times agree within --warmup-tol")
    g.add_argument("--max-warmup", dest="max_warmup", type=int, default=None, metavar="N",
                   help="warm-up rounds at most")
    g.add_argument("--warmup-tol", dest="warmup_tol", type=float, default=None, metavar="F",
                   help="relative agreement that ends the warm-up")
    g.add_argument("--spread-warn", dest="spread_warn", type=float, default=None, metavar="F",
                   help="warn when (p80 - p20) / median exceeds F")
    g.add_argument("--order", choices=("rotate", "shuffle"), default=None,
                   help="order of the implementations in each round: rotated every round "
                        "(default) or shuffled (seeded)")
    g.add_argument("--parse-only", action="store_true",
                   help=f"check the command line and exit 0 without running anything (also "
                        f"with {PARSE_ONLY_ENV}=1 in the environment; benchmarks/run_gpu.sh "
                        "--dry-run uses it)")


PARSE_ONLY_ENV = "LIPFAST_BENCH_PARSE_ONLY"


def parse_only(args: argparse.Namespace) -> bool:
    """True when the run should stop after parsing (--parse-only or the env var)."""
    return bool(getattr(args, "parse_only", False)) or os.environ.get(PARSE_ONLY_ENV, "") \
        not in ("", "0")


def exit_if_parse_only(args: argparse.Namespace, script: str) -> None:
    """After the script's own checks of its arguments: with --parse-only (or
    LIPFAST_BENCH_PARSE_ONLY=1), print what was parsed and exit 0."""
    if parse_only(args):
        given = {k: v for k, v in vars(args).items() if v not in (None, False, [])
                 and k != "parse_only"}
        print(f"parse-only: {os.path.basename(script)} arguments ok: {given}", flush=True)
        raise SystemExit(0)


def settings_from_args(args: argparse.Namespace, default: Settings) -> Settings:
    """``default`` with the options given on the command line; a --warmup above the
    default --max-warmup raises the maximum with it; --min-rounds likewise for
    --max-rounds."""
    kw = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    kw = {k: v for k, v in kw.items() if v is not None}
    if "warmup" in kw and "max_warmup" not in kw:
        kw["max_warmup"] = max(default.max_warmup, kw["warmup"])
    if "min_rounds" in kw and "max_rounds" not in kw:
        kw["max_rounds"] = max(default.max_rounds, kw["min_rounds"])
    return replace(default, **kw)


def settings_summary(st: Settings) -> dict:
    return asdict(st)


def print_warnings(m: Measurement, indent: str = "    ") -> None:
    for w in m.warnings:
        print(f"{indent}WARNING: {w}", flush=True)
