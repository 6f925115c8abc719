"""lipfast.metrics: the confusion-matrix op against numpy bincount and
F.interpolate + argmax (random data, odd sizes, ties, NaN, uint8/int64 labels,
strided logits, out accumulation, bad input), its registration (opcheck,
torch.compile), the Triton kernel called directly (on CPU tensors under
TRITON_INTERPRET=1, which conftest.py switches on without a GPU),
ParsingMetrics against the SPEC formulas written out in numpy, state round trip,
and the TTA helpers against hand-written references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipfast import metrics as M
from lipfast.metrics import tta
from cuda_checks import assert_device_assert, twice_without_sync

IGN = 255


def np_cm(pred, lab, c, ignore=IGN):
    """The reference's counting: drop gt == ignore, bincount of gt * C + pred."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    lab = np.asarray(lab).reshape(-1).astype(np.int64)
    keep = lab != ignore
    return torch.from_numpy(np.bincount(lab[keep] * c + pred[keep], minlength=c * c)
                            .reshape(c, c).astype(np.int64))


def make(b=2, c=5, h=7, w=9, ignore_frac=0.2, seed=0, dtype=torch.float64, ldt=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < ignore_frac] = IGN
    return x, y.to(ldt)


# ------------------------------------------------------------------ the op, CPU


@pytest.mark.parametrize("c", [2, 20])
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 7, 9), (1, 1, 1), (3, 13, 1), (2, 33, 17)])
def test_logits_match_bincount(c, ldt, dtype, shape):
    b, h, w = shape
    x, y = make(b, c, h, w, dtype=dtype, ldt=ldt, seed=c + h)
    cm = M.confusion_matrix(x, y, c)
    assert cm.dtype == torch.int64 and cm.shape == (c, c)
    assert torch.equal(cm, np_cm(x.argmax(1), y, c))
    # from integer predictions, uint8 and int64
    for pdt in (torch.uint8, torch.int64, torch.int32):
        assert torch.equal(M.confusion_matrix(x.argmax(1).to(pdt), y, c), np_cm(x.argmax(1), y, c))


def test_all_ignored_and_empty():
    x, y = make(2, 4, 5, 6)
    y[:] = IGN
    assert torch.equal(M.confusion_matrix(x, y, 4), torch.zeros(4, 4, dtype=torch.int64))
    e = M.confusion_matrix(torch.zeros(0, 4, 5, 6), torch.zeros(0, 5, 6, dtype=torch.long), 4)
    assert torch.equal(e, torch.zeros(4, 4, dtype=torch.int64))
    m = M.ParsingMetrics(4, class_names=None)
    m.update(x, y)
    r = m.compute()
    assert math.isnan(r["pixel_acc"]) and r["miou"] == 0 and r["mean_acc"] == 0


def test_other_ignore_index_and_ignore_inside_range():
    x, y = make(2, 5, 6, 7, ignore_frac=0.0)
    y[0, 0] = -1
    assert torch.equal(M.confusion_matrix(x, y, 5, ignore_index=-1), np_cm(x.argmax(1), y, 5, -1))
    # ignore_index inside [0, C): those pixels are skipped
    assert torch.equal(M.confusion_matrix(x, y.clamp(min=0), 5, ignore_index=2),
                       np_cm(x.argmax(1), y.clamp(min=0), 5, 2))


def test_ties_pick_first_maximum():
    x = torch.zeros(2, 6, 5, 7)
    x[:, 2] = 1.0
    x[:, 4] = 1.0  # tie between 2 and 4: 2
    x[0, :, 0, 0] = 0.0  # all equal: 0
    x[1, :, 1, 1] = float("-inf")  # all -inf: 0
    y = torch.randint(0, 6, (2, 5, 7))
    ref = np_cm(x.argmax(1), y, 6)
    assert torch.equal(M.confusion_matrix(x, y, 6), ref)
    assert torch.equal(M.confusion_matrix(x.contiguous(memory_format=torch.channels_last), y, 6),
                       ref)


def test_nan_like_torch_argmax():
    """A NaN logit wins (the first NaN channel), as torch.argmax decides."""
    x, y = make(2, 5, 6, 7, ignore_frac=0.0, dtype=torch.float32)
    x[0, 3, 0, :] = float("nan")
    x[0, 1, 0, :3] = float("nan")  # first NaN is channel 1 there
    x[1, :, 2, 2] = float("nan")  # all NaN: channel 0
    x[1, 4, 3, 3] = float("nan")
    x[1, 0, 3, 3] = float("inf")
    pred = x.argmax(1)
    assert pred[0, 0, 0] == 1 and pred[0, 0, 5] == 3 and pred[1, 3, 3] == 4  # torch's rule
    for xx in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous()
               .transpose(2, 3)):
        assert torch.equal(M.confusion_matrix(xx, y, 5), np_cm(pred, y, 5))
    # NaN through the fused resize: the NaN spreads over its bilinear footprint
    lab = torch.randint(0, 5, (2, 17, 19))
    up = F.interpolate(x, (17, 19), mode="bilinear", align_corners=True)
    assert torch.equal(M.confusion_matrix(x, lab, 5, resize=True), np_cm(up.argmax(1), lab, 5))


