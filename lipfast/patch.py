"""Drop-in patching: put lipfast's layers into an existing model.

``lipfast.patch(model, norms=True, context=True, inplace=True)`` walks any
``nn.Module`` (a user's own SCHP, CE2P or OCNet instance) and replaces, keeping
the very same parameter and buffer tensors (so an optimizer built before the
call still holds them, and checkpoints load as before):

- **context**: OCNet's object-context modules, recognised by class name
  (``SelfAttentionBlock2D``, ``PyramidSelfAttentionBlock2D``, ``BaseOC_Module``,
  ``BaseOC_Context_Module``, ``Pyramid_OC_Module``, ``ASP_OC_Module``) and by
  OCNet's structure (``f_query`` is the same module as ``f_key``, 1x1
  projections, ``stages`` / ``conv_bn_dropout`` / ``up_dr`` / ASP branches)
  -> :mod:`lipfast.nn.oc`'s modules (fused attention, no N x N map), which adopt
  the original submodules. Before a swap the original and the lipfast module
  are run side by side on a small probe input (eval mode, on copies, with the
  zero-initialised ``W`` projections randomised so the attention is really
  compared), in the dtype of the module's parameters with autocast off, and
  must agree within that dtype's tolerance: max |difference| <= tol *
  max(1, max |output|), tol = 1e-9 (float64), 1e-4 (float32), 1e-2 (float16),
  5e-2 (bfloat16); a module whose outputs differ is left alone and reported.
  lipfast computes the shared key/query projection once per forward where OCNet
  runs it twice: outputs and gradients are the same, running statistics of
  that norm see one update per step instead of two.
- **norms**: modules that look like mapillary's or a vendored In-Place ABN
  (class name ``ABN``, ``InPlaceABN`` or ``InPlaceABNSync`` with ``weight``,
  ``bias``, ``running_mean``, ``running_var``, ``eps``, ``momentum``,
  ``activation`` and ``activation_param`` or ``slope``) -> lipfast's ``ABN`` /
  ``InPlaceABN`` / ``InPlaceABNSync``. Which one is decided by the original's
  arithmetic, measured on a copy: the in-place layers scale by ``|w| + eps``
  (mapillary's in-place ABN and the vendored CUDA copies do), ``ABN`` by ``w``
  (mapillary's ABN and pure-PyTorch vendored copies such as SCHP's CPU one do).
  When the original cannot run on a probe (e.g. its CUDA extension is not
  built) the class name decides. ``nn.BatchNorm2d`` immediately followed by
  ``nn.ReLU`` / ``nn.LeakyReLU`` inside an ``nn.Sequential`` -> one lipfast
  ``ABN`` with that activation (same arithmetic as the pair) and an
  ``nn.Identity`` in the activation's slot, so indices and state_dict keys stay
  as they were.
- Everything else is left alone; the report lists what looked like a
  candidate but was not swapped, and why.

State dicts keep their keys: a swapped norm whose original had no
``num_batches_tracked`` buffer (the vendored copies) does not add one to the
state_dict, so checkpoints go back and forth between the original and the
patched model. Patching twice is a no-op (lipfast's own modules are skipped).
``inplace=False`` patches a deep copy and leaves ``model`` untouched. The
patched model is ``report.model``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .nn import abn as _abn_mod
from .nn import oc as _oc

__all__ = ["patch", "PatchReport"]

_NORM_NAMES = ("ABN", "InPlaceABN", "InPlaceABNSync")
_OC_NAMES = ("SelfAttentionBlock2D", "PyramidSelfAttentionBlock2D", "BaseOC_Module",
             "BaseOC_Context_Module", "Pyramid_OC_Module", "ASP_OC_Module")
_LIPFAST_TYPES = (_abn_mod.ABN, _oc._SelfAttentionBase, _oc._BaseOC, _oc.PyramidOCModule,
                  _oc.ASPOCModule)


@dataclass
class PatchReport:
    """``swapped``: (name, original class, lipfast class); ``left``: (name, class,
    reason) for modules that looked like candidates but were not swapped;
    ``model``: the patched model (``model`` itself, or its copy for inplace=False)."""

    model: nn.Module | None = None
    swapped: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lipfast.patch: swapped {len(self.swapped)} module(s), "
                 f"left {len(self.left)} candidate(s) alone"]
        for name, old, new in self.swapped:
            lines.append(f"  swapped {name or '<root>'}: {old} -> {new}")
        for name, cls, why in self.left:
            lines.append(f"  left    {name or '<root>'} ({cls}): {why}")
        return "\n".join(lines)

    def counts(self) -> dict:
        """Number of swaps per (original class -> lipfast class)."""
        out: dict = {}
        for _, old, new in self.swapped:
            out[f"{old} -> {new}"] = out.get(f"{old} -> {new}", 0) + 1
        return out


# ----------------------------------------------------------------- helpers
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _ref_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        if t is not None and t.is_floating_point():
            return t
    return None


def _set_child(parent: nn.Module, name: str, new: nn.Module) -> None:
    setattr(parent, name, new)  # works for Sequential / ModuleList / ModuleDict children too


def _drop_counter_hook(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "num_batches_tracked", None)


class _TrainingState:
    """Puts a module tree in eval mode and restores each submodule's flag after."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        self.saved = [(m, m.training) for root in self.modules for m in root.modules()]
        for root in self.modules:
            root.eval()

    def __exit__(self, *exc):
        for m, flag in self.saved:
            m.training = flag


