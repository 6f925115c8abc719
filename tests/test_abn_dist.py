"""Multi-process tests of InPlaceABNSync on CPU with the gloo backend.

Every test spawns its ranks (``torch.multiprocessing`` with the 'spawn' start
method) in one process group rendezvousing through a FileStore in ``tmp_path``;
gloo is pinned to the loopback interface, so nothing leaves 127.0.0.1.

Each rank runs InPlaceABNSync on its slice of a global batch (same seed on
every rank, unequal slices, one of them empty) and checks, in the same process,
against two single-process references on the concatenated global batch:
``lipfast.InPlaceABN`` (non-sync) and plain PyTorch (``F.batch_norm`` with
``weight=|w| + eps`` followed by the activation, with autograd).

Parameter gradients: the sync layer leaves them local (per-rank partial sums),
as DDP expects. The test all-reduces them with SUM (not DDP's average), so they
must equal the gradients of the single-process reference whose loss is the sum
of all the ranks' losses.

Failures: an exception in a rank (a failed check included) is re-raised in the
parent by ``torch.multiprocessing``'s ProcessContext.join, which also kills the
other ranks; each rank writes a report of the checks it ran, which the parent
requires; a hang fails after the process-group timeout or the join deadline.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import spawn

from lipfast import InPlaceABN, InPlaceABNSync

pytestmark = pytest.mark.slow

C = 3
SPATIAL_4D = (5, 7)  # odd H, W
ACTIVATIONS = (("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.01))
TOL = dict(rtol=1e-10, atol=1e-10)
LR = 0.1  # SGD step between the two training steps of the two-step checks

# Per world size: (per-rank batch sizes, spatial shape) of the training cases.
# Every list has an empty rank and a rank with a single sample; in the 2D cases
# (1, 0, 4) rank 0 has one value per channel and rank 1 none, but the global
# count is >= 2, so no rank may raise.
CASES = {
    2: [((3, 0), SPATIAL_4D), ((0, 2), SPATIAL_4D), ((4, 0), ()), ((1, 3), ())],
    3: [((2, 5, 0), SPATIAL_4D), ((1, 0, 4), SPATIAL_4D), ((1, 0, 4), ())],
}


# --------------------------------------------------------------------------- helpers


def _act(z: torch.Tensor, activation: str, param: float) -> torch.Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope=param)
    if activation == "elu":
        return F.elu(z, alpha=param)
    return z


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _params(seed: int):
    """Identical on every rank: weight with mixed signs, bias, running stats
    away from their defaults (so the momentum blend is visible)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g, dtype=torch.float64) + 0.2
    w[0] = -w[0].abs() - 0.3  # mixed signs, guaranteed
    w[1] = w[1].abs() + 0.3
    b = torch.randn(C, generator=g, dtype=torch.float64)
    rm = torch.randn(C, generator=g, dtype=torch.float64)
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return w, b, rm, rv