RESIZE_SHAPES = [(2, 5, 7, 5, 25, 19), (2, 20, 4, 6, 13, 17), (1, 3, 1, 3, 5, 9),
                 (2, 4, 9, 8, 5, 6), (1, 3, 1, 1, 4, 3)]


@pytest.mark.parametrize("shape", RESIZE_SHAPES)
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
def test_fused_resize_matches_interpolate_argmax(shape, ldt):
    b, c, h, w, hh, ww = shape
    x, _ = make(b, c, h, w, seed=hh)
    _, y = make(b, c, hh, ww, seed=ww, ldt=ldt)
    up = F.interpolate(x, (hh, ww), mode="bilinear", align_corners=True)
    ref = np_cm(up.argmax(1), y, c)
    assert torch.equal(M.confusion_matrix(x, y, c, resize=True), ref)
    # strided logits: channels_last, and a sliced (non-contiguous) view
    assert torch.equal(M.confusion_matrix(x.contiguous(memory_format=torch.channels_last), y, c,
                                          resize=True), ref)
    big = torch.randn(b, c + 2, h + 1, 2 * w, dtype=x.dtype)
    big[:, 1:c + 1, :h, ::2] = x
    view = big[:, 1:c + 1, :h, ::2]
    assert not view.is_contiguous()
    assert torch.equal(M.confusion_matrix(view, y, c, resize=True), ref)
    # same size: resize is a no-op
    assert torch.equal(M.confusion_matrix(up, y, c, resize=True), ref)


def test_fused_resize_float32_close_to_interpolate():
    """float32: same taps and order as ATen; differences can only come from FMA
    contraction at near-ties, so at most a handful of pixels may move."""
    x, _ = make(4, 20, 30, 30, dtype=torch.float32, seed=3)
    _, y = make(4, 20, 119, 119, seed=4)
    up = F.interpolate(x, (119, 119), mode="bilinear", align_corners=True)
    ref = np_cm(up.argmax(1), y, 20)
    got = M.confusion_matrix(x, y, 20, resize=True)
    assert got.sum() == ref.sum()
    assert (got - ref).abs().sum() <= 8


def test_half_logits():
    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        assert torch.equal(M.confusion_matrix(xh, y, 5), np_cm(xh.float().argmax(1), y, 5))


def test_classes_never_present_or_predicted():
    c = 6
    x = torch.randn(2, c, 8, 9)
    x[:, 5] = -100.0  # class 5 never predicted
    y = torch.randint(0, 4, (2, 8, 9))  # classes 4, 5 never present
    cm = M.confusion_matrix(x, y, c)
    assert torch.equal(cm, np_cm(x.argmax(1), y, c))
    assert cm[:, 5].sum() == 0 and cm[4:].sum() == 0


def test_out_accumulates_in_place_and_inputs_untouched():
    x, y = make(2, 5, 6, 7)
    x2, y2 = make(3, 5, 6, 7, seed=9)
    xc, yc = x.clone(), y.clone()
    out = torch.full((5, 5), 3, dtype=torch.int64)
    ptr = out.data_ptr()
    r = M.confusion_matrix(x, y, 5, out=out)
    r = M.confusion_matrix(x2.argmax(1), y2, 5, out=r)
    assert r is out and out.data_ptr() == ptr
    assert torch.equal(out, 3 + np_cm(x.argmax(1), y, 5) + np_cm(x2.argmax(1), y2, 5))
    assert torch.equal(x, xc) and torch.equal(y, yc)
    # non-contiguous out
    big = torch.zeros(5, 10, dtype=torch.int64)
    M.confusion_matrix(x, y, 5, out=big[:, ::2])
    assert torch.equal(big[:, ::2], np_cm(x.argmax(1), y, 5)) and big[:, 1::2].sum() == 0


def test_thread_count_independent():
    x, y = make(3, 7, 41, 43, seed=5)
    ref = np_cm(x.argmax(1), y, 7)
    n = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(M.confusion_matrix(x, y, 7), ref)
            assert torch.equal(M.confusion_matrix(x[:, :, :20], y, 7, resize=True),
                               np_cm(F.interpolate(x[:, :, :20], (41, 43), mode="bilinear",
                                                   align_corners=True).argmax(1), y, 7))
    finally:
        torch.set_num_threads(n)


