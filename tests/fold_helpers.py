"""Shared by test_fold.py, test_export.py and test_oc_modules.py: randomised
modules, small randomised CE2P models and a detector of lipfast ops."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lipfast.models import CE2P
from lipfast.nn.abn import InPlaceABN

#: (rtol relative to max|out|) of the folded vs the unfolded model
FOLD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def randomize(module, seed=0, var_range=(0.3, 1.8)):
    """Every parameter and running statistic from a seeded generator: norm weights of
    both signs (so |w| + eps matters for the in-place norms), running means and
    variances (uniform in ``var_range``) away from 0 / 1, the OC blocks'
    zero-initialised W too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) in seen or name.endswith("num_batches_tracked"):
                continue
            seen.add(id(t))
            if name.endswith("running_var"):
                val = (torch.rand(t.shape, generator=g, dtype=torch.float64)
                       * (var_range[1] - var_range[0]) + var_range[0])
            elif name.endswith("running_mean"):
                val = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3
            elif t.dim() == 4:  # conv weight
                val = torch.randn(t.shape, generator=g, dtype=torch.float64) * (
                    1.5 / t[0].numel() ** 0.5)
            elif name.endswith("bias"):
                val = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.3
            else:  # norm weight: mixed signs
                val = torch.randn(t.shape, generator=g, dtype=torch.float64)
            t.copy_(val.to(t.dtype))
    return module


def calibrate_norms(model, x):
    """Running statistics of one train-mode batch (momentum 1), so that the eval
    activations of a randomised deep model stay O(1) instead of growing with depth
    (ill-conditioned eval comparisons otherwise). Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, InPlaceABN))]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


def small_ce2p(context="psp", norm="inplace_abn_sync", dtype=torch.float32, num_classes=20,
               seed=0):
    """(CE2P in eval mode, randomised, input size (H, W)): layers 1,1,1,1, width 1/8;
    pyramid_oc at output stride 8 on 45 x 53 (a 6 x 7 map fits its 6 x 6 regions),
    the others at stride 16 on 37 x 45 (odd sizes)."""
    stride = 8 if context == "pyramid_oc" else 16
    size = (45, 53) if context == "pyramid_oc" else (37, 45)
    model = CE2P(num_classes=num_classes, context=context, output_stride=stride, norm=norm,
                 layers=(1, 1, 1, 1), width_mult=0.125)
    randomize(model, seed)
    return model.to(dtype).eval(), size


def flat(out):
    """CE2P's [[parsing, fusion], [edge]] as a list."""
    return [out[0][0], out[0][1], out[1][0]]


def assert_close_rel(actual, expected, rtol, name=""):
    """|actual - expected| <= rtol * max|expected| elementwise."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = float(expected.abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rtol * max(scale, 1e-30), f"{name}: max error {err:.3g}, max|out| {scale:.3g}"


class OpRecorder(TorchDispatchMode):
    """Records the namespaces::names of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))

    def lipfast_ops(self):
        return {op for op in self.ops if op.startswith("lipfast::")}


def lipfast_ops_called(model, x):
    rec = OpRecorder()
    with torch.no_grad(), rec:
        model(x)
    return rec.lipfast_ops()