def _batch(seed: int, n: int, spatial: tuple):
    """Global input (channel offsets and scales far from 0 / 1) and upstream grad."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, C) + tuple(spatial)
    view = (1, C) + (1,) * len(spatial)
    scale = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64).view(view)
    shift = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64).view(view)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dy


class _TorchRef:
    """Plain-PyTorch ABN: F.batch_norm with weight |w| + eps, then the activation."""

    def __init__(self, w, b, rm, rv, eps, momentum, activation, param):
        self.w = w.clone().requires_grad_()
        self.b = b.clone().requires_grad_()
        self.rm, self.rv = rm.clone(), rv.clone()
        self.nbt = 0
        self.eps, self.momentum = eps, momentum
        self.activation, self.param = activation, param

    def __call__(self, x, training: bool):
        factor = 0.0
        if training:
            self.nbt += 1
            factor = 1.0 / self.nbt if self.momentum is None else self.momentum
        z = F.batch_norm(x, self.rm, self.rv, weight=self.w.abs() + self.eps, bias=self.b,
                         training=training, momentum=factor, eps=self.eps)
        return _act(z, self.activation, self.param)


def _make_modules(w, b, rm, rv, eps, momentum, activation, param, group):
    kw = dict(eps=eps, momentum=momentum, activation=activation, activation_param=param)
    sync = InPlaceABNSync(C, group=group, **kw).double()
    ref = InPlaceABN(C, **kw).double()
    with torch.no_grad():
        for m in (sync, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
    return sync.train(), ref.train()


# --------------------------------------------------------------------------- checks


def _check_training(rank, members, sizes, spatial, activation, param, *, seed, steps=1,
                    momentum=0.1, eps=1e-5, group=None, eval_rank=None):
    """``steps`` synchronised training steps (SGD update in between) compared with
    both references; then, optionally, an eval-mode step on ``eval_rank`` only."""
    tag = (f"rank {rank} sizes={sizes} spatial={spatial} act={activation} "
           f"momentum={momentum} eps={eps}")
    idx = members.index(rank)
    start, stop = sum(sizes[:idx]), sum(sizes[: idx + 1])
    w, b, rm, rv = _params(seed)
    sync, ref = _make_modules(w, b, rm, rv, eps, momentum, activation, param, group)
    tref = _TorchRef(w, b, rm, rv, eps, momentum, activation, param)

    for step in range(1, steps + 1):
        what = f"{tag} step {step}"
        x, dy = _batch(seed * 100 + step, sum(sizes), spatial)

        # distributed: this rank's slice (the input of an in-place op must not be a leaf)
        x_leaf = x[start:stop].clone().requires_grad_()
        out = sync(x_leaf.clone())
        assert out.shape == x_leaf.shape
        (out * dy[start:stop]).sum().backward()
        out = out.detach().clone()
        gw, gb = sync.weight.grad.clone(), sync.bias.grad.clone()
        # DDP-style reduction of the (local) parameter grads, with SUM (see module docstring)
        dist.all_reduce(gw, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(gb, op=dist.ReduceOp.SUM, group=group)

        # reference 1: lipfast.InPlaceABN on the global batch
        xr = x.clone().requires_grad_()
        out_r = ref(xr.clone())
        (out_r * dy).sum().backward()

        # reference 2: plain PyTorch on the global batch
        xt = x.clone().requires_grad_()
        out_t = tref(xt, training=True)
        (out_t * dy).sum().backward()

        refs = {
            "InPlaceABN": (out_r.detach(), xr.grad, ref.weight.grad, ref.bias.grad,
                           ref.running_mean, ref.running_var, int(ref.num_batches_tracked)),
            "torch": (out_t.detach(), xt.grad, tref.w.grad, tref.b.grad, tref.rm, tref.rv,
                      tref.nbt),
        }
        for name, (o, dx, dw, db, r_m, r_v, nbt) in refs.items():
            _close(out, o[start:stop], f"{what} vs {name}: output")
            _close(x_leaf.grad, dx[start:stop], f"{what} vs {name}: input grad")
            _close(gw, dw, f"{what} vs {name}: all-reduced weight grad")
            _close(gb, db, f"{what} vs {name}: all-reduced bias grad")
            _close(sync.running_mean, r_m, f"{what} vs {name}: running_mean")
            _close(sync.running_var, r_v, f"{what} vs {name}: running_var")
            assert int(sync.num_batches_tracked) == nbt == step, (
                f"{what} vs {name}: num_batches_tracked {int(sync.num_batches_tracked)} "
                f"!= {nbt} (step {step})")

        # identical SGD step everywhere (the sync grads are the all-reduced ones)
        with torch.no_grad():
            for p, grad in ((sync.weight, gw), (sync.bias, gb), (ref.weight, ref.weight.grad),
                            (ref.bias, ref.bias.grad), (tref.w, tref.w.grad),
                            (tref.b, tref.b.grad)):
                p.sub_(LR * grad)
        for p in (sync.weight, sync.bias, ref.weight, ref.bias, tref.w, tref.b):
            p.grad = None

    if eval_rank is None:
        return
    if rank == eval_rank:
        # eval: running statistics, no collective (the other ranks do not take part)
        what = f"{tag} eval on rank {rank}"
        sync.eval()
        ref.eval()
        stats_before = (sync.running_mean.clone(), sync.running_var.clone(),
                        int(sync.num_batches_tracked))
        x, dy = _batch(seed * 100 + 99, 2, spatial)
        x_leaf = x.clone().requires_grad_()
        out = sync(x_leaf.clone())
        (out * dy).sum().backward()
        xr = x.clone().requires_grad_()
        out_r = ref(xr.clone())
        (out_r * dy).sum().backward()
        xt = x.clone().requires_grad_()
        out_t = tref(xt, training=False)
        (out_t * dy).sum().backward()
        for name, (o, dx, dw, db) in {
            "InPlaceABN": (out_r, xr.grad, ref.weight.grad, ref.bias.grad),
            "torch": (out_t, xt.grad, tref.w.grad, tref.b.grad),
        }.items():
            _close(out.detach(), o.detach(), f"{what} vs {name}: output")
            _close(x_leaf.grad, dx, f"{what} vs {name}: input grad")
            _close(sync.weight.grad, dw, f"{what} vs {name}: weight grad (local)")
            _close(sync.bias.grad, db, f"{what} vs {name}: bias grad (local)")
        _close(sync.running_mean, stats_before[0], f"{what}: running_mean changed in eval")
        _close(sync.running_var, stats_before[1], f"{what}: running_var changed in eval")
        assert int(sync.num_batches_tracked) == stats_before[2], f"{what}: counter changed"
    # A collective with known result: it would fail or hang if the eval step above
    # had issued a collective of its own that the other ranks did not match.
    probe = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(probe, group=group)
    expected = float(sum(r + 1 for r in members))
    assert probe.item() == expected, f"{tag}: probe all_reduce gave {probe.item()} != {expected}"


def _check_too_few_values(rank, world, sizes, spatial):
    """Every rank raises when the global count per channel is <= 1; nothing is
    updated but the counter (as in nn.BatchNorm)."""
    w, b, rm, rv = _params(7)
    m, _ = _make_modules(w, b, rm, rv, 1e-5, 0.1, "leaky_relu", 0.01, None)
    idx_start = sum(sizes[:rank])
    x, _ = _batch(11, sum(sizes), spatial)
    x = x[idx_start: idx_start + sizes[rank]].clone()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(x)
    _close(m.running_mean, rm, f"rank {rank} sizes={sizes}: running_mean after the error")
    _close(m.running_var, rv, f"rank {rank} sizes={sizes}: running_var after the error")


# --------------------------------------------------------------------------- scenarios


def _scenario_training(rank: int, world: int) -> list[str]:
    members = list(range(world))
    done = []
    seed = 1
    for sizes, spatial in CASES[world]:
        for activation, param in ACTIVATIONS:
            seed += 1
            _check_training(rank, members, sizes, spatial, activation, param, seed=seed)
            done.append(f"train sizes={sizes} spatial={spatial} {activation}")
    # two consecutive steps, eval on one rank afterwards; cumulative average and a
    # non-default eps in one of them
    sizes, spatial = CASES[world][0]
    _check_training(rank, members, sizes, spatial, "leaky_relu", 0.01, seed=50, steps=2,
                    eval_rank=0)
    done.append(f"two steps + eval sizes={sizes} leaky_relu")
    _check_training(rank, members, sizes, spatial, "elu", 1.0, seed=51, steps=2,
                    momentum=None, eps=1e-3, eval_rank=world - 1)
    done.append(f"two steps + eval sizes={sizes} elu momentum=None eps=1e-3")
    sizes, spatial = CASES[world][-1]
    _check_training(rank, members, sizes, spatial, "identity", 0.01, seed=52, steps=2,
                    eval_rank=1)
    done.append(f"two steps + eval sizes={sizes} spatial={spatial} identity")
    # an explicit group: ranks 0 and 1 only (world 3: rank 2 stays out of it)
    sub_members = [0, 1]
    sub = dist.new_group(sub_members)  # every rank must call new_group
    if rank in sub_members:
        _check_training(rank, sub_members, (4, 0), SPATIAL_4D, "leaky_relu", 0.01, seed=53,
                        steps=2, group=sub)
        done.append("group=new_group([0, 1])")
    dist.barrier()
    return done


def _scenario_too_few(rank: int, world: int) -> list[str]:
    done = []
    for sizes, spatial in (((1, 0), ()), ((0, 1), (1, 1))):
        _check_too_few_values(rank, world, sizes, spatial)
        done.append(f"ValueError sizes={sizes} spatial={spatial}")
    # the group is still usable and in step afterwards
    _check_training(rank, list(range(world)), (2, 0), (), "leaky_relu", 0.01, seed=60)
    done.append("training after the errors")
    return done


_SCENARIOS = {"training": _scenario_training, "too_few": _scenario_too_few}


def _spawn(tmp_path, world: int, scenario: str) -> list[dict]:
    return spawn(_SCENARIOS[scenario], world, tmp_path, scenario)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_sync_matches_single_process_references(tmp_path, world):
    """Unequal per-rank batches (one empty), 4D (odd H, W) and 2D inputs, the three
    activations; one and two training steps; eval on one rank; an explicit group."""
    reports = _spawn(tmp_path, world, "training")
    n_expected = len(CASES[world]) * len(ACTIVATIONS) + 3
    for report in reports:
        extra = 1 if report["rank"] in (0, 1) else 0  # the group=[0, 1] check
        assert len(report["checks"]) == n_expected + extra, report


def test_sync_too_few_values_raises_on_every_rank(tmp_path):
    """Global count of 1 value per channel, sizes (1, 0): every rank raises
    ValueError('... more than 1 value per channel ...'), then the group still works."""
    reports = _spawn(tmp_path, 2, "too_few")
    for report in reports:
        assert len(report["checks"]) == 3, report
