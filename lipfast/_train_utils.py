"""Helpers shared by ``lipfast.train`` and ``lipfast.evaluate``: atomic
checkpoints, RNG state capture, SCHP's learning-rate schedule (and the pose
recipe's step schedule), the
deterministic sharded sampler, self-correction (parameter averaging and BN
re-estimation), model construction from stored hyper-parameters, progress
(tqdm, or plain lines for logs) and the SIGINT/SIGTERM stop flag."""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ._io import atomic_file

CHECKPOINT_FORMAT = "lipfast-train-1"


def layers_arg(text: str) -> tuple:
    """argparse type of ``--layers``: four positive Bottleneck counts, e.g. ``3,4,23,3``."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be 4 comma-separated ints, got {text!r}")
    if len(vals) != 4 or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--layers must be 4 positive ints, got {text!r}")
    return vals


# ----------------------------------------------------------------- checkpoints

def atomic_save(obj, path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder,
    flushed to disk and renamed over ``path`` with ``os.replace``: ``path``
    holds either the old or the new checkpoint, never a partial one, whatever
    interrupts the write (the temporary file is removed on errors)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_training_checkpoint(path, option: str = "--resume") -> dict:
    """A checkpoint written by ``lipfast.train`` (``weights_only=True``), read
    and checked by :func:`lipfast.models.read_checkpoint` (the one reader);
    another format is a ``ValueError`` saying what the file is."""
    from lipfast.models import read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.kind != "lipfast.train":
        raise ValueError(f"{option} {ckpt.path}: needs a lipfast.train checkpoint (weights, "
                         f"optimiser, schedule and RNG state); this file is a "
                         f"{ckpt.description} (weights only): start from it with --init")
    return ckpt.raw


def model_hparams(model) -> dict:
    """The hyper-parameters a checkpoint stores to rebuild ``model``
    (:func:`lipfast.models.model_hparams`)."""
    from lipfast.models.registry import model_hparams as hparams_of

    return hparams_of(model)


def build_model(hparams: dict, norm: str | None = None):
    """The model (CE2P or HRNetV2) of stored hyper-parameters; ``norm``
    overrides the stored norm (e.g. ``inplace_abn`` for single-process use of a
    model trained with ``inplace_abn_sync``: same keys and numerics).
    Hyper-parameters without ``model`` (older checkpoints) are CE2P's."""
    from lipfast.models.registry import build_from_hparams

    return build_from_hparams(hparams, norm)


def eval_norm(norm: str) -> str:
    """The single-process norm equivalent to a training norm."""
    return "inplace_abn" if norm == "inplace_abn_sync" else norm


# ----------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states, in a form that
    ``torch.load(weights_only=True)`` reads (tensors, ints, floats, lists)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------- schedule

class SCHPSchedule:
    """SCHP's ``SGDRScheduler`` evaluated per iteration at the fractional epoch
    ``e = iteration / iters_per_epoch`` (SCHP steps it once per epoch):

    - ``e < warmup``: linear from ``eta_min`` to ``base_lr``;
    - ``e < cycle_start``: cosine from ``base_lr`` down to ``eta_min`` at ``cycle_start``;
    - after: restarts every ``cycle_epochs``, cosine from ``cyclical_base_lr`` to ``eta_min``.

    SCHP's values: ``eta_min = base_lr / 100``, ``cyclical_base_lr = base_lr / 2``,
    warm-up 10 epochs, ``cycle_start`` = the self-correction start (= ``epochs``
    without cycles).
    """

    def __init__(self, optimizer, base_lr: float, iters_per_epoch: int, epochs: int,
                 warmup_epochs: float = 10, cycle_start: float | None = None,
                 cycle_epochs: float = 10, eta_min: float | None = None,
                 cyclical_base_lr: float | None = None):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.epochs = float(epochs)
        self.cycle_start = float(epochs if cycle_start is None else cycle_start)
        self.warmup = min(float(warmup_epochs), self.cycle_start)
        self.cycle_epochs = float(cycle_epochs)
        self.eta_min = self.base_lr / 100 if eta_min is None else float(eta_min)
        self.cyclical_base_lr = self.base_lr / 2 if cyclical_base_lr is None else float(
            cyclical_base_lr)
        self.last_iter = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        e = iteration / self.iters_per_epoch
        lo = self.eta_min
        if e < self.warmup:
            return lo + e * (self.base_lr - lo) / self.warmup
        if e < self.cycle_start:
            span = self.cycle_start - self.warmup
            return lo + (self.base_lr - lo) * (1 + math.cos(math.pi * (e - self.warmup) / span)) / 2
        phase = ((e - self.cycle_start) % self.cycle_epochs) / self.cycle_epochs
        return lo + (self.cyclical_base_lr - lo) * (1 + math.cos(math.pi * phase)) / 2

    def get_last_lr(self) -> float:
        return self.lr_at(self.last_iter)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_iter)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter}

    def load_state_dict(self, state: dict) -> None:
        self.last_iter = int(state["last_iter"])
        self._apply()


