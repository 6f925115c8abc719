"""Bad input to the public API: a clear ValueError/TypeError naming the function (or
module) the user called and the argument, never a silently wrong number or an
error from deep inside torch. One table per area; every row is
(id, call, exception type, message regex)."""

from __future__ import annotations

import math

import pytest
import torch

import lipfast
from lipfast.losses import (CE2PCriterion, LovaszSoftmax, OCNetCriterion, SCHPCriterion,
                            UpsampleCrossEntropy, edge_loss, lovasz_softmax,
                            upsample_cross_entropy)
from lipfast.metrics import (ParsingMetrics, confusion_matrix, ensemble_probs, flip_logits,
                             metrics_from_matrix, multi_scale_logits)
from lipfast.models import CE2P

NAN, INF = float("nan"), float("inf")

pytestmark = pytest.mark.usefixtures("no_process_group_warnings")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(c=3, b=2, h=4, w=5):
    return torch.randn(b, c, h, w, generator=_g(1))


def labels(c=3, b=2, h=8, w=10):
    return torch.randint(0, c, (b, h, w), generator=_g(2), dtype=torch.uint8)


def edges(b=2, h=8, w=10):
    return torch.randint(0, 2, (b, h, w), generator=_g(3))


def schp_preds(c=3):
    return [[logits(c), logits(c)], [logits(2)]]


