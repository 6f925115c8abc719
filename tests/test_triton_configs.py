"""Every configuration of every Triton kernel's space (lipfast.kernels._tuning)
that survives pruning for sm_90 (bf16 estimates) runs against a float64
reference on a tiny shape (CPU tensors through TRITON_INTERPRET=1 without a GPU;
on a GPU the same tests run the compiled kernels), one test per (kernel,
configuration). Also: the resource pruning, the autotuning path with a fake
benchmark (restore of the confusion matrix between trials), pinning
(pin_config, LIPFAST_TRITON_CONFIG, LIPFAST_TRITON_AUTOTUNE=0) and the FLOP
counts of oc_attention."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from lipfast.kernels import _tuning, pin_config, unpin_config  # noqa: E402
from lipfast.kernels import confusion_matrix as KC  # noqa: E402
from lipfast.kernels import edge as KE  # noqa: E402
from lipfast.kernels import lovasz as KL  # noqa: E402
from lipfast.kernels import oc_attention as KO  # noqa: E402
from lipfast.kernels import parse_postprocess as KP  # noqa: E402
from lipfast.kernels import upsample_ce as KU  # noqa: E402
from lipfast.kernels._regions import pyramid_regions  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float32 if DEV == "cuda" else torch.float64  # float64: the interpreter only
TOL = dict(rtol=1e-4, atol=1e-4) if DT == torch.float32 else dict(rtol=1e-9, atol=1e-9)
SM90 = _tuning.LIMITS[90]
BF16 = torch.empty(0, dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_pins(monkeypatch):
    monkeypatch.delenv("LIPFAST_TRITON_CONFIG", raising=False)
    unpin_config()
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    yield
    unpin_config()


def _params():
    out = []
    for name in _tuning.NAMES:
        spec = _tuning.SPECS[name]
        for cfg in spec.configs:
            kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            out.append(pytest.param(name, kw, id=f"{name}-{_tuning.describe(cfg)}"))
    return out


def _check_kept(name, kw, args):
    """Checks that the configuration suits the test shape. One the sm_90 pruning
    drops for its resources at this shape still runs: the interpreter has no
    resource limits, and the same configuration is kept at other shapes or on
    other devices, so its logic is checked all the same."""
    spec = _tuning.SPECS[name]
    cfg = _tuning.merge(spec, spec.configs[0], kw)
    assert spec.valid(cfg.kwargs, cfg.num_warps, args), "the test shape does not suit the config"


# ------------------------------------------------------------------- oc_attention

def _oc_ref(qk, v, scale, regions):
    b, _, h, w = qk.shape
    out = torch.zeros(b, v.shape[1], h, w, dtype=torch.float64)
    for r0, r1, c0, c1 in pyramid_regions(h, w, regions):
        x = qk[:, :, r0:r1, c0:c1].flatten(2)
        vv = v[:, :, r0:r1, c0:c1].flatten(2)
        p = torch.softmax(torch.einsum("bcn,bcm->bnm", x, x) * scale, -1)
        out[:, :, r0:r1, c0:c1] = torch.einsum("bnm,bcm->bcn", p, vv).reshape(
            b, -1, r1 - r0, c1 - c0)
    return out


def _width(split):
    """A width padded to 256 * split (split 1: a small width)."""
    return {1: 12, 2: 300, 4: 600}[split]


def _oc_case(name, kw):
    dk, dv = 20, 12
    if name in ("oc_attention.fwd", "oc_attention.bwd_dv"):
        dv = _width(kw["DV_SPLIT"])
    else:
        dk = _width(kw["DK_SPLIT"])
    args = dict(QK=BF16, BLOCK_D=min(64, KO._pad(dk)), DV_P=KO._pad(dv), DK_P=KO._pad(dk))
    _check_kept(name, kw, args)
    g = torch.Generator().manual_seed(dk + dv)
    b, h, w, regions = 1, 7, 9, 2
    qk = (torch.randn(b, dk, h, w, generator=g, dtype=torch.float64) * 0.3)
    v = torch.randn(b, dv, h, w, generator=g, dtype=torch.float64)
    do = torch.randn(b, dv, h, w, generator=g, dtype=torch.float64)
    scale = dk ** -0.5
    q = qk.clone().requires_grad_()
    vr = v.clone().requires_grad_()
    ref = _oc_ref(q, vr, scale, regions)
    rdq, rdv = torch.autograd.grad(ref, (q, vr), do)
    qk_d, v_d, do_d = (t.to(DEV, DT) for t in (qk, v, do))
    key = name.split(".")[1]
    out, lse = KO.forward(qk_d, v_d, scale, regions, config={key: kw} if key == "fwd" else None)
    assert _tuning.SPECS["oc_attention.fwd"].last is not None
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **TOL)
    if key != "fwd":
        dq, dvv = KO.backward(do_d, qk_d, v_d, out, lse, scale, regions, config={key: kw})
        torch.testing.assert_close(dq.double().cpu(), rdq, **TOL)
        torch.testing.assert_close(dvv.double().cpu(), rdv, **TOL)
    last = _tuning.SPECS[name].last
    assert all(last.kwargs[k] == v for k, v in kw.items() if k in last.kwargs)
    assert (last.num_warps, last.num_stages) == (kw["num_warps"], kw["num_stages"])


# -------------------------------------------------------------------- upsample_ce

def _uce_case(name, kw):
    c = kw["BLOCK_C"] // 2 + 3
    _check_kept(name, kw, dict(C=c))
    g = torch.Generator().manual_seed(c)
    b, h, w, hh, ww = 2, 5, 4, 13, 11
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b, hh, ww), generator=g)
    y[torch.rand(b, hh, ww, generator=g) < 0.2] = 255
    wt = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    xd, yd, wd = x.to(DEV, DT), y.to(DEV), wt.to(DEV, DT)
    fcfg = kw if name == "upsample_ce.fwd" else None
    nll, lse, bad = KU.forward(xd, yd, wd, 255, False, config=fcfg)
    xr = x.clone().requires_grad_()
    up = F.interpolate(xr, (hh, ww), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, y, weight=wt, ignore_index=255, reduction="none")
    torch.testing.assert_close(nll.double().cpu(), ref.detach(), **TOL)
    torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(up, 1).detach(), **TOL)
    assert bad.item() == 0
    if name == "upsample_ce.bwd":
        dnll = torch.randn(b, hh, ww, generator=g, dtype=torch.float64)
        dx = KU.backward(dnll.to(DEV, DT), xd, yd, wd, lse, 255, False, config=kw)
        gr, = torch.autograd.grad(ref, xr, dnll)
        torch.testing.assert_close(dx.double().cpu(), gr, **TOL)


# ------------------------------------------------------------------------- lovasz

def _jaccard_ref(e, g, gs):
    n = e.shape[-1]
    cg = torch.cumsum(g.to(torch.float64), -1)
    inter = gs.double() - cg
    union = gs.double() + torch.arange(1, n + 1, dtype=torch.float64) - cg
    jac = 1 - inter / union
    grad = torch.cat([jac[:, :1], jac[:, 1:] - jac[:, :-1]], -1)
    grad = torch.where(e >= 0, grad, 0.0)
    return grad, (e.clamp_min(0) * grad).sum(-1)


def _lovasz_case(name, kw):
    blk = kw["BLOCK"]
    n = blk // 2 + 5 if blk > 64 else 37
    _check_kept(name, kw, dict(n=n))
    g = torch.Generator().manual_seed(n)
    e = torch.rand(3, n, generator=g, dtype=torch.float64)
    fg = torch.rand(3, n, generator=g) < 0.4
    ign = torch.rand(3, n, generator=g) < 0.2
    fg &= ~ign
    e = torch.where(ign, -1.0, e)
    e_sorted, perm = torch.sort(e, -1, descending=True)
    gsrt = torch.gather(fg, -1, perm)
    gsum = fg.sum(-1, keepdim=True, dtype=torch.int32)
    grad, loss = KL.jaccard_grad(e_sorted.to(DEV, DT), gsrt.to(DEV), gsum.to(DEV), config=kw)
    rg, rl = _jaccard_ref(e_sorted, gsrt, gsum)
    torch.testing.assert_close(grad.double().cpu(), rg, **TOL)
    torch.testing.assert_close(loss.double().cpu(), rl, **TOL)


# --------------------------------------------------------------------------- edge

def _edge_case(name, kw):
    hgt, wid = kw["BLOCK_H"] // 2 + 3, kw["BLOCK_W"] // 2 + 3
    _check_kept(name, kw, dict(H=hgt, W=wid))
    from lipfast.losses import generate_edge

    g = torch.Generator().manual_seed(hgt * wid)
    lab = torch.randint(0, 4, (2, hgt // 3 + 1, wid // 3 + 1), generator=g)
    lab = lab.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :hgt, :wid].contiguous()
    lab[torch.rand(lab.shape, generator=g) < 0.1] = 255
    lab[0, 1, 1] = 2
    got = KE.generate_edge(lab.to(DEV), 255, config=kw)
    torch.testing.assert_close(got.cpu(), generate_edge(lab), rtol=0, atol=0)


# ---------------------------------------------------------------- confusion_matrix

def _cm_ref(pred, lab, c):
    keep = lab != 255
    idx = lab[keep].long() * c + pred[keep].long()
    return torch.bincount(idx, minlength=c * c).reshape(c, c)


def _cm_case(name, kw):
    c = max(3, kw["BLOCK_C"] // 2 + 3)
    modes = [1, 2] + ([0] if kw["BLOCK_C"] == 8 else [])
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 6, 7, generator=g, dtype=torch.float64)
    spec = _tuning.SPECS[name]
    cfg = _tuning.merge(spec, spec.configs[0], kw)
    hist = triton.next_power_of_2(c * c)
    modes = [m for m in modes if _tuning.fits(spec, cfg, dict(C=c, MODE=m, HIST=hist), SM90)]
    if not modes:
        pytest.skip(f"{name} {kw}: pruned for sm_90 (resources) in every mode")
    for mode in modes:
        _check_kept(name, kw, dict(C=c, MODE=mode, HIST=hist))
        if mode == 2:
            lab = torch.randint(0, c, (2, 11, 9), generator=g)
            pred = F.interpolate(x, (11, 9), mode="bilinear", align_corners=True).argmax(1)
            inp = x
        else:
            lab = torch.randint(0, c, (2, 6, 7), generator=g)
            pred = x.argmax(1)
            inp = x if mode == 1 else pred.to(torch.uint8)
        lab[0, 0, :3] = 255
        ref = _cm_ref(pred, lab, c)
        prior = torch.randint(0, 5, (c, c))
        out, bad = KC.confusion_matrix(inp.to(DEV, DT) if mode else inp.to(DEV), lab.to(DEV), c,
                                       255, mode == 2, out=prior.clone().to(DEV), programs=3,
                                       config=kw)
        assert torch.equal(out.cpu(), prior + ref), mode
        assert bad.tolist() == [0, 0]


# -------------------------------------------------------------- parse_postprocess

def _pp_ref(x, aff, ins, outs):
    """Upsample (align_corners=True), bilinear warp with zero border, float64."""
    u = F.interpolate(x, ins, mode="bilinear", align_corners=True)
    k, c = x.shape[:2]
    v = torch.zeros(k, c, *outs, dtype=torch.float64)
    ys = torch.arange(outs[0], dtype=torch.float64)[:, None].expand(outs)
    xs = torch.arange(outs[1], dtype=torch.float64)[None, :].expand(outs)
    for i in range(k):
        ax, bx, ay, by = aff[i].tolist()
        qx, qy = ax * xs + bx, ay * ys + by
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = qy.floor().long() + dy, qx.floor().long() + dx
                wy = 1 - (qy - qy.floor()) if dy == 0 else qy - qy.floor()
                wx = 1 - (qx - qx.floor()) if dx == 0 else qx - qx.floor()
                ok = (yy >= 0) & (yy < ins[0]) & (xx >= 0) & (xx < ins[1])
                val = u[i][:, yy.clamp(0, ins[0] - 1), xx.clamp(0, ins[1] - 1)]
                v[i] += torch.where(ok, wy * wx, 0.0) * val
    return v


def _pp_case(name, kw):
    c = kw["BLOCK_C"] + 3  # two channel blocks
    ow = 23
    oh = (kw["BLOCK_P"] + 37 + ow - 1) // ow  # more pixels than one block
    _check_kept(name, kw, dict(C=c, N=oh * ow))
    g = torch.Generator().manual_seed(c + oh)
    x = torch.randn(2, c, 5, 4, generator=g, dtype=torch.float64) * 3
    ins = (9, 7)
    aff = torch.tensor([[7 / ow * 1.2, -1.0, 9 / oh * 0.9, 0.5],
                        [7 / ow * 0.7, 2.0, 9 / oh * 1.3, -1.5]], dtype=torch.float64)
    v = _pp_ref(x, aff, ins, (oh, ow))
    p = torch.softmax(v, 1)
    for maps, fg in ((1, True), (2, False)):
        lab, m, f = KP.parse_postprocess(x.to(DEV, DT), aff.to(DEV), *ins, oh, ow, maps, fg,
                                         config=kw)
        assert torch.equal(lab.cpu().long(), v.argmax(1))
        torch.testing.assert_close(m.double().cpu(), p if maps == 1 else v, **TOL)
        if fg:
            torch.testing.assert_close(f.double().cpu(), 1 - p[:, 0], **TOL)
    last = _tuning.SPECS[name].last
    assert all(last.kwargs[key] == val for key, val in kw.items() if key in last.kwargs)


CASES = {"oc_attention.fwd": _oc_case, "oc_attention.bwd_dv": _oc_case,
         "oc_attention.bwd_dx": _oc_case, "upsample_ce.fwd": _uce_case,
         "upsample_ce.bwd": _uce_case, "lovasz": _lovasz_case, "edge": _edge_case,
         "confusion_matrix": _cm_case, "parse_postprocess": _pp_case}


@pytest.mark.parametrize("name,kw", _params())
def test_every_configuration(name, kw):
    CASES[name](name, kw)


def test_every_kernel_has_a_space_and_a_case():
    assert set(_tuning.SPECS) == set(_tuning.NAMES) == set(CASES)
    for spec in _tuning.SPECS.values():
        assert len(spec.configs) > 1
        assert len({_tuning.describe(c) for c in spec.configs}) == len(spec.configs)


# ------------------------------------------------------------------------ pruning

def test_pruning_drops_configs_over_shared_memory_and_registers():
    spec = _tuning.SPECS["oc_attention.fwd"]
    args = dict(QK=BF16, BLOCK_D=64, DV_P=256)
    huge = triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "DV_SPLIT": 1}, num_warps=8,
                         num_stages=4)
    regs, smem = spec.resources(huge.kwargs, huge.num_warps, huge.num_stages, args)
    assert smem > SM90.smem_per_block
    kept = _tuning.prune(spec, spec.configs + [huge], args, SM90)
    assert huge not in kept and kept
    for c in kept:
        r, s = spec.resources(c.kwargs, c.num_warps, c.num_stages, args)
        assert r <= 255 and s <= SM90.smem_per_block and c.kwargs["DV_SPLIT"] == 1
    # a smaller device keeps fewer; a register-bound config goes too
    small = _tuning.Limits(0, smem_per_block=40000, smem_per_sm=40000)
    args64 = dict(args, DV_P=64)
    kept64 = _tuning.prune(spec, spec.configs, args64, SM90)
    kept_small = _tuning.prune(spec, spec.configs, args64, small)
    assert set(map(str, kept_small)) < set(map(str, kept64))
    assert all(spec.resources(c.kwargs, c.num_warps, c.num_stages, args64)[1] <= 40000
               for c in kept_small)
    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "DV_SPLIT": 1}, num_warps=4,
                         num_stages=1)
    assert spec.resources(wide.kwargs, 4, 1, args)[0] > 255
    assert wide not in _tuning.prune(spec, [wide] + spec.configs, args, SM90)
    # nothing fits: the smallest valid one, never an empty list
    tiny = _tuning.Limits(0, smem_per_block=1, smem_per_sm=1)
    assert len(_tuning.prune(spec, spec.configs, args, tiny)) == 1
    # dv = 512 takes two passes of 256, dv <= 256 one
    two = _tuning.prune(spec, spec.configs, dict(args, DV_P=512), SM90)
    assert two and all(c.kwargs["DV_SPLIT"] == 2 for c in two)


def test_sm80_prunes_at_least_as_much_as_sm90():
    for name, args in (("oc_attention.bwd_dx", dict(QK=BF16, BLOCK_D=64, DK_P=256)),
                       ("oc_attention.bwd_dv", dict(QK=BF16, BLOCK_D=64, DV_P=256))):
        spec = _tuning.SPECS[name]
        k90 = set(map(str, _tuning.prune(spec, spec.configs, args, SM90)))
        k80 = set(map(str, _tuning.prune(spec, spec.configs, args, _tuning.LIMITS[80])))
        assert k80 <= k90


# ----------------------------------------------------- autotuning with a fake clock

def _fake_bench(calls):
    def bench(fn, quantiles=None):
        fn()
        fn()
        calls.append(1)
        return [float(len(calls) % 3 + 1)] * 3
    return bench


@pytest.fixture
def fake_autotune(monkeypatch):
    """Real triton.autotune trials (each trial runs the kernel twice) with a fake
    timer, through the interpreter on CPU."""
    if DEV == "cuda":
        pytest.skip("the fake benchmark is for the interpreter")
    calls = []
    monkeypatch.setattr(_tuning, "interpreting", lambda: False)
    for spec in _tuning.SPECS.values():
        monkeypatch.setattr(spec.tuner, "_do_bench", _fake_bench(calls))
        monkeypatch.setitem(spec.tuner.__dict__, "do_bench", _fake_bench(calls))
        monkeypatch.setattr(spec.tuner, "cache", {})
    return calls


def test_autotuning_restores_the_confusion_matrix_between_trials(fake_autotune):
    c = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 6, 7, generator=g, dtype=torch.float64)
    lab = torch.randint(0, c, (2, 6, 7), generator=g)
    prior = torch.randint(0, 9, (c, c))
    out, _ = KC.confusion_matrix(x, lab, c, 255, False, out=prior.clone(), programs=2)
    assert len(fake_autotune) > 1  # several configurations were tried, each run twice
    assert torch.equal(out, prior + _cm_ref(x.argmax(1), lab, c))
    spec = _tuning.SPECS["confusion_matrix"]
    assert spec.tuner.restore_value == ["CM"] and spec.last in spec.configs


def test_autotuning_oc_attention(fake_autotune):
    g = torch.Generator().manual_seed(4)
    qk = torch.randn(1, 8, 5, 6, generator=g, dtype=torch.float64)
    v = torch.randn(1, 6, 5, 6, generator=g, dtype=torch.float64)
    out, lse = KO.forward(qk, v, 0.3, 0)
    torch.testing.assert_close(out, _oc_ref(qk, v, 0.3, 0), **TOL)
    assert len(fake_autotune) > 1
    tuner = _tuning.SPECS["oc_attention.fwd"].tuner
    (key,) = tuner.cache
    assert key[:4] == (32, 16, 16, 1)  # N, dk, dv, region-count buckets (then PREC, dtypes)


# ------------------------------------------------------------------------ pinning

def _edge_labels():
    return torch.randint(0, 3, (1, 20, 40), generator=torch.Generator().manual_seed(1))


def test_pin_config_and_environment(monkeypatch):
    spec = _tuning.SPECS["edge"]
    lab = _edge_labels().to(DEV)
    ref = KE.generate_edge(lab)
    default = _tuning.prune(spec, spec.configs, dict(H=20, W=40))[0]
    assert spec.last == default
    monkeypatch.setenv("LIPFAST_TRITON_CONFIG", "edge:BLOCK_H=4, num_warps=2;lovasz:BLOCK=64")
    assert torch.equal(KE.generate_edge(lab), ref)
    assert spec.last.kwargs == dict(default.kwargs, BLOCK_H=4) and spec.last.num_warps == 2
    pin_config("edge", BLOCK_H=8, BLOCK_W=32)  # the function wins over the variable
    assert torch.equal(KE.generate_edge(lab), ref)
    assert spec.last.kwargs == {"BLOCK_H": 8, "BLOCK_W": 32}
    assert spec.last.num_warps == default.num_warps
    unpin_config("edge")
    KE.generate_edge(lab)
    assert spec.last.kwargs["BLOCK_H"] == 4
    pin_config("edge", BLOCK_Q=3)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        KE.generate_edge(lab)
    unpin_config()
    with pytest.raises(ValueError, match="unknown kernel"):
        pin_config("nope", BLOCK=1)
    with pytest.raises(TypeError):
        pin_config("edge", BLOCK_H=8.0)
    monkeypatch.setenv("LIPFAST_TRITON_CONFIG", "edge:BLOCK_H")
    with pytest.raises(ValueError, match="LIPFAST_TRITON_CONFIG"):
        KE.generate_edge(lab)
    monkeypatch.setenv("LIPFAST_TRITON_CONFIG", "edgy:BLOCK_H=4")
    with pytest.raises(ValueError, match="LIPFAST_TRITON_CONFIG"):
        KE.generate_edge(lab)


def test_autotune_switch(monkeypatch):
    spec = _tuning.SPECS["lovasz"]
    args = dict(n=5000)
    monkeypatch.setattr(_tuning, "interpreting", lambda: False)
    monkeypatch.setenv("LIPFAST_TRITON_AUTOTUNE", "1")
    assert _tuning.choose(spec, args) is None  # autotune
    monkeypatch.setenv("LIPFAST_TRITON_AUTOTUNE", "0")
    assert _tuning.choose(spec, args) == spec.configs[0]  # the default, no trials
    monkeypatch.setenv("LIPFAST_TRITON_AUTOTUNE", "1")
    pin_config("lovasz", BLOCK=512)
    assert _tuning.choose(spec, args).kwargs == {"BLOCK": 512}
    monkeypatch.setattr(_tuning, "interpreting", lambda: True)
    unpin_config()
    assert _tuning.choose(spec, dict(n=100)).kwargs == {"BLOCK": 128}  # interpreter: default


# -------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("dk,dv,fwd,bwd", [(64, 64, 1.0, 1.2), (256, 256, 1.0, 1.2),
                                           (256, 512, 4 / 3, 4 / 3)])
def test_executed_vs_needed_flops(dk, dv, fwd, bwd):
    n = 64 * 64  # a multiple of every tile: no padding
    for backward, ratio in ((False, fwd), (True, bwd)):
        need = KO.needed_flops(2, n, dk, dv, backward=backward)
        assert need == 2 * 2 * n * n * (dk + dv) * (2.5 if backward else 1)
        got = KO.executed_flops(2, n, dk, dv, backward=backward)
        assert got / need == pytest.approx(ratio)


def test_flops_of_pyramid_regions_and_padding():
    need = KO.needed_flops(1, (30, 30), 64, 64, regions=3)
    assert need == 2 * 9 * 100 ** 2 * 128
    assert KO.needed_flops(1, 900, 64, 64, regions=3) == need  # square map from n
    assert KO.needed_flops(1, 900, 64, 64, regions=[100] * 9) == need
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64}
    got = KO.executed_flops(1, (30, 30), 64, 64, regions=3, config=cfg)
    assert got == 9 * 2 * 128 * 128 * (64 + 64)  # 100 positions padded to 128 per region
    # one region, 100 value channels in one 128-wide pass
    assert KO.executed_flops(1, 4096, 64, 100) == 2 * 4096 ** 2 * (64 + 128)