class StepSchedule:
    """The pose recipe's learning rate (deep-high-resolution-net.pytorch's
    ``MultiStepLR`` stepped once per epoch, SPEC 10: x0.1 at epochs 170 and 200),
    evaluated per iteration with :class:`SCHPSchedule`'s interface: the rate of
    iteration ``i`` is ``base_lr * factor ** k``, ``k`` the number of
    ``milestones`` <= ``i // iters_per_epoch`` (the epoch it belongs to, from 0)."""

    def __init__(self, optimizer, base_lr: float, iters_per_epoch: int, milestones=(170, 200),
                 factor: float = 0.1):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.milestones = tuple(int(m) for m in milestones)
        self.factor = float(factor)
        self.last_iter = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        epoch = iteration // self.iters_per_epoch
        return self.base_lr * self.factor ** sum(1 for m in self.milestones if m <= epoch)

    get_last_lr = SCHPSchedule.get_last_lr
    _apply = SCHPSchedule._apply
    step = SCHPSchedule.step
    state_dict = SCHPSchedule.state_dict
    load_state_dict = SCHPSchedule.load_state_dict


# ----------------------------------------------------------------- sampler

class ShardSampler(torch.utils.data.Sampler):
    """Deterministic shuffled sampler for ``world`` ranks: epoch ``e``'s order
    is ``randperm(n)`` from a generator seeded with ``seed + e``, cut to a
    multiple of ``world * batch_size`` (drop_last), rank ``r`` takes every
    ``world``-th index from ``r``. ``set_epoch(e, skip_batches=k)`` starts
    after the first k batches of the epoch (exact mid-epoch resume)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world = int(n), int(batch_size), rank, world
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.skip = 0, 0
        self.batches = self.n // (self.world * self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[:self.batches * self.world * self.batch_size]
        mine = order[self.rank::self.world]
        return iter(mine[self.skip * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.batches - self.skip) * self.batch_size


# ----------------------------------------------------------------- self-correction

def _norm_layers(model):
    return [m for m in model.modules()
            if getattr(m, "running_mean", None) is not None and hasattr(m, "momentum")
            and hasattr(m, "reset_running_stats")]


@torch.no_grad()
def moving_average(target, source, alpha: float) -> None:
    """SCHP's ``moving_average``: every parameter of ``target`` becomes
    ``(1 - alpha) * target + alpha * source`` (buffers untouched; alpha =
    1 / (cycle + 1) gives the cumulative average of the snapshots)."""
    for pt, ps in zip(target.parameters(), source.parameters()):
        pt.mul_(1.0 - alpha).add_(ps.detach().to(pt.dtype), alpha=alpha)


@torch.no_grad()
def bn_re_estimate(model, batches, autocast=None) -> int:
    """SCHP's ``bn_re_estimate``: resets the running statistics of every norm
    layer and recomputes them in training mode over ``batches`` (an iterable of
    image tensors on the model's device), as the size-weighted average of the
    batch statistics (momentum ``b / (n + b)``). Returns the number of images."""
    norms = _norm_layers(model)
    if not norms:
        return 0
    was_training = model.training
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
    model.train()
    n = 0
    try:
        for images in batches:
            b = images.shape[0]
            for m in norms:
                m.momentum = b / (n + b)
            if autocast is not None:
                with autocast():
                    model(images)
            else:
                model(images)
            n += b
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        model.train(was_training)
    return n


# ----------------------------------------------------------------- distributed

def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


# ----------------------------------------------------------------- progress / stop

PROGRESS_MODES = ("auto", "bar", "lines", "off")


class Progress:
    """Progress of a loop of ``total`` steps, with tqdm (SCHP's tools use it).

    ``mode``: ``"bar"``: a tqdm bar on stderr; ``"lines"``: tqdm's own status
    line (ASCII) printed as a plain line every ``every`` steps and at the last
    one, to ``stream`` (default stdout), for logs and CI; ``"off"``: nothing;
    ``"auto"`` (default): ``bar`` when stderr is a terminal, else ``lines``.
    ``update(done, info)`` reports ``done`` steps finished (``info``: a postfix
    such as the loss); the first update may start past 0 (a resumed epoch): the
    rate is the steps done here over the time since the ``Progress`` was made
    (the first step included). ``enabled=False`` is ``mode="off"`` (other ranks)."""

    def __init__(self, total: int, prefix: str = "", every: int = 20, stream=None,
                 enabled: bool = True, mode: str = "auto"):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
        self.total, self.prefix, self.every = max(1, int(total)), prefix, max(1, int(every))
        if not enabled:
            mode = "off"
        if mode == "auto":
            err = sys.stderr
            mode = "bar" if hasattr(err, "isatty") and err.isatty() else "lines"
        self.mode = mode
        self.stream = stream
        self.bar = None
        self.t0 = time.perf_counter()  # the clock runs from here: the first step counts
        self.t0_wall = time.time()  # the same instant on tqdm's clock
        self.start = None

    def update(self, done: int, info: str = "") -> None:
        if self.mode == "off":
            return
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=done - 1, desc=self.prefix,
                                file=self.stream or sys.stderr, dynamic_ncols=True,
                                leave=True)
                self.bar.start_t = self.bar.last_print_t = self.t0_wall
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        if self.start is None:
            self.start = done - 1
        if done % self.every and done != self.total:
            return
        from tqdm import tqdm

        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else None
        line = tqdm.format_meter(done, self.total, elapsed, ncols=100, prefix=self.prefix,
                                 ascii=True, postfix=info or None, rate=rate,
                                 initial=self.start)
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopFlag:
    """SIGINT/SIGTERM set ``requested`` (the loop stops at the next iteration
    boundary and saves); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write(f"\nlipfast.train: got {signal.Signals(signum).name}, stopping after "
                         "this iteration (Ctrl-C again to abort without saving)\n")
        sys.stderr.flush()

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: Ctrl-C reaches the whole process group;
    workers ignore it so the main process can stop cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