# Probe tolerance per dtype the module runs in: |got - want| <= tol * max(1, max |want|).
# Two correct implementations differ by rounding only (summation order, fused
# attention vs an explicit similarity map); a different formula differs by O(1).
_PROBE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
              torch.bfloat16: 5e-2}


def _probe_tol(dtype: torch.dtype) -> float:
    return _PROBE_TOL.get(dtype, 1e-4)


def _no_autocast(device: torch.device):
    """The probe runs in the dtype of the module's parameters, also when patch() is
    called under autocast."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(a matches b within the probe tolerance of ``dtype``, max abs error)."""
    if a.shape != b.shape:
        return False, float("inf")
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(b.abs().max()) if b.numel() else 0.0)
    return err <= _probe_tol(dtype) * scale, err


# ----------------------------------------------------------------- norms
def _looks_like_abn(m: nn.Module) -> bool:
    if type(m).__name__ not in _NORM_NAMES or isinstance(m, _abn_mod.ABN):
        return False
    need = ("weight", "bias", "running_mean", "running_var", "eps", "momentum", "activation")
    return all(hasattr(m, a) for a in need) and (hasattr(m, "activation_param")
                                                 or hasattr(m, "slope"))


def _abn_config(m: nn.Module) -> dict:
    act = m.activation
    act = getattr(act, "value", act)  # enum-style activations
    act = str(act).lower()
    if act == "none":
        act = "identity"
    if hasattr(m, "activation_param"):
        param = float(m.activation_param)
    elif act == "elu":
        param = 1.0  # the vendored copies run elu with its default alpha, ignoring slope
    else:
        param = float(m.slope)
    w, rm = m.weight, m.running_mean
    num = getattr(m, "num_features", None)
    if num is None:
        num = (w if w is not None else rm).numel()
    track = getattr(m, "track_running_stats", rm is not None)
    return dict(num_features=int(num), eps=float(m.eps), momentum=m.momentum,
                affine=w is not None, track_running_stats=bool(track) and rm is not None,
                activation=act, activation_param=param)


def _apply_act(z: torch.Tensor, act: str, param: float) -> torch.Tensor:
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, param)
    if act == "elu":
        return torch.nn.functional.elu(z, param)
    if act == "relu":
        return torch.relu(z)
    return z


