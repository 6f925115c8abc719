"""SCHP / CE2P / OCNet criteria against eager references written from SPEC
section 3 (F.interpolate + F.cross_entropy + a per-class Lovász loop), float64
values and gradients on small random inputs."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from lipfast.losses import CE2PCriterion, OCNetCriterion, SCHPCriterion, generate_edge
from lipfast.losses.criteria import soft_kl

IGN = 255


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def lovasz_ref(probs, labels):
    """Lovász-Softmax, classes='present', per_image=False (SPEC)."""
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    y = labels.reshape(-1)
    keep = y != IGN
    p, y = p[keep], y[keep]
    losses = []
    for k in range(c):
        fg = (y == k).to(p.dtype)
        if fg.sum() == 0:
            continue
        e = (fg - p[:, k]).abs()
        e_sorted, perm = torch.sort(e, descending=True)
        g = fg[perm]
        G = g.sum()
        inter = G - g.cumsum(0)
        union = G + (1 - g).cumsum(0)
        jac = 1 - inter / union
        jac = torch.cat([jac[:1], jac[1:] - jac[:-1]])
        losses.append(torch.dot(e_sorted, jac))
    if not losses:
        return probs.sum() * 0
    return torch.stack(losses).mean()


def ce_ref(z, labels, weight=None):
    return F.cross_entropy(z, labels, weight=weight, ignore_index=IGN)


def edge_ref(e, edges):
    pos = (edges == 1).sum().item()
    neg = (edges == 0).sum().item()
    w = torch.tensor([pos / (pos + neg), neg / (pos + neg)], dtype=e.dtype)
    return ce_ref(e, edges, w)


def kl_ref(u, t, labels):
    keep = (labels != IGN).reshape(-1)
    c = u.shape[1]
    lu = F.log_softmax(u, 1).permute(0, 2, 3, 1).reshape(-1, c)[keep]
    pt = F.softmax(t, 1).permute(0, 2, 3, 1).reshape(-1, c)[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'mean' vs 'batchmean' notice
        return F.kl_div(lu, pt)  # default 'mean' over all elements


def onehot_ref(labels, c):
    lab = labels.clone()
    lab[lab == IGN] = 0
    return F.one_hot(lab, c).permute(0, 3, 1, 2).double()


def schp_ref(preds, labels, edges, soft=None, soft_e=None, cycle=None, l1=1, l2=1, l3=0.1, nc=20):
    size = labels.shape[-2:]
    loss = 0
    for p in preds[0]:
        u = up(p, size)
        loss = loss + 0.5 * l1 * lovasz_ref(F.softmax(u, 1), labels)
        if soft is None:
            loss = loss + 0.5 * l1 * ce_ref(u, labels)
        else:
            a = 1 / (cycle + 1)
            t = (1 - a) * up(soft, size) + a * onehot_ref(labels, nc)
            loss = loss + 0.5 * l1 * kl_ref(u, t, labels)
    for e in preds[1]:
        ue = up(e, size)
        if soft_e is None:
            loss = loss + l2 * edge_ref(ue, edges)
        else:
            a = 1 / (cycle + 1)
            t = (1 - a) * up(soft_e, size) + a * onehot_ref(edges, 2)
            loss = loss + l2 * kl_ref(ue, t, labels)
    return loss + l3 * 0.0


def make(b=2, c=5, h=6, w=7, H=21, W=23, seed=0, p_ignore=0.1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, c, (b, 1, 5, 5), generator=g).float()
    labels = F.interpolate(coarse, size=(H, W), mode="nearest").squeeze(1).long()
    labels[torch.rand(b, H, W, generator=g) < p_ignore] = IGN
    par = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2
    fus = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2
    edg = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    soft = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    soft_e = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    return labels, generate_edge(labels), par, fus, edg, soft, soft_e


def grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def check(fn_got, fn_ref, leaves, tol=dict(rtol=1e-7, atol=1e-9)):
    v1, g1 = grads(fn_got, leaves)
    v2, g2 = grads(fn_ref, leaves)
    torch.testing.assert_close(v1, v2, **tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)
    return v1


@pytest.mark.parametrize("seed", [0, 1])
def test_schp_cycle0(seed):
    labels, edges, par, fus, edg, _, _ = make(c=20, seed=seed)
    crit = SCHPCriterion(num_classes=20)
    v = check(lambda a, b, e: crit([[a, b], [e]], [labels, edges]),
              lambda a, b, e: schp_ref([[a, b], [e]], labels, edges),
              [par, fus, edg])
    assert torch.isfinite(v)
    # SCHP's train.py passes [labels, edges, None, None] in cycle 0, and uint8 labels work
    v2 = crit([[par, fus], [edg]], [labels.to(torch.uint8), edges, None, None], cycle_n=0)
    torch.testing.assert_close(v2, v)


def test_schp_lambdas():
    labels, edges, par, fus, edg, _, _ = make(c=5, seed=3)
    crit = SCHPCriterion(lambda_1=0.7, lambda_2=2.0, lambda_3=0.1, num_classes=5)
    check(lambda a, b, e: crit([[a, b], [e]], [labels, edges]),
          lambda a, b, e: schp_ref([[a, b], [e]], labels, edges, l1=0.7, l2=2.0),
          [par, fus, edg])


@pytest.mark.parametrize("cycle", [1, 3])
def test_schp_soft_targets(cycle):
    labels, edges, par, fus, edg, soft, soft_e = make(c=6, seed=cycle)
    crit = SCHPCriterion(num_classes=6)
    check(lambda a, b, e, s, se: crit([[a, b], [e]], [labels, edges, s, se], cycle_n=cycle),
          lambda a, b, e, s, se: schp_ref([[a, b], [e]], labels, edges, s, se, cycle, nc=6),
          [par, fus, edg, soft, soft_e])
    labels_before = labels.clone()
    crit([[par, fus], [edg]], [labels, edges, soft, soft_e], cycle_n=cycle)
    assert torch.equal(labels, labels_before)  # SCHP's to_one_hot mutates; lipfast does not
    with pytest.raises(ValueError):
        crit([[par, fus], [edg]], [labels, edges, soft, soft_e])


def test_soft_kl_all_ignored_is_zero():
    u = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    lab = torch.full((1, 4, 4), IGN)
    assert soft_kl(u, u.flip(1), lab).item() == 0.0


@pytest.fixture(params=["fused", "eager"])
def ce_path(request, monkeypatch):
    """Runs a test with lipfast's fused upsample_cross_entropy and with the
    F.interpolate + F.cross_entropy fallback used when it is absent."""
    if request.param == "eager":
        import lipfast.losses.edge as edge_mod

        monkeypatch.setattr(edge_mod, "_upsample_ce", lambda: None)
    return request.param


def test_ce2p(ce_path):
    labels, edges, par, fus, edg, _, _ = make(c=20, seed=5)
    crit = CE2PCriterion()
    size = labels.shape[-2:]
    check(lambda a, b, e: crit([[a, b], [e]], [labels, edges]),
          lambda a, b, e: ce_ref(up(a, size), labels) + ce_ref(up(b, size), labels)
          + edge_ref(up(e, size), edges),
          [par, fus, edg])


@pytest.mark.parametrize("weighted", [False, True])
def test_ocnet(weighted, ce_path):
    labels, _, main, dsn, _, _, _ = make(c=5, seed=6)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8], dtype=torch.float64) if weighted else None
    crit = OCNetCriterion(weight=w)
    size = labels.shape[-2:]
    check(lambda a, b: crit([a, b], labels),
          lambda a, b: ce_ref(up(a, size), labels, w) + 0.4 * ce_ref(up(b, size), labels, w),
          [main, dsn])


def test_all_ignored(ce_path):
    labels, _, par, fus, edg, _, _ = make(c=5, seed=7)
    labels = torch.full_like(labels, IGN)
    edges = generate_edge(labels)  # all 0
    for crit, preds, target in [
        (SCHPCriterion(num_classes=5), [[par, fus], [edg]], [labels, edges]),
        (CE2PCriterion(), [[par, fus], [edg]], [labels, edges]),
        (OCNetCriterion(), [par, fus], labels),
    ]:
        leaves = [t.detach().clone().requires_grad_() for t in (par, fus, edg)]
        if isinstance(crit, OCNetCriterion):
            preds = leaves[:2]
        else:
            preds = [leaves[:2], [leaves[2]]]
        loss = crit(preds, target)
        assert loss.item() == 0.0  # upstream: NaN (0 / 0); lipfast: 0, graph kept
        loss.backward()
        for t in leaves[: len(preds) if isinstance(crit, OCNetCriterion) else 3]:
            assert t.grad is not None and torch.count_nonzero(t.grad) == 0


# ---------------------------------------------------------------------------- CUDA
# Each criterion on CUDA in float32 against the float64 eager reference above
# (CPU) and against lipfast's own CPU float32 result. Tolerances: loss 1e-5
# relative; gradients 1e-4 of each gradient's largest entry (float32 errors can
# reorder near-tied Lovász errors). Under torch.autocast("cuda", bfloat16) the
# loss must be float32, finite and within 2e-2 (relative) of the float32 loss,
# gradients within 5e-2 of the largest entry (bf16 logits: 8-bit mantissa).


def _cuda_grads(fn, leaves, device, dtype=torch.float32, cast=None):
    """(loss, grads) of fn on copies of the leaves moved to device/dtype; ``cast``
    converts the leaves inside the function (e.g. to bfloat16 under autocast)."""
    ls = [t.detach().to(device, dtype).requires_grad_() for t in leaves]
    args = [t.to(cast) for t in ls] if cast is not None else ls
    out = fn(*args)
    return out, torch.autograd.grad(out, ls)


def _cuda_check(fn_cuda, fn_cpu, fn_ref, leaves, rtol_loss=1e-5, gtol=1e-4):
    lg, gg = _cuda_grads(fn_cuda, leaves, "cuda")
    lc, gc = _cuda_grads(fn_cpu, leaves, "cpu")
    lr, gr = _cuda_grads(fn_ref, leaves, "cpu", torch.float64)
    assert lg.device.type == "cuda" and lg.dtype == torch.float32 and lg.shape == ()
    for other in (lc, lr):
        torch.testing.assert_close(lg.detach().cpu().double(), other.detach().double(),
                                   rtol=rtol_loss, atol=1e-7)
    for a, c, r in zip(gg, gc, gr):
        s = max(float(r.abs().max()), 1e-30)
        for other in (c, r):
            torch.testing.assert_close(a.cpu().double() / s, other.double() / s, atol=gtol,
                                       rtol=0)
    return lg


def _cuda_make(c=20, seed=0, ldt=torch.int64):
    labels, edges, par, fus, edg, soft, soft_e = make(b=2, c=c, h=31, w=29, H=121, W=117,
                                                      seed=seed)
    return labels.to(ldt), edges, par, fus, edg, soft, soft_e


@pytest.mark.cuda
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
def test_cuda_schp_cycle0(ldt):
    labels, edges, par, fus, edg, _, _ = _cuda_make(seed=1, ldt=ldt)
    crit = SCHPCriterion(num_classes=20)
    lab_g, edg_g = labels.cuda(), edges.cuda()
    _cuda_check(lambda a, b, e: crit([[a, b], [e]], [lab_g, edg_g]),
                lambda a, b, e: crit([[a, b], [e]], [labels, edges]),
                lambda a, b, e: schp_ref([[a, b], [e]], labels.long(), edges),
                [par, fus, edg])
    # edge labels made on the device, as lipfast.train does
    assert torch.equal(generate_edge(lab_g).cpu(), edges)


@pytest.mark.cuda
def test_cuda_schp_soft_targets():
    cycle = 2
    labels, edges, par, fus, edg, soft, soft_e = _cuda_make(c=6, seed=2)
    crit = SCHPCriterion(num_classes=6)
    lab_g, edg_g = labels.cuda(), edges.cuda()
    before = lab_g.clone()
    _cuda_check(lambda a, b, e, s, se: crit([[a, b], [e]], [lab_g, edg_g, s, se], cycle_n=cycle),
                lambda a, b, e, s, se: crit([[a, b], [e]], [labels, edges, s, se], cycle_n=cycle),
                lambda a, b, e, s, se: schp_ref([[a, b], [e]], labels, edges, s, se, cycle, nc=6),
                [par, fus, edg, soft, soft_e])
    assert torch.equal(lab_g, before)


@pytest.mark.cuda
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
def test_cuda_ce2p(ldt):
    labels, edges, par, fus, edg, _, _ = _cuda_make(seed=5, ldt=ldt)
    crit = CE2PCriterion()
    size = labels.shape[-2:]
    lab_g, edg_g = labels.cuda(), edges.cuda()
    lab64 = labels.long()
    _cuda_check(lambda a, b, e: crit([[a, b], [e]], [lab_g, edg_g]),
                lambda a, b, e: crit([[a, b], [e]], [labels, edges]),
                lambda a, b, e: ce_ref(up(a, size), lab64) + ce_ref(up(b, size), lab64)
                + edge_ref(up(e, size), edges),
                [par, fus, edg])


@pytest.mark.cuda
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_ocnet(weighted):
    labels, _, main, dsn, _, _, _ = _cuda_make(c=5, seed=6)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8], dtype=torch.float64) if weighted else None
    crit_g = OCNetCriterion(weight=w).cuda()
    crit_c = OCNetCriterion(weight=w)
    size = labels.shape[-2:]
    lab_g = labels.cuda()
    _cuda_check(lambda a, b: crit_g([a, b], lab_g),
                lambda a, b: crit_c([a, b], labels),
                lambda a, b: ce_ref(up(a, size), labels, w) + 0.4 * ce_ref(up(b, size), labels, w),
                [main, dsn])


def _cuda_autocast_check(fn, leaves):
    """fn under bf16 autocast, with float32 leaves passed as they are (lipfast.train
    casts the model outputs to float32) and cast to bfloat16 (raw AMP outputs)."""
    l32, g32 = _cuda_grads(fn, leaves, "cuda")
    for cast in (None, torch.bfloat16):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            la, ga = _cuda_grads(fn, leaves, "cuda", cast=cast)
        assert la.dtype == torch.float32 and torch.isfinite(la)
        torch.testing.assert_close(la.detach(), l32.detach(), rtol=2e-2, atol=1e-4)
        for a, r in zip(ga, g32):
            assert a.dtype == torch.float32 and torch.isfinite(a).all()
            s = max(float(r.abs().max()), 1e-30)
            torch.testing.assert_close(a / s, r / s, atol=5e-2, rtol=0)


@pytest.mark.cuda
def test_cuda_criteria_under_bf16_autocast():
    labels, edges, par, fus, edg, soft, soft_e = _cuda_make(c=20, seed=3)
    lab_g, edg_g = labels.cuda(), edges.cuda()
    schp = SCHPCriterion(num_classes=20)
    _cuda_autocast_check(lambda a, b, e: schp([[a, b], [e]], [lab_g, edg_g]), [par, fus, edg])
    soft_g, soft_eg = soft.float().cuda(), soft_e.float().cuda()
    _cuda_autocast_check(
        lambda a, b, e: schp([[a, b], [e]], [lab_g, edg_g, soft_g, soft_eg], cycle_n=1),
        [par, fus, edg])
    ce2p = CE2PCriterion()
    _cuda_autocast_check(lambda a, b, e: ce2p([[a, b], [e]], [lab_g, edg_g]), [par, fus, edg])
    ocnet = OCNetCriterion(weight=torch.rand(20) + 0.5).cuda()
    _cuda_autocast_check(lambda a, b: ocnet([a, b], lab_g), [par, fus])


@pytest.mark.cuda
def test_cuda_all_ignored():
    labels, _, par, fus, edg, _, _ = _cuda_make(c=5, seed=7)
    labels = torch.full_like(labels, IGN).cuda()
    edges = generate_edge(labels)
    for crit, n, target in [(SCHPCriterion(num_classes=5), 3, [labels, edges]),
                            (CE2PCriterion(), 3, [labels, edges]),
                            (OCNetCriterion(), 2, labels)]:
        leaves = [t.detach().float().cuda().requires_grad_() for t in (par, fus, edg)[:n]]
        preds = leaves if n == 2 else [leaves[:2], [leaves[2]]]
        loss = crit(preds, target)
        assert loss.item() == 0.0
        loss.backward()
        for t in leaves:
            assert t.grad is not None and torch.count_nonzero(t.grad).item() == 0