def test_bad_inputs():
    x, y = make(2, 5, 6, 7)
    cases = [
        (lambda: M.confusion_matrix(x, y, 4), ValueError, "channels but num_classes=4"),
        (lambda: M.confusion_matrix(x, y, 0), ValueError, "num_classes"),
        (lambda: M.confusion_matrix(x, y.float(), 5), TypeError, "labels must be an integer"),
        (lambda: M.confusion_matrix(x, y[0], 5), ValueError, "labels must be B x H x W"),
        (lambda: M.confusion_matrix(x[0], y, 5), ValueError, "logits must be B x C x h x w"),
        (lambda: M.confusion_matrix(x[:1], y, 5), ValueError, "batch mismatch"),
        (lambda: M.confusion_matrix(x[:, :, :3], y, 5), ValueError, "resize=True"),
        (lambda: M.confusion_matrix(x.argmax(1)[:, :3], y, 5), ValueError, "differ in shape"),
        (lambda: M.confusion_matrix(x > 0, y, 5), TypeError, "floating-point logits or integer"),
        (lambda: M.confusion_matrix(x, y, 5, out=torch.zeros(5, 5)), TypeError, "int64"),
        (lambda: M.confusion_matrix(x, y, 5, out=torch.zeros(4, 5, dtype=torch.long)),
         ValueError, "5 x 5"),
        (lambda: M.confusion_matrix(x, y, 5, resize=1), TypeError, "resize"),
        (lambda: M.confusion_matrix([1], y, 5), TypeError, "tensors"),
        (lambda: M.confusion_matrix(torch.zeros(2, 5, 0, 3), y, 5, resize=True), ValueError,
         "empty logits"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
def test_bad_values_raise_and_leave_out_unchanged(ldt):
    x, y = make(2, 5, 6, 7, ldt=ldt)
    out = torch.ones(5, 5, dtype=torch.int64)
    bad = y.clone()
    bad[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"label 7 outside \[0, 5\) and not ignore_index=255"):
        M.confusion_matrix(x, bad, 5, out=out)
    with pytest.raises(ValueError, match="label 7 outside"):
        M.confusion_matrix(x[:, :, :3], bad, 5, resize=True)
    assert torch.equal(out, torch.ones(5, 5, dtype=torch.int64))
    pred = x.argmax(1)
    y2 = y.clone()
    y2[0, 0, 0] = 1
    pred[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"prediction 5 outside \[0, 5\)"):
        M.confusion_matrix(pred, y2, 5, out=out)
    pred[0, 0, 0] = -3
    with pytest.raises(ValueError, match=r"prediction -3 outside"):
        M.confusion_matrix(pred, y2, 5, out=out)
    assert torch.equal(out, torch.ones(5, 5, dtype=torch.int64))
    if ldt == torch.int64:
        neg = y.clone()
        neg[0, 1, 1] = -2
        with pytest.raises(ValueError, match="label -2 outside"):
            M.confusion_matrix(x, neg, 5)
    # an out-of-range prediction at an ignored pixel is not counted and not an error
    y3 = y.clone()
    y3[0, 0, 0] = IGN
    pred[0, 0, 0] = 9
    assert torch.equal(M.confusion_matrix(pred, y3, 5), np_cm(pred.clamp(0, 4), y3, 5))


def test_torch_path_matches():
    """The CUDA fallback path (float64 / no Triton), run on CPU tensors."""
    from lipfast.ops.confusion_matrix import torch_confusion_matrix

    x, y = make(2, 5, 6, 7)
    cm, bad = torch_confusion_matrix(x, y, 5, IGN, False)
    assert torch.equal(cm, np_cm(x.argmax(1), y, 5)) and not bad
    lab = torch.randint(0, 5, (2, 11, 13))
    cm, bad = torch_confusion_matrix(x, lab, 5, IGN, True)
    assert torch.equal(cm, M.confusion_matrix(x, lab, 5, resize=True)) and not bad
    lab[0, 0, 0] = 9
    _, bad = torch_confusion_matrix(x, lab, 5, IGN, True)
    assert bad


# ------------------------------------------------------------------ registration


def test_opcheck():
    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    lab = torch.randint(0, 5, (2, 11, 9), dtype=torch.uint8)
    for args in ((x, y, 5, IGN, False), (x, lab, 5, IGN, True), (x.argmax(1), y, 5, IGN, False)):
        torch.library.opcheck(torch.ops.lipfast.confusion_matrix.default, args)
        torch.library.opcheck(torch.ops.lipfast.confusion_matrix_accumulate.default,
                              args + (torch.zeros(5, 5, dtype=torch.int64),))


def test_torch_compile():
    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    lab = torch.randint(0, 5, (2, 11, 9))

    def f(logits, labels, out):
        M.confusion_matrix(logits * 2, labels, 5, out=out, resize=True)
        return M.confusion_matrix(logits, labels, 5, resize=True) + 1

    out_c = torch.zeros(5, 5, dtype=torch.int64)
    out_e = torch.zeros(5, 5, dtype=torch.int64)
    r = torch.compile(f, backend="aot_eager", fullgraph=True)(x, lab, out_c)
    e = f(x, lab, out_e)
    assert torch.equal(r, e) and torch.equal(out_c, out_e)
    assert torch.equal(out_c, np_cm(F.interpolate(x, (11, 9), mode="bilinear",
                                                  align_corners=True).argmax(1), lab, 5))


# ------------------------------------------------------------------ Triton kernel


@pytest.mark.parametrize("mode", ["pred", "logits", "resize"])
@pytest.mark.parametrize("hist", [None, 0])
def test_triton_kernel(mode, hist):
    K = pytest.importorskip("lipfast.kernels.confusion_matrix")
    c = 5
    x, y = make(2, c, 7, 9, seed=1)
    x[0, 2, 1, 1] = float("nan")
    x[1, :, 2, 2] = 0.0  # tie
    lab = y
    if mode == "resize":
        _, lab = make(2, c, 13, 11, seed=2, ldt=torch.uint8)
        up = F.interpolate(x, (13, 11), mode="bilinear", align_corners=True)
        ref = np_cm(up.argmax(1), lab, c)
        inp = x.contiguous(memory_format=torch.channels_last)
    elif mode == "logits":
        ref = np_cm(x.argmax(1), lab, c)
        inp = x[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)
    else:
        inp = x.argmax(1).to(torch.uint8)
        ref = np_cm(inp, lab, c)
    out, bad = K.confusion_matrix(inp, lab, c, IGN, mode == "resize", block_p=16, block_c=2,
                                  hist=hist, programs=3)
    assert torch.equal(out, ref) and bad.tolist() == [0, 0]
    # accumulation into out, float32 logits
    if mode != "pred":
        out2, _ = K.confusion_matrix(inp.float(), lab, c, IGN, mode == "resize", out=out.clone())
        assert torch.equal(out2, 2 * ref)


def test_triton_kernel_bad_values_and_large_c():
    K = pytest.importorskip("lipfast.kernels.confusion_matrix")
    x, y = make(1, 5, 6, 7, seed=3)
    y[0, 1, 1] = 9
    out, bad = K.confusion_matrix(x, y, 5, IGN, False, block_p=16)
    assert bad.tolist() == [1, 0]
    keep = y.clone()
    keep[0, 1, 1] = IGN
    assert torch.equal(out, np_cm(x.argmax(1), keep, 5))  # bad pixel not counted
    pred = x.argmax(1)
    pred[0, 2, 2] = 7
    y[0, 1, 1] = 0
    y[0, 2, 2] = 1
    out, bad = K.confusion_matrix(pred, y, 5, IGN, False)
    assert bad.tolist() == [0, 1]
    # C*C above the histogram limit: per-pixel atomics (default pick)
    c = 70
    x, y = make(1, c, 5, 6, seed=4, dtype=torch.float32)
    out, bad = K.confusion_matrix(x, y, c, IGN, False)
    assert torch.equal(out, np_cm(x.argmax(1), y, c)) and bad.tolist() == [0, 0]


# ------------------------------------------------------------------ ParsingMetrics


def spec_metrics(cm):
    """SPEC section 4 in numpy."""
    cm = np.asarray(cm, dtype=np.float64)
    pos, res, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    return dict(pixel_acc=tp.sum() / pos.sum() * 100,
                mean_acc=np.mean(tp / np.maximum(1.0, pos)) * 100,
                iou=tp / np.maximum(1.0, pos + res - tp) * 100,
                miou=np.mean(tp / np.maximum(1.0, pos + res - tp)) * 100)


@pytest.mark.parametrize("c", [2, 20])
def test_parsing_metrics_formulas(c):
    m = M.ParsingMetrics(num_classes=c, class_names=None if c != 20 else M.LIP_CLASSES)
    total = torch.zeros(c, c, dtype=torch.int64)
    for seed in range(3):
        x, _ = make(2, c, 9, 8, seed=seed, dtype=torch.float32)
        _, y = make(2, c, 33, 29, seed=seed + 10, ldt=torch.uint8)
        m.update(x, y)  # resize=True by default
        total += np_cm(F.interpolate(x, (33, 29), mode="bilinear", align_corners=True)
                       .argmax(1), y, c)
        m.update(x.argmax(1), x.argmax(1).to(torch.uint8))
        total += np_cm(x.argmax(1), x.argmax(1), c)
    r = m.compute()
    ref = spec_metrics(total)
    assert abs((r["confusion_matrix"] - total)).sum() <= 8  # float32 fused resize vs interpolate
    ref = spec_metrics(r["confusion_matrix"])
    assert r["num_images"] == 12
    assert math.isclose(r["pixel_acc"], ref["pixel_acc"], rel_tol=1e-12)
    assert math.isclose(r["mean_acc"], ref["mean_acc"], rel_tol=1e-12)
    assert math.isclose(r["miou"], ref["miou"], rel_tol=1e-12)
    np.testing.assert_allclose(r["iou"].numpy(), ref["iou"], rtol=1e-12)
    text = m.table()
    assert "mIoU" in text and f"{r['miou']:.2f}" in text
    if c == 20:
        assert "Right-shoe" in str(m)


def test_parsing_metrics_known_matrix():
    m = M.ParsingMetrics(3, class_names=["a", "b", "c"])
    pred = torch.tensor([[[0, 0, 1, 2, 2, 1]]])
    lab = torch.tensor([[[0, 1, 1, 2, IGN, 0]]])
    m.update(pred, lab)
    r = m.compute()
    # cm rows gt: a: [1, 1, 0]; b: [1, 1, 0]; c: [0, 0, 1]
    assert r["confusion_matrix"].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert math.isclose(r["pixel_acc"], 60.0)
    assert math.isclose(r["mean_acc"], (50 + 50 + 100) / 3)
    assert r["iou"].tolist() == pytest.approx([100 / 3, 100 / 3, 100.0])
    assert math.isclose(r["miou"], (100 / 3 * 2 + 100) / 3)


def test_state_dict_round_trip(tmp_path):
    m = M.ParsingMetrics()
    x, _ = make(2, 20, 9, 8, dtype=torch.float32)
    _, y = make(2, 20, 9, 8, seed=2)
    m.update(x, y)
    path = tmp_path / "metrics.pt"
    m.save(path)
    m2 = M.ParsingMetrics()
    m2.load(path)
    assert torch.equal(m2.matrix, m.matrix) and m2.num_images == 2
    sd = torch.load(path, weights_only=True)
    assert sd["num_images"] == 2
    m2.update(x, y)  # resume
    assert torch.equal(m2.matrix, 2 * m.matrix) and m2.num_images == 4
    with pytest.raises(ValueError, match="int64 20 x 20"):
        M.ParsingMetrics().load_state_dict({"matrix": torch.zeros(3, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="ignore_index"):
        M.ParsingMetrics(ignore_index=0).load_state_dict(m.state_dict())
    m.reset()
    assert m.matrix.sum() == 0 and m.num_images == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.pt"]  # no temporary left


def test_reduce_without_process_group_is_noop_and_guards():
    m = M.ParsingMetrics(4, class_names=None)
    x, y = make(1, 4, 5, 5)
    m.update(x, y)
    before = m.matrix.clone()
    assert m.reduce() is m
    assert torch.equal(m.matrix, before) and not m.reduced
    with pytest.raises(ValueError, match="class names"):
        M.ParsingMetrics(3, class_names=["a"])
    with pytest.raises(ValueError, match="num_classes"):
        M.ParsingMetrics(0)


def test_lip_constants():
    assert len(M.LIP_CLASSES) == 20 and M.LIP_CLASSES[0] == "Background"
    assert M.LIP_CLASSES[14:] == ("Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe",
                                  "Right-shoe")
    assert M.LIP_FLIP_PAIRS == ((14, 15), (16, 17), (18, 19))


# ------------------------------------------------------------------ TTA


class ToyModel(torch.nn.Module):
    """Position- and channel-dependent (not flip-symmetric), 1/2-resolution
    output, CE2P-style nested output when nested=True."""

    def __init__(self, c=20, nested=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(c, 3, generator=g, dtype=torch.float64)
        self.nested = nested

    def forward(self, img):
        h, w = img.shape[-2:]
        ramp = torch.linspace(0, 1, w, dtype=img.dtype)
        z = torch.einsum("cd,bdhw->bchw", self.w, img) + ramp * torch.arange(
            self.w.shape[0], dtype=img.dtype)[:, None, None]
        z = F.avg_pool2d(z, 2, ceil_mode=True)
        if self.nested:
            return [[z * 0.5, z], [z[:, :2]]]
        return z


def test_flip_matches_hand_written():
    model = ToyModel()
    img = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    got = tta.flip_logits(model, img)
    a = model(img)
    b = model(torch.flip(img, dims=[3]))
    b2 = b.clone()
    for l, r in ((14, 15), (16, 17), (18, 19)):
        b2[:, l], b2[:, r] = b[:, r], b[:, l]
    ref = (a + torch.flip(b2, dims=[3])) / 2
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # configurable pairs, and nested output picked with output_fn
    nested = ToyModel(nested=True)
    got = tta.flip_logits(nested, img, pairs=((0, 1),), output_fn=tta.ce2p_fusion)
    b3 = b.clone()
    b3[:, 0], b3[:, 1] = b[:, 1], b[:, 0]
    torch.testing.assert_close(got, (a + torch.flip(b3, dims=[3])) / 2, rtol=0, atol=0)
    with pytest.raises(TypeError, match="output_fn"):
        tta.flip_logits(nested, img)
    with pytest.raises(ValueError, match="outside the 20"):
        tta.flip_logits(model, img, pairs=((3, 25),))


def test_multi_scale_matches_hand_written():
    model = ToyModel()
    img = torch.randn(2, 3, 15, 11, dtype=torch.float64)
    scales = (0.5, 1.0, 1.3)
    got = tta.multi_scale_logits(model, img, scales=scales)
    outs = []
    for s in scales:
        size = (round(15 * s), round(11 * s))
        x = F.interpolate(img, size=size, mode="bilinear", align_corners=True) if s != 1 else img
        outs.append(F.interpolate(model(x), size=(15, 11), mode="bilinear", align_corners=True))
    torch.testing.assert_close(got, sum(outs) / 3, rtol=1e-12, atol=1e-12)
    # with flip, to a given size (the labels'), nested output
    got = tta.multi_scale_logits(ToyModel(nested=True), img, scales=(0.75,), flip=True,
                                 output_fn=tta.ce2p_fusion, size=(20, 16))
    x = F.interpolate(img, size=(11, 8), mode="bilinear", align_corners=True)
    ref = F.interpolate(tta.flip_logits(model, x), size=(20, 16), mode="bilinear",
                        align_corners=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scales"):
        tta.multi_scale_logits(model, img, scales=())


def test_ensemble_matches_hand_written():
    m1, m2 = ToyModel(), ToyModel()
    m2.w = m2.w.flip(0) * 2
    img = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    got = tta.ensemble_probs([m1, m2], img, weights=[1, 3])
    up = lambda z: F.interpolate(z, size=(10, 8), mode="bilinear", align_corners=True)  # noqa
    ref = 0.25 * torch.softmax(up(m1(img)), 1) + 0.75 * torch.softmax(up(m2(img)), 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 10, 8, dtype=torch.float64))
    # with a TTA function per model
    got = tta.ensemble_probs([m1, m2], img, tta=tta.flip_logits)
    ref = 0.5 * (torch.softmax(up(tta.flip_logits(m1, img)), 1)
                 + torch.softmax(up(tta.flip_logits(m2, img)), 1))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        tta.ensemble_probs([], img)
    with pytest.raises(ValueError, match="weights"):
        tta.ensemble_probs([m1], img, weights=[1, 2])


def test_cuda_glue_on_cpu_tensors():
    """The CUDA registration's body (Triton launcher + device-side assert), run
    on CPU tensors under the interpreter: counts, accumulation, the assert."""
    pytest.importorskip("lipfast.kernels.confusion_matrix")
    from lipfast.ops import confusion_matrix as confusion

    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    lab = torch.randint(0, 5, (2, 9, 8))
    ref = np_cm(F.interpolate(x, (9, 8), mode="bilinear", align_corners=True).argmax(1), lab, 5)
    assert torch.equal(confusion._cuda_count(x, lab, 5, IGN, True, None), ref)
    out = torch.ones(5, 5, dtype=torch.int64)
    confusion._cuda_count(x.double(), lab, 5, IGN, True, out)  # float64: the PyTorch path
    assert torch.equal(out, 1 + ref)
    lab[0, 0, 0] = 6
    with pytest.raises(RuntimeError, match="outside"):
        confusion._cuda_count(x, lab, 5, IGN, True, None)
    with pytest.raises(RuntimeError, match="outside"):
        confusion._cuda_count(x.double(), lab, 5, IGN, True, None)


# ------------------------------------------------------------------ CUDA
# The CUDA op (Triton kernel; float64 logits: the PyTorch path) against numpy
# bincount of torch.argmax (same-size logits, predictions: exact) and against
# F.interpolate + argmax for the fused resize (float64: exact; float32/half:
# differences only at near-ties through FMA contraction, at most 8 pixels, as
# the CPU test allows).


def _cuda_views(x):
    """Same values as contiguous, channels_last and a sliced (non-contiguous) view."""
    b, c, h, w = x.shape
    big = torch.randn(b, c + 2, h + 1, 2 * w, dtype=x.dtype, device=x.device)
    big[:, 1:c + 1, :h, ::2] = x
    view = big[:, 1:c + 1, :h, ::2]
    assert not view.is_contiguous()
    return [x, x.contiguous(memory_format=torch.channels_last), view]


@pytest.mark.cuda
@pytest.mark.parametrize("c", [2, 20, 70])
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_logits_and_predictions_exact(c, ldt, dtype):
    for b, h, w in [(2, 7, 9), (1, 1, 1), (3, 13, 1), (2, 119, 97)]:
        x, y = make(b, c, h, w, dtype=torch.float32, ldt=ldt, seed=c + h)
        x, y = x.to("cuda", dtype), y.cuda()
        x0, y0 = x.clone(), y.clone()
        ref = np_cm(x.float().argmax(1).cpu(), y.cpu(), c)
        for xx in _cuda_views(x):
            cm = M.confusion_matrix(xx, y, c)
            assert cm.device.type == "cuda" and cm.dtype == torch.int64
            assert torch.equal(cm.cpu(), ref)
        yt = y.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous labels
        assert torch.equal(M.confusion_matrix(x, yt, c).cpu(), ref)
        for pdt in (torch.uint8, torch.int64, torch.int32):
            if pdt == torch.uint8 and c > 255:
                continue
            pred = x.float().argmax(1).to(pdt)
            assert torch.equal(M.confusion_matrix(pred, y, c).cpu(), ref)
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.cuda
def test_cuda_ties_nan_ignore():
    x = torch.zeros(2, 6, 5, 7, device="cuda")
    x[:, 2] = 1.0
    x[:, 4] = 1.0  # tie: first maximum
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = float("-inf")
    x[0, 3, 2, :] = float("nan")
    x[0, 1, 2, :3] = float("nan")
    y = torch.randint(0, 6, (2, 5, 7), device="cuda")
    y[1, 4] = IGN
    ref = np_cm(x.cpu().argmax(1), y.cpu(), 6)
    for xx in _cuda_views(x):
        assert torch.equal(M.confusion_matrix(xx, y, 6).cpu(), ref)
    y2 = y.clamp(max=5)
    assert torch.equal(M.confusion_matrix(x, y2, 6, ignore_index=2).cpu(),
                       np_cm(x.cpu().argmax(1), y2.cpu(), 6, 2))
    y3 = torch.full_like(y, IGN)
    assert M.confusion_matrix(x, y3, 6).sum().item() == 0
    e = M.confusion_matrix(torch.zeros(0, 4, 5, 6, device="cuda"),
                           torch.zeros(0, 5, 6, dtype=torch.long, device="cuda"), 4)
    assert e.device.type == "cuda" and e.sum().item() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("shape", RESIZE_SHAPES + [(4, 20, 30, 30, 119, 119)])
@pytest.mark.parametrize("ldt", [torch.uint8, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_fused_resize(shape, ldt, dtype):
    b, c, h, w, hh, ww = shape
    x, _ = make(b, c, h, w, seed=hh)
    _, y = make(b, c, hh, ww, seed=ww, ldt=ldt)
    x = x.to(dtype)
    up = F.interpolate(x.double(), (hh, ww), mode="bilinear", align_corners=True)
    ref = np_cm(up.argmax(1), y, c)
    cpu = M.confusion_matrix(x.float() if dtype == torch.bfloat16 else x, y, c, resize=True)
    xc, yc = x.cuda(), y.cuda()
    for xx in _cuda_views(xc):
        got = M.confusion_matrix(xx, yc, c, resize=True).cpu()
        assert got.sum() == ref.sum()
        if dtype == torch.float64:
            assert torch.equal(got, ref)
        else:  # float32 interpolation (half types are read as float32), near-ties only
            assert (got - ref).abs().sum() <= 8
            assert (got - cpu).abs().sum() <= 8


@pytest.mark.cuda
def test_cuda_out_accumulates_in_place():
    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    x2, y2 = make(3, 5, 6, 7, seed=9)
    x, y, x2, y2 = x.cuda(), y.cuda(), x2.cuda(), y2.cuda()
    out = torch.full((5, 5), 3, dtype=torch.int64, device="cuda")
    ptr = out.data_ptr()
    r = M.confusion_matrix(x, y, 5, out=out)
    r = M.confusion_matrix(x2.argmax(1), y2, 5, out=r)
    assert r is out and out.data_ptr() == ptr
    ref = 3 + np_cm(x.cpu().argmax(1), y.cpu(), 5) + np_cm(x2.cpu().argmax(1), y2.cpu(), 5)
    assert torch.equal(out.cpu(), ref)
    big = torch.zeros(5, 10, dtype=torch.int64, device="cuda")
    M.confusion_matrix(x.double(), y, 5, out=big[:, ::2])  # PyTorch path, strided out
    assert torch.equal(big[:, ::2].cpu(), np_cm(x.cpu().argmax(1), y.cpu(), 5))
    assert big[:, 1::2].sum().item() == 0
    with pytest.raises(ValueError, match="out on"):
        M.confusion_matrix(x, y, 5, out=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="input on"):
        M.confusion_matrix(x, y.cpu(), 5)


@pytest.mark.cuda
def test_cuda_no_host_sync():
    x, _ = make(2, 20, 30, 30, dtype=torch.float32, seed=3)
    _, y = make(2, 20, 119, 119, seed=4, ldt=torch.uint8)
    x, y = x.cuda(), y.cuda()
    m = M.ParsingMetrics(device="cuda")

    def step():
        cm = M.confusion_matrix(x, y, 20, resize=True)
        M.confusion_matrix(x.bfloat16(), y, 20, out=cm, resize=True)
        M.confusion_matrix(x[:, :, :, :].argmax(1), y[:, :30, :30], 20, out=cm)
        m.update(x, y)
        m.update(x.argmax(1).to(torch.uint8), y[:, :30, :30])
        return cm

    ref, got = twice_without_sync(lambda: step().clone())  # warm-up (Triton compile)
    assert torch.equal(got, ref)
    assert m.num_images == 8


@pytest.mark.cuda
@pytest.mark.parametrize("c", [2, 20])
def test_cuda_parsing_metrics_equal_cpu(c):
    mg = M.ParsingMetrics(num_classes=c, class_names=None)
    mc = M.ParsingMetrics(num_classes=c, class_names=None)
    for seed in range(3):
        x, _ = make(2, c, 9, 8, seed=seed, dtype=torch.float64)
        _, y = make(2, c, 33, 29, seed=seed + 10, ldt=torch.uint8)
        p = x.argmax(1)
        # float64 logits (exact fused resize on both devices) and predictions
        mg.update(x.cuda(), y.cuda())
        mc.update(x, y)
        mg.update(p.cuda(), p.to(torch.uint8).cuda())
        mc.update(p, p.to(torch.uint8))
    assert mg.matrix.device.type == "cuda"
    rg, rc = mg.compute(), mc.compute()
    assert torch.equal(rg["confusion_matrix"], rc["confusion_matrix"])
    assert rg["num_images"] == rc["num_images"] == 12
    for k in ("pixel_acc", "mean_acc", "miou"):
        assert rg[k] == rc[k]
    assert torch.equal(rg["iou"], rc["iou"])
    assert mg.table() == mc.table()
    # state round trip from a CUDA matrix
    sd = mg.state_dict()
    m2 = M.ParsingMetrics(num_classes=c, class_names=None)
    m2.load_state_dict(sd)
    assert torch.equal(m2.matrix.cpu(), mc.matrix)
    # float32 logits with the fused resize: near-ties only
    x, _ = make(2, c, 30, 30, seed=7, dtype=torch.float32)
    _, y = make(2, c, 119, 119, seed=8)
    mg.reset()
    mc.reset()
    mg.update(x.cuda(), y.cuda())
    mc.update(x, y)
    d = (mg.compute()["confusion_matrix"] - mc.compute()["confusion_matrix"]).abs().sum()
    assert d <= 8


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x, y = make(2, 5, 6, 7, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    lab = torch.randint(0, 5, (2, 11, 9), dtype=torch.uint8, device="cuda")
    for args in ((x, y, 5, IGN, False), (x, lab, 5, IGN, True), (x.argmax(1), y, 5, IGN, False)):
        torch.library.opcheck(torch.ops.lipfast.confusion_matrix.default, args)
        torch.library.opcheck(torch.ops.lipfast.confusion_matrix_accumulate.default,
                              args + (torch.zeros(5, 5, dtype=torch.int64, device="cuda"),))

    def f(logits, labels, out):
        M.confusion_matrix(logits * 2, labels, 5, out=out, resize=True)
        return M.confusion_matrix(logits, labels, 5, resize=True) + 1

    out_c = torch.zeros(5, 5, dtype=torch.int64, device="cuda")
    out_e = torch.zeros(5, 5, dtype=torch.int64, device="cuda")
    r = torch.compile(f, backend="aot_eager", fullgraph=True)(x, lab, out_c)
    e = f(x, lab, out_e)
    assert torch.equal(r, e) and torch.equal(out_c, out_e)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["label", "prediction", "label_float64"])
def test_cuda_bad_values_in_child_process(case):
    # a device-side assert poisons the CUDA context: checked in a child process
    dt = "torch.float64" if case == "label_float64" else "torch.float32"
    bad = ("y[1, 2, 3] = 7" if case != "prediction" else "x = x.argmax(1); x[0, 0, 0] = 5")
    code = (
        "import torch, lipfast\n"
        "from lipfast import metrics as M\n"
        f"x = torch.randn(2, 5, 6, 7, device='cuda', dtype={dt})\n"
        "y = torch.randint(0, 5, (2, 6, 7), device='cuda', dtype=torch.uint8)\n"
        "M.confusion_matrix(x, y, 5)\n"
        "torch.cuda.synchronize()\n"
        f"{bad}\n"
        "cm = M.confusion_matrix(x, y, 5)\n"
        "print('launched', flush=True)\n"
        "cm.cpu()\n"
        "print('no error', flush=True)\n"
    )
    assert_device_assert(code)