def _probe_abn_math(m: nn.Module, cfg: dict) -> str | None:
    """'abs' (scale |w| + eps), 'plain' (scale w) or None when the copy cannot run
    or matches neither."""
    if not cfg["affine"] or not cfg["track_running_stats"]:
        return None
    ref = _ref_tensor(m)
    try:
        probe = copy.deepcopy(m).eval()
        c = cfg["num_features"]
        with torch.no_grad():
            w = torch.linspace(-1.0, 1.0, c, dtype=torch.float64)
            w = torch.where(w.abs() < 0.25, w.sign() * 0.5 + (w == 0) * 0.5, w)
            probe.weight.copy_(w)
            probe.bias.copy_(torch.linspace(-0.1, 0.1, c, dtype=torch.float64))
            probe.running_mean.zero_()
            probe.running_var.fill_(1.0)
            # the values as stored in the norm's own dtype (float32, bfloat16, ...)
            w = probe.weight.detach().double().cpu()
            b = probe.bias.detach().double().cpu()
            x = torch.full((2, c, 1, 1), 0.5, dtype=ref.dtype, device=ref.device)
            with _no_autocast(ref.device):
                y = probe(x.clone()).double().cpu().reshape(2, c)[0]
    except Exception:  # noqa: BLE001 - e.g. a CUDA-only extension on a CPU tensor
        return None
    eps, act, param = cfg["eps"], cfg["activation"], cfg["activation_param"]
    inv = 1.0 / (1.0 + eps) ** 0.5
    cands = {"plain": _apply_act(0.5 * w * inv + b, act, param),
             "abs": _apply_act(0.5 * (w.abs() + eps) * inv + b, act, param)}
    errs = {k: float((y - v).abs().max()) for k, v in cands.items()}
    best = min(errs, key=errs.get)
    # The two candidates differ by >= 0.02 on the negative-weight channels; rounding
    # of the output is ~1e-7 (float32) or ~4e-3 (bfloat16) of values <= 0.7.
    tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 1e-2
    return best if errs[best] < tol else None


def _new_norm(m: nn.Module, cfg: dict, math: str | None):
    """The lipfast norm for the vendored/mapillary module ``m``, or (None, reason)."""
    name = type(m).__name__
    act = cfg["activation"]
    if act not in ("leaky_relu", "elu", "identity", "relu"):
        return None, f"unknown activation {m.activation!r}"
    if math is None:
        math = "plain" if name == "ABN" else "abs"
        how = "by class name (the module could not be probed)"
    else:
        how = "by its measured arithmetic"
    if math == "plain":
        cls = _abn_mod.ABN
    else:
        if act == "relu" or (act == "leaky_relu" and cfg["activation_param"] <= 0):
            return None, "in-place arithmetic with a non-invertible activation"
        cls = _abn_mod.InPlaceABNSync if name == "InPlaceABNSync" else _abn_mod.InPlaceABN
    kwargs = dict(cfg)
    new = cls(**kwargs)
    if cls is _abn_mod.InPlaceABNSync and hasattr(m, "group"):
        new.group = m.group
    return new, how


def _adopt_tensors(new: nn.Module, old: nn.Module) -> None:
    """Makes ``new`` use ``old``'s parameter and buffer objects."""
    for pname in ("weight", "bias"):
        t = getattr(old, pname, None)
        if t is not None and pname in new._parameters:
            if not isinstance(t, nn.Parameter):
                t = nn.Parameter(t, requires_grad=t.requires_grad)
            new._parameters[pname] = t
    for bname in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(old, bname, None)
        if isinstance(t, torch.Tensor) and new._buffers.get(bname) is not None:
            new._buffers[bname] = t
    if new._buffers.get("num_batches_tracked") is not None and (
            getattr(old, "num_batches_tracked", None) is None):
        ref = new.running_mean if new.running_mean is not None else None
        if ref is not None:
            new._buffers["num_batches_tracked"] = new.num_batches_tracked.to(ref.device)
        new.register_state_dict_post_hook(_drop_counter_hook)
    new.train(old.training)