def run(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def table(rows):
    return pytest.mark.parametrize("call, exc, match", [r[1:] for r in rows],
                                   ids=[r[0] for r in rows])


# ----------------------------------------------------------------- losses
W_MSG = r"weight must be finite and >= 0"
LOSS_ROWS = [
    ("ce-weight-negative", lambda: upsample_cross_entropy(
        logits(), labels(), weight=torch.tensor([1.0, -0.5, 1.0])), ValueError,
     rf"upsample_cross_entropy: {W_MSG}, got -0.5 at class 1"),
    ("ce-weight-nan", lambda: upsample_cross_entropy(
        logits(), labels(), weight=torch.tensor([1.0, 1.0, NAN])), ValueError,
     rf"upsample_cross_entropy: {W_MSG}, got nan at class 2"),
    ("ce-weight-inf", lambda: upsample_cross_entropy(
        logits(), labels(), weight=torch.tensor([INF, 1.0, 1.0])), ValueError,
     rf"upsample_cross_entropy: {W_MSG}, got inf at class 0"),
    ("ce-ignore-index-none", lambda: upsample_cross_entropy(logits(), labels(), None),
     TypeError, r"upsample_cross_entropy: ignore_index must be an int, got None"),
    ("ce-ignore-index-float", lambda: upsample_cross_entropy(logits(), labels(), 2.5),
     TypeError, r"upsample_cross_entropy: ignore_index must be an int, got 2.5"),
    ("ce-module-weight-negative", lambda: UpsampleCrossEntropy(weight=[1.0, -1.0]),
     ValueError, rf"UpsampleCrossEntropy: {W_MSG}, got -1.0 at class 1"),
    ("ce-module-weight-2d", lambda: UpsampleCrossEntropy(weight=torch.ones(2, 2)),
     ValueError, r"UpsampleCrossEntropy: weight must be a 1-D tensor of class weights"),
    ("ce-module-ignore-index", lambda: UpsampleCrossEntropy(ignore_index="255"),
     TypeError, r"UpsampleCrossEntropy: ignore_index must be an int"),
    ("edge-label-2", lambda: edge_loss(logits(2), edges() * 2), ValueError,
     r"^edge_loss: edge labels must be 0, 1 or ignore_index=255, found 2"),
    ("edge-label-negative", lambda: edge_loss(logits(2), edges() - 1), ValueError,
     r"^edge_loss: edge labels must be 0, 1 or ignore_index=255, found -1"),
    ("edge-logits-not-tensor", lambda: edge_loss([logits(2)], edges()), TypeError,
     r"edge_loss expects tensors for edge_logits and edge_labels, got list"),
    ("edge-float-labels", lambda: edge_loss(logits(2), edges().float()), TypeError,
     r"edge_loss: edge_labels must be an integer tensor"),
    ("edge-ignore-index", lambda: edge_loss(logits(2), edges(), ignore_index=None),
     TypeError, r"edge_loss: ignore_index must be an int"),
    ("lovasz-ignore-index", lambda: lovasz_softmax(logits(h=8, w=10), labels(),
                                                   ignore_index=None),
     TypeError, r"lovasz_softmax: ignore_index must be an int"),
    ("lovasz-module-classes-int", lambda: LovaszSoftmax(classes=3), TypeError,
     r"lovasz_softmax: classes must be 'present', 'all' or a list of class ids, got int"),
    ("lovasz-module-classes-negative", lambda: LovaszSoftmax(classes=[0, -1]), ValueError,
     r"lovasz_softmax: class id -1 is out of range"),
]


@table(LOSS_ROWS)
def test_losses(call, exc, match):
    run(call, exc, match)


# ----------------------------------------------------------------- criteria
CRIT_ROWS = [
    ("schp-21-channels-for-20", lambda: SCHPCriterion(num_classes=20)(
        [[logits(21), logits(21)], [logits(2)]], [labels(20), edges()]), ValueError,
     r"SCHPCriterion: parsing prediction 0 has 21 channels but num_classes=20"),
    ("schp-fusion-channels", lambda: SCHPCriterion(num_classes=3)(
        [[logits(3), logits(4)], [logits(2)]], [labels(), edges()]), ValueError,
     r"SCHPCriterion: parsing prediction 1 has 4 channels but num_classes=3"),
    ("schp-target-one-item", lambda: SCHPCriterion(num_classes=3)(schp_preds(), [labels()]),
     ValueError, r"SCHPCriterion: target must be \[labels, edges\] or \[labels, edges, "
                 r"soft_preds, soft_edges\], got a list of 1"),
    ("schp-target-tensor", lambda: SCHPCriterion(num_classes=3)(schp_preds(), labels()),
     TypeError, r"SCHPCriterion: target must be \[labels, edges\].*got a Tensor"),
    ("schp-preds-tensor", lambda: SCHPCriterion(num_classes=3)(logits(), [labels(), edges()]),
     TypeError, r"SCHPCriterion: preds must be \[\[parsing, fusion\], \[edge\]\] \(CE2P/SCHP's "
                r"output\), got a Tensor"),
    ("schp-preds-flat-list", lambda: SCHPCriterion(num_classes=3)(
        [logits(), logits(), logits(2)], [labels(), edges()]), ValueError,
     r"SCHPCriterion: preds must be \[\[parsing, fusion\], \[edge\]\].*got a list of 3"),
    ("schp-float-labels", lambda: SCHPCriterion(num_classes=3)(
        schp_preds(), [labels().float(), edges()]), TypeError,
     r"SCHPCriterion: labels must be an integer tensor, got torch.float32"),
    ("schp-edge-labels", lambda: SCHPCriterion(num_classes=3)(
        schp_preds(), [labels(), edges() * 3]), ValueError,
     r"^SCHPCriterion: edge_loss: edge labels must be 0, 1 or ignore_index=255, found 3"),
    ("schp-edge-channels", lambda: SCHPCriterion(num_classes=3)(
        [[logits(), logits()], [logits(3)]], [labels(), edges()]), ValueError,
     r"SCHPCriterion: edge prediction 0 has 3 channels, expected 2"),
    ("schp-soft-preds-channels", lambda: SCHPCriterion(num_classes=3)(
        schp_preds(), [labels(), edges(), logits(4), logits(2)], cycle_n=1), ValueError,
     r"SCHPCriterion: soft_preds has 4 channels but num_classes=3"),
    ("schp-soft-edges-channels", lambda: SCHPCriterion(num_classes=3)(
        schp_preds(), [labels(), edges(), logits(3), logits(3)], cycle_n=1), ValueError,
     r"SCHPCriterion: soft_edges has 3 channels, expected 2"),
    ("schp-cycle-negative", lambda: SCHPCriterion(num_classes=3)(
        schp_preds(), [labels(), edges(), logits(3), logits(2)], cycle_n=-1), ValueError,
     r"SCHPCriterion: cycle_n must be an int >= 0, got -1"),
    ("schp-num-classes-0", lambda: SCHPCriterion(num_classes=0), ValueError,
     r"SCHPCriterion: num_classes must be an int >= 1, got 0"),
    ("schp-lambda-negative", lambda: SCHPCriterion(lambda_2=-1), ValueError,
     r"SCHPCriterion: lambda_2 must be a finite number >= 0, got -1"),
    ("schp-lambda-nan", lambda: SCHPCriterion(lambda_1=NAN), ValueError,
     r"SCHPCriterion: lambda_1 must be a finite number >= 0, got nan"),
    ("schp-ignore-index", lambda: SCHPCriterion(ignore_index=None), TypeError,
     r"SCHPCriterion: ignore_index must be an int"),
    ("ce2p-preds-tensor", lambda: CE2PCriterion()(logits(), [labels(), edges()]), TypeError,
     r"CE2PCriterion: preds must be \[\[parsing, fusion\], \[edge\]\]"),
    ("ce2p-target-one-item", lambda: CE2PCriterion()(schp_preds(), [labels()]), ValueError,
     r"CE2PCriterion: target must be \[labels, edges\], got a list of 1"),
    ("ce2p-label-range", lambda: CE2PCriterion()(schp_preds(), [labels() + 3, edges()]),
     ValueError, r"^CE2PCriterion: upsample_cross_entropy: label \d outside \[0, 3\)"),
    ("ce2p-ignore-index", lambda: CE2PCriterion(ignore_index=1.5), TypeError,
     r"CE2PCriterion: ignore_index must be an int"),
    ("ocnet-weight-negative", lambda: OCNetCriterion(weight=[1.0, -2.0, 1.0]), ValueError,
     rf"OCNetCriterion: {W_MSG}, got -2.0 at class 1"),
    ("ocnet-weight-inf", lambda: OCNetCriterion(weight=[1.0, INF]), ValueError,
     rf"OCNetCriterion: {W_MSG}, got inf at class 1"),
    ("ocnet-dsn-weight-nan", lambda: OCNetCriterion(dsn_weight=NAN), ValueError,
     r"OCNetCriterion: dsn_weight must be a finite number >= 0, got nan"),
    ("ocnet-preds-tensor", lambda: OCNetCriterion()(logits(), labels()), TypeError,
     r"OCNetCriterion: preds must be \[main, dsn\] \(two logit tensors\), got a Tensor"),
    ("ocnet-preds-one", lambda: OCNetCriterion()([logits()], labels()), ValueError,
     r"OCNetCriterion: preds must be \[main, dsn\].*got a list of 1"),
    ("ocnet-weight-length", lambda: OCNetCriterion(weight=[1.0, 1.0])(
        [logits(), logits()], labels()), ValueError,
     r"OCNetCriterion: upsample_cross_entropy: weight must be a 1-D tensor of 3 class "
     r"weights"),
]


@table(CRIT_ROWS)
def test_criteria(call, exc, match):
    run(call, exc, match)


def test_schp_num_classes_is_checked_without_soft_targets_too():
    """num_classes is only used by the soft targets; 21-channel predictions for a
    20-class criterion used to be accepted silently in cycle 0."""
    crit = SCHPCriterion(num_classes=4)
    with pytest.raises(ValueError, match="has 3 channels but num_classes=4"):
        crit(schp_preds(3), [labels(3), edges()])


def test_edge_weights_of_an_all_ignored_batch_are_zero_not_nan():
    from lipfast.losses.edge import edge_weights

    w = edge_weights(torch.full((1, 3, 3), 255))
    assert torch.equal(w, torch.zeros(2))
    loss = edge_loss(logits(2, b=1), torch.full((1, 8, 10), 255))
    assert float(loss) == 0.0


# ----------------------------------------------------------------- ops
def _qk():
    return torch.randn(1, 4, 5, 6, generator=_g(4))


OPS_ROWS = [
    ("oc-scale-zero", lambda: lipfast.oc_attention(_qk(), _qk(), 0.0), ValueError,
     r"oc_attention: scale must be a positive finite number, got 0.0"),
    ("oc-scale-negative", lambda: lipfast.oc_attention(_qk(), _qk(), -0.5), ValueError,
     r"oc_attention: scale must be a positive finite number, got -0.5"),
    ("oc-scale-nan", lambda: lipfast.oc_attention(_qk(), _qk(), NAN), ValueError,
     r"oc_attention: scale must be a positive finite number, got nan"),
    ("oc-scale-inf", lambda: lipfast.oc_attention(_qk(), _qk(), INF), ValueError,
     r"oc_attention: scale must be a positive finite number, got inf"),
    ("oc-scale-string", lambda: lipfast.oc_attention(_qk(), _qk(), "0.5"), TypeError,
     r"oc_attention: scale must be a number, got str"),
    ("oc-regions-float", lambda: lipfast.oc_attention(_qk(), _qk(), None, 2.5), TypeError,
     r"oc_attention: regions must be an int, got 2.5"),
    ("oc-regions-negative", lambda: lipfast.oc_attention(_qk(), _qk(), None, -1), ValueError,
     r"oc_attention: regions must be >= 0, got -1"),
    ("abn-eps-zero", lambda: lipfast.inplace_abn(torch.randn(2, 3, 4), None, None, None, None,
                                                  eps=0.0), ValueError,
     r"inplace_abn: eps must be a positive finite number .*, got 0.0"),
    ("abn-eps-nan", lambda: lipfast.inplace_abn(torch.randn(2, 3, 4), None, None, None, None,
                                                 eps=NAN), ValueError,
     r"inplace_abn: eps must be a positive finite number .*, got nan"),
    ("abn-momentum-above-1", lambda: lipfast.inplace_abn(
        torch.randn(2, 3, 4), None, None, torch.zeros(3), torch.ones(3), momentum=1.5),
     ValueError, r"inplace_abn: momentum must be in \[0, 1\], got 1.5"),
    ("abn-sync-momentum-negative", lambda: lipfast.inplace_abn_sync(
        torch.randn(2, 3, 4), None, None, torch.zeros(3), torch.ones(3), momentum=-0.1),
     ValueError, r"inplace_abn_sync: momentum must be in \[0, 1\], got -0.1"),
    ("abn-slope-nan", lambda: lipfast.inplace_abn(torch.randn(2, 3, 4), None, None, None, None,
                                                   activation_param=NAN), ValueError,
     r"activation_param must be finite, got nan"),
]


@table(OPS_ROWS)
def test_ops(call, exc, match):
    run(call, exc, match)


# ----------------------------------------------------------------- nn modules
NN_ROWS = [
    ("inplace-abn-eps-zero", lambda: lipfast.InPlaceABN(4, eps=0), ValueError,
     r"InPlaceABN: eps must be a positive finite number \(the in-place layers scale by "
     r"\|w\| \+ eps\), got 0.0"),
    ("inplace-abn-eps-negative", lambda: lipfast.InPlaceABN(4, eps=-1e-5), ValueError,
     r"InPlaceABN: eps must be a positive finite number"),
    ("inplace-abn-sync-eps-nan", lambda: lipfast.InPlaceABNSync(4, eps=NAN), ValueError,
     r"InPlaceABNSync: eps must be a positive finite number"),
    ("abn-eps-negative", lambda: lipfast.ABN(4, eps=-1.0), ValueError,
     r"ABN: eps must be a finite number >= 0, got -1.0"),
    ("abn-eps-inf", lambda: lipfast.ABN(4, eps=INF), ValueError,
     r"ABN: eps must be a finite number >= 0, got inf"),
    ("inplace-abn-momentum-above-1", lambda: lipfast.InPlaceABN(4, momentum=1.5), ValueError,
     r"InPlaceABN: momentum must be None or in \[0, 1\], got 1.5"),
    ("abn-momentum-negative", lambda: lipfast.ABN(4, momentum=-0.1), ValueError,
     r"ABN: momentum must be None or in \[0, 1\], got -0.1"),
    ("abn-momentum-nan", lambda: lipfast.ABN(4, momentum=NAN), ValueError,
     r"ABN: momentum must be None or in \[0, 1\], got nan"),
    ("abn-momentum-string", lambda: lipfast.ABN(4, momentum="0.1"), TypeError,
     r"ABN: momentum must be None or a number"),
    ("abn-slope-nan", lambda: lipfast.ABN(4, activation_param=NAN), ValueError,
     r"activation_param must be finite, got nan"),
    ("abn-elu-alpha-inf", lambda: lipfast.ABN(4, activation="elu", activation_param=INF),
     ValueError, r"activation_param must be finite, got inf"),
    ("base-oc-dropout-above-1", lambda: lipfast.BaseOCModule(8, 8, 4, 4, 1.5), ValueError,
     r"BaseOCModule: dropout must be in \[0, 1\], got 1.5"),
    ("base-oc-dropout-nan", lambda: lipfast.BaseOCModule(8, 8, 4, 4, NAN), ValueError,
     r"BaseOCModule: dropout must be in \[0, 1\], got nan"),
    ("base-oc-context-dropout", lambda: lipfast.BaseOCContextModule(8, 8, 4, 4, -0.1),
     ValueError, r"BaseOCContextModule: dropout must be in \[0, 1\], got -0.1"),
    ("pyramid-oc-dropout", lambda: lipfast.PyramidOCModule(8, 8, 2.0), ValueError,
     r"PyramidOCModule: dropout must be in \[0, 1\], got 2.0"),
    ("pyramid-oc-dropout-string", lambda: lipfast.PyramidOCModule(8, 8, "0.1"), TypeError,
     r"PyramidOCModule: dropout must be a number"),
    ("attention-scale-zero", lambda: lipfast.SelfAttentionBlock2D(8, 4, 4, scale=0),
     ValueError, r"SelfAttentionBlock2D: scale must be a positive int, got 0"),
    ("attention-scale-float", lambda: lipfast.PyramidSelfAttentionBlock2D(8, 4, 4, scale=1.5),
     ValueError, r"PyramidSelfAttentionBlock2D: scale must be a positive int, got 1.5"),
    ("base-oc-size-zero", lambda: lipfast.BaseOCModule(8, 8, 4, 4, 0.0, [1, 0]), ValueError,
     r"BaseOCModule: every entry of sizes must be a positive int, got 0"),
    ("asp-oc-dilation-zero", lambda: lipfast.ASPOCModule(8, 4, (1, 0, 2)), ValueError,
     r"ASPOCModule: every dilation must be a positive int, got 0"),
]


@table(NN_ROWS)
def test_nn_modules(call, exc, match):
    run(call, exc, match)


# ----------------------------------------------------------------- metrics
def _model(x):
    return torch.zeros(x.shape[0], 20, x.shape[2], x.shape[3])


_IMG = torch.zeros(1, 3, 6, 6)

METRIC_ROWS = [
    ("cm-num-classes-zero", lambda: confusion_matrix(logits(), labels(h=4, w=5), 0),
     ValueError, r"confusion_matrix: num_classes must be an int >= 1, got 0"),
    ("cm-num-classes-float", lambda: confusion_matrix(logits(), labels(h=4, w=5), 3.0),
     ValueError, r"confusion_matrix: num_classes must be an int >= 1, got 3.0"),
    ("cm-channels", lambda: confusion_matrix(logits(), labels(h=4, w=5), 4), ValueError,
     r"confusion_matrix: logits have 3 channels but num_classes=4"),
    ("cm-ignore-index", lambda: confusion_matrix(logits(), labels(h=4, w=5), 3, None),
     TypeError, r"confusion_matrix: ignore_index must be an int"),
    ("metrics-num-classes-negative", lambda: ParsingMetrics(num_classes=-1), ValueError,
     r"ParsingMetrics: num_classes must be an int >= 1, got -1"),
    ("metrics-ignore-index", lambda: ParsingMetrics(ignore_index=2.0), TypeError,
     r"ParsingMetrics: ignore_index must be an int"),
    ("metrics-update-channels", lambda: ParsingMetrics(num_classes=4).update(
        logits(), labels()), ValueError, r"logits have 3 channels but num_classes=4"),
    ("metrics-from-matrix-1d", lambda: metrics_from_matrix(torch.zeros(4)), ValueError,
     r"metrics_from_matrix: cm must be a square C x C matrix, got shape \(4,\)"),
    ("metrics-from-matrix-negative", lambda: metrics_from_matrix(-torch.eye(3)), ValueError,
     r"metrics_from_matrix: cm has negative counts"),
    ("tta-scale-zero", lambda: multi_scale_logits(_model, _IMG, scales=(1.0, 0.0)), ValueError,
     r"scales must be a non-empty list of positive finite factors, got \(1.0, 0.0\)"),
    ("tta-scale-negative", lambda: multi_scale_logits(_model, _IMG, scales=(-1,)), ValueError,
     r"scales must be a non-empty list of positive finite factors"),
    ("tta-scale-nan", lambda: multi_scale_logits(_model, _IMG, scales=(NAN,)), ValueError,
     r"scales must be a non-empty list of positive finite factors, got \(nan,\)"),
    ("tta-scale-inf", lambda: multi_scale_logits(_model, _IMG, scales=(1.0, INF)), ValueError,
     r"scales must be a non-empty list of positive finite factors"),
    ("tta-scales-empty", lambda: multi_scale_logits(_model, _IMG, scales=()), ValueError,
     r"scales must be a non-empty list"),
    ("tta-scale-string", lambda: multi_scale_logits(_model, _IMG, scales=("big",)), TypeError,
     r"multi_scale_logits: scales must be numbers, got 'big'"),
    ("tta-size-zero", lambda: multi_scale_logits(_model, _IMG, size=(0, 6)), ValueError,
     r"multi_scale_logits: size must be two positive ints \(H, W\), got \(0, 6\)"),
    ("ensemble-size-negative", lambda: ensemble_probs([_model], _IMG, size=(6, -1)),
     ValueError, r"ensemble_probs: size must be two positive ints \(H, W\), got \(6, -1\)"),
    ("ensemble-weight-nan", lambda: ensemble_probs([_model, _model], _IMG, weights=[1, NAN]),
     ValueError, r"weights must be 2 finite non-negative numbers with a positive sum"),
    ("ensemble-weight-inf", lambda: ensemble_probs([_model], _IMG, weights=[INF]),
     ValueError, r"weights must be 1 finite non-negative numbers with a positive sum"),
    ("flip-pair-out-of-range", lambda: flip_logits(_model, _IMG, pairs=((14, 25),)),
     ValueError, r"flip pair \(14, 25\) outside the 20 output channels"),
]


@table(METRIC_ROWS)
def test_metrics(call, exc, match):
    run(call, exc, match)


# ----------------------------------------------------------------- models
def _tiny_ce2p():
    torch.manual_seed(0)
    return CE2P(num_classes=4, layers=(1, 1, 1, 1), width_mult=1 / 16,
                norm="batchnorm").eval()


MODEL_ROWS = [
    ("ce2p-uint8-image", lambda: _tiny_ce2p()(torch.zeros(1, 3, 17, 17, dtype=torch.uint8)),
     TypeError, r"CE2P expects a floating-point image batch, got torch.uint8: convert it with "
                r"x.float\(\) / 255 \(BGR in \[0, 1\]\) and normalise with "
                r"lipfast.models.LIP_MEAN / LIP_STD"),
    ("ce2p-int64-image", lambda: _tiny_ce2p()(torch.zeros(1, 3, 17, 17, dtype=torch.int64)),
     TypeError, r"CE2P expects a floating-point image batch, got torch.int64"),
    ("ce2p-num-classes-zero", lambda: CE2P(num_classes=0), ValueError,
     r"CE2P: num_classes must be an int >= 1, got 0"),
    ("ce2p-channels", lambda: _tiny_ce2p()(torch.zeros(1, 4, 17, 17)), ValueError,
     r"CE2P expects a B x 3 x H x W image batch, got shape \(1, 4, 17, 17\)"),
]


@table(MODEL_ROWS)
def test_models(call, exc, match):
    run(call, exc, match)


def test_checks_accept_the_edges_of_the_valid_ranges():
    """The new checks must not reject valid settings: zero class weights, momentum
    0 and 1 (and None), ABN eps 0, dropout 0 and 1, a tiny positive scale."""
    upsample_cross_entropy(logits(), labels(), weight=torch.tensor([0.0, 1.0, 2.0]))
    OCNetCriterion(weight=[0.0, 1.0, 1.0])([logits(), logits()], labels())
    for m in (0.0, 1.0, None):
        lipfast.InPlaceABN(4, momentum=m)
    lipfast.ABN(4, eps=0.0)
    lipfast.BaseOCModule(8, 8, 4, 4, 0.0)
    lipfast.PyramidOCModule(8, 8, 1.0)
    out = lipfast.oc_attention(_qk(), _qk(), 1e-30)
    assert torch.isfinite(out).all()
    SCHPCriterion(num_classes=3, lambda_3=0)(schp_preds(), [labels(), edges()])
    SCHPCriterion(num_classes=3)(schp_preds(), [labels(), edges(), logits(3), logits(2)],
                                 cycle_n=0)
    SCHPCriterion(num_classes=3)(schp_preds(), (labels(), edges(), None, None))
    CE2PCriterion()([logits(), [logits(2)]], [labels(), edges()])
    assert math.isfinite(float(multi_scale_logits(_model, _IMG, scales=(0.5, 1)).sum()))