def _swap_norm(m: nn.Module):
    cfg = _abn_config(m)
    new, how = _new_norm(m, cfg, _probe_abn_math(m, cfg))
    if new is None:
        return None, how
    _adopt_tensors(new, m)
    return new, how


def _bn_act(bn: nn.Module, act: nn.Module):
    """lipfast ABN equivalent to nn.BatchNorm2d followed by ReLU / LeakyReLU."""
    if isinstance(act, nn.LeakyReLU):
        kind, param = "leaky_relu", float(act.negative_slope)
    else:
        kind, param = "relu", 0.01
    new = _abn_mod.ABN(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                       track_running_stats=bn.track_running_stats, activation=kind,
                       activation_param=param)
    _adopt_tensors(new, bn)
    return new


# ----------------------------------------------------------------- OC modules
def _attn_parts_ok(m: nn.Module) -> str | None:
    """None when ``m`` has OCNet's self-attention structure, else the reason."""
    for a in ("f_key", "f_query", "f_value", "W"):
        if not isinstance(getattr(m, a, None), nn.Module):
            return f"no {a} submodule"
    if m.f_query is not m.f_key:
        return "f_query is not the same module as f_key (lipfast's attention has query == key)"
    if not (isinstance(m.f_key, nn.Sequential) and len(m.f_key) >= 1
            and isinstance(m.f_key[0], nn.Conv2d)):
        return "f_key is not a Sequential starting with a Conv2d"
    for a in ("f_value", "W"):
        if not isinstance(getattr(m, a), nn.Conv2d):
            return f"{a} is not a Conv2d"
    if m.f_key[0].kernel_size != (1, 1) or m.f_value.kernel_size != (1, 1):
        return "the projections are not 1x1 convolutions"
    if not isinstance(getattr(m, "scale", None), int):
        return "no integer scale attribute"
    return None


def _identity_norm(c):
    return nn.Identity()


def _build_attention(m: nn.Module, pyramid: bool):
    why = _attn_parts_ok(m)
    if why:
        return None, why
    cls = _oc.PyramidSelfAttentionBlock2D if pyramid else _oc.SelfAttentionBlock2D
    new = cls(m.f_value.in_channels, m.f_key[0].out_channels, m.f_value.out_channels,
              m.W.out_channels, m.scale, norm_layer=_identity_norm)
    new.f_key = m.f_key
    new.f_query = new.f_key
    new.f_value = m.f_value
    new.W = m.W
    if not pyramid and hasattr(m, "pool"):
        new.pool = m.pool
    return new, None


def _lipfast_stages(m: nn.Module, kind):
    stages = getattr(m, "stages", None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        return None, "no stages ModuleList"
    if not all(isinstance(s, kind) for s in stages):
        return None, "its attention stages were not converted"
    return stages, None


def _build_base(m: nn.Module, context_only: bool):
    stages, why = _lipfast_stages(m, _oc.SelfAttentionBlock2D)
    if why:
        return None, why
    head = getattr(m, "conv_bn_dropout", None)
    if not (isinstance(head, nn.Sequential) and isinstance(head[0], nn.Conv2d)):
        return None, "no conv_bn_dropout Sequential starting with a Conv2d"
    s0 = stages[0]
    cls = _oc.BaseOCContextModule if context_only else _oc.BaseOCModule
    expect_in = s0.in_channels if context_only else 2 * s0.in_channels
    if head[0].in_channels != expect_in:
        return None, "conv_bn_dropout's input width does not match the stages"
    new = cls(s0.in_channels, head[0].out_channels, s0.key_channels, s0.value_channels, 0.0,
              [s.scale for s in stages], norm_layer=_identity_norm)
    new.stages = stages
    new.conv_bn_dropout = head
    return new, None


def _build_pyramid(m: nn.Module):
    stages, why = _lipfast_stages(m, _oc.PyramidSelfAttentionBlock2D)
    if why:
        return None, why
    head, up = getattr(m, "conv_bn_dropout", None), getattr(m, "up_dr", None)
    if not (isinstance(head, nn.Sequential) and isinstance(up, nn.Sequential)):
        return None, "no conv_bn_dropout / up_dr Sequentials"
    s0 = stages[0]
    if s0.in_channels < 2:
        return None, "fewer than 2 input channels"
    new = _oc.PyramidOCModule(s0.in_channels, head[0].out_channels, 0.0,
                              [s.scale for s in stages], norm_layer=_identity_norm)
    new.stages, new.conv_bn_dropout, new.up_dr = stages, head, up
    return new, None


def _build_asp(m: nn.Module):
    ctx = getattr(m, "context", None)
    if not (isinstance(ctx, nn.Sequential) and len(ctx) == 3
            and isinstance(ctx[2], _oc.BaseOCContextModule)):
        return None, "its context branch is not (conv, norm, converted BaseOC_Context_Module)"
    branches = [getattr(m, n, None) for n in ("conv2", "conv3", "conv4", "conv5",
                                              "conv_bn_dropout")]
    if not all(isinstance(b, nn.Sequential) and isinstance(b[0], nn.Conv2d) for b in branches):
        return None, "missing conv2..conv5 / conv_bn_dropout branches"
    features, out = ctx[0].in_channels, ctx[0].out_channels
    head_out = branches[4][0].out_channels
    head = "current" if head_out == 2 * out else "legacy" if head_out == out else None
    if head is None or out < 2:
        return None, f"unrecognised head width {head_out} for {out} branch channels"
    dil = tuple(int(b[0].dilation[0]) for b in branches[1:4])
    new = _oc.ASPOCModule(features, out, dil, head=head, norm_layer=_identity_norm)
    new.context = ctx
    new.conv2, new.conv3, new.conv4, new.conv5, new.conv_bn_dropout = branches
    return new, None


def _build_oc(m: nn.Module):
    name = type(m).__name__
    if name == "SelfAttentionBlock2D":
        return _build_attention(m, pyramid=False)
    if name == "PyramidSelfAttentionBlock2D":
        return _build_attention(m, pyramid=True)
    if name == "BaseOC_Module":
        return _build_base(m, context_only=False)
    if name == "BaseOC_Context_Module":
        return _build_base(m, context_only=True)
    if name == "Pyramid_OC_Module":
        return _build_pyramid(m)
    return _build_asp(m)


def _probe_shape(new: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of a probe input the module accepts."""
    if isinstance(new, _oc._SelfAttentionBase):
        c, s = new.in_channels, new.scale
    elif isinstance(new, _oc._BaseOC):
        c, s = new.in_channels, max(st.scale for st in new.stages)
    elif isinstance(new, _oc.PyramidOCModule):
        c, s = new.in_channels, max(st.scale for st in new.stages)
    else:
        c, s = new.features, 2
    side = max(7, 2 * s + 1)
    return c, side, side + 1


def _verify_oc(m: nn.Module, build) -> str | None:
    """Runs the original and its lipfast replacement (built from a copy, with
    random ``W`` weights so the attention is compared) on one probe input."""
    ref = _ref_tensor(m)
    if ref is None or not ref.is_floating_point():
        return "no floating-point parameters to probe with"
    try:
        orig = copy.deepcopy(m)
    except Exception as exc:  # noqa: BLE001
        return f"cannot copy it for the probe ({type(exc).__name__})"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sub in orig.modules():
            w = getattr(sub, "W", None)
            if isinstance(w, nn.Conv2d):
                w.weight.copy_(torch.randn(w.weight.shape, generator=gen) * 0.5)
    new, why = build(orig)
    if new is None:
        return why
    c, h, w = _probe_shape(new)
    x = torch.randn(2, c, h, w, generator=gen).to(device=ref.device, dtype=ref.dtype)
    try:
        with torch.no_grad(), _no_autocast(ref.device), _TrainingState(orig, new):
            want = orig(x.clone())
            got = new(x.clone())
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA-only extension
        return f"the original could not run on a probe input ({type(exc).__name__}: {exc})"
    ok, err = _close(got, want, ref.dtype)
    if not ok:
        return (f"lipfast's module gives different outputs on a probe input (max error "
                f"{err:.3g}, {str(ref.dtype).replace('torch.', '')} tolerance "
                f"{_probe_tol(ref.dtype):g} x max(1, max |output|))")
    return None


def _convert_children(parent: nn.Module, prefix: str, report: PatchReport, context: bool,
                      norms: bool) -> None:
    names = list(parent._modules)
    for i, name in enumerate(names):
        child = parent._modules[name]
        if child is None:
            continue
        full = _join(prefix, name)
        if isinstance(child, _LIPFAST_TYPES):
            # Already lipfast's: still visit the norms inside (e.g. an OC module built
            # with vendored norms), but it is never swapped again.
            _convert_children(child, full, report, context, norms)
            continue
        _convert_children(child, full, report, context, norms)
        cname = type(child).__name__
        if context and cname in _OC_NAMES:
            why = _verify_oc(child, _build_oc)
            if why is None:
                new, why = _build_oc(child)
            if why is None:
                new.train(child.training)
                _set_child(parent, name, new)
                report.swapped.append((full, cname, type(new).__name__))
            else:
                report.left.append((full, cname, why))
        elif norms and _looks_like_abn(child):
            new, how = _swap_norm(child)
            if new is None:
                report.left.append((full, cname, how))
            else:
                _set_child(parent, name, new)
                report.swapped.append((full, cname, f"{type(new).__name__} ({how})"))
        elif norms and type(child) is nn.BatchNorm2d:
            nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            if isinstance(parent, nn.Sequential) and isinstance(nxt, (nn.ReLU, nn.LeakyReLU)):
                new = _bn_act(child, nxt)
                _set_child(parent, name, new)
                _set_child(parent, names[i + 1], nn.Identity())
                report.swapped.append(
                    (full, f"BatchNorm2d + {type(nxt).__name__}",
                     f"ABN({new.activation}) + Identity in the activation's slot"))
            else:
                report.left.append((full, cname, "not followed by ReLU/LeakyReLU in an "
                                    "nn.Sequential (no activation to fuse)"))
        elif norms and isinstance(child, nn.SyncBatchNorm):
            report.left.append((full, cname, "SyncBatchNorm is left as it is (lipfast's Sync "
                                "norm scales by |w| + eps, a different arithmetic)"))


def patch(model: nn.Module, norms: bool = True, context: bool = True,
          inplace: bool = True) -> PatchReport:
    """Swaps lipfast's layers into ``model`` (see the module docstring) and returns a
    :class:`PatchReport`; ``report.model`` is the patched model (``model`` itself
    when ``inplace``, else a patched deep copy)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.patch expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = PatchReport(model=model)
    # A holder makes the root replaceable like any child.
    holder = nn.Module()
    holder._modules["root"] = model
    _convert_children(holder, "", report, bool(context), bool(norms))
    new_root = holder._modules["root"]
    if new_root is not model:
        if inplace:
            # The caller's object cannot be replaced: undo and say so.
            report.swapped = [s for s in report.swapped if s[0] != "root"]
            report.left.append(("", type(model).__name__, "the root module itself cannot be "
                                "replaced in place; use inplace=False (report.model) or "
                                "patch its parent"))
        else:
            report.model = new_root
    report.swapped = [(n[len("root."):] if n.startswith("root.") else "" if n == "root" else n,
                       a, b) for n, a, b in report.swapped]
    report.left = [(n[len("root."):] if n.startswith("root.") else "" if n == "root" else n,
                    a, b) for n, a, b in report.left]
    return report
