"""The op behind :func:`lipfast.losses.lovasz_softmax`: ``lipfast::lovasz_softmax_loss``,
the Lovász-Softmax loss (Berman et al. 2018).

Exact algorithm of SPEC section 3, vectorised over classes (and images for
``per_image=True``), with no Python loop over classes and no host
synchronisation on the GPU path:

- inputs: ``x`` (B x C x H x W logits, or probabilities with
  ``from_logits=False``) and ``labels`` (B x H x W, uint8/int8/int16/int32/int64).
  ``from_logits=True`` applies the softmax over C inside the op; the math runs in
  float32 for half/bfloat16/float32 inputs (float64 for float64).
- pixel sets: ``per_image=False`` (SCHP's setting) makes one set of all B*H*W
  pixels (S = 1), ``per_image=True`` one set per image (S = B).
- for every set and every class c used (``classes`` = 'present' | 'all' | list of
  class ids; a list is taken as given, duplicates counted twice, as Berman's
  code): fg = [y == c], e = |fg - P_c|; ONE batched ``torch.sort`` of the
  S x K x P error matrix along the pixel axis (descending); g = fg in that order;
  G = sum g; I_k = G - cumsum(g)_k; U_k = G + cumsum(1 - g)_k = G + k - cumsum(g)_k;
  J_k = 1 - I_k / U_k; grad_1 = J_1, grad_k = J_k - J_{k-1};
  loss_c = dot(e_sorted, grad).
- ``loss`` = mean over the classes used of each set (0 if none), then the mean
  over sets (per_image: every image counts, an image with no valid pixel or no
  present class contributes 0, as Berman's ``mean`` of per-image losses).

Ignored pixels (label == ignore_index) are masked, not removed (removing them
would give data-dependent shapes, i.e. a host sync): their error is set to -1
and their fg to 0. Every valid error is in [0, 1], so after the descending sort
the n valid pixels of a set occupy positions 1..n exactly (the -1 entries come
strictly after them). Hence for k <= n, cumsum(g)_k, k - cumsum(g)_k, I_k, U_k,
J_k and grad_k are those of the reference on the valid pixels alone (G is
unchanged too: ignored pixels have g = 0). Positions k > n (ignored pixels)
would still get a nonzero Jaccard difference (U keeps growing), so their
``grad`` is multiplied by [e_sorted >= 0] (0 there) and their error clamped to 0:
they add nothing to the dot product nor to the gradient. If every pixel of a set
is ignored, every loss_c is 0 and no class is 'present' -> loss 0, all gradients
0, no NaN (U_k >= 1 always, see below).

Jaccard differences are computed in closed form instead of subtracting
neighbouring J values (mathematically identical, no cancellation when J is near
1 for millions of pixels in float32): with I_0 = U_0 = G,
g_k = 1: I_k = I_{k-1} - 1, U_k = U_{k-1}          -> grad_k = 1 / U_k
g_k = 0: I_k = I_{k-1},     U_k = U_{k-1} + 1      -> grad_k = I_k / (U_k (U_k - 1))
for k >= 2 (U_k - 1 = U_{k-1} >= 1), and grad_1 = J_1 = 1 - I_1 / U_1
(U_1 >= 1). The counts cumsum(g) are integer (int32) cumsums, exact for any size.

Gradient: the forward also returns d loss / d x (same shape as x, float32 /
float64): d loss / d e at sorted position k is grad_k * [class used] /
(classes used) / S; it is scattered back to pixel order with the sort
permutation (no second sort) and multiplied by d e / d P = sign(P - fg)
(0 at P == fg, as ``torch.abs``'s derivative), then, for ``from_logits``, taken
through the softmax: dz = p * (dP - sum_c p dP). The registered backward only
scales it by the incoming gradient. Order and grad are constants, as in the
SPEC (the gradient flows through e only).

The description above is the vectorised PyTorch path (``_lovasz_forward``),
which serves CUDA float64 and CUDA without Triton. On CPU the op runs the C++
kernel below; on CUDA the Triton-assisted version of the PyTorch path.

Registered op: ``lipfast::lovasz_softmax_loss(x, labels, classes: int[],
present: bool, per_image: bool, ignore_index: int, from_logits: bool) -> (loss,
dloss_dx)``; schema in C++ (``csrc/ops/lovasz.cpp``), registered here: the CUDA
kernel, a fake kernel (``torch.compile``) and ``register_autograd``.

CPU kernel (C++, ``csrc/ops/cpu/lovasz_kernel.cpp``): for logits only the
per-pixel log-sum-exp is stored and p = exp(x - lse) is recomputed where it is
read; one pass over the labels for the per-class counts G and the label check;
then parallel over (pixel set, distinct class used): the errors of the set's
valid pixels as (key, payload) pairs (key: the bits of e >= 0, which order like
the values; payload: pixel offset, fg, sign of p - fg), an LSD radix sort
(11-bit digits, constant digits skipped), one descending walk for the integer
cumsum, the same closed-form Jaccard differences, the dot product (double
accumulator) and d loss / d p written straight to the pixel; a class absent
from the set needs no sort (its Jaccard gradient is 1 at the largest error, 0
elsewhere); finally the softmax backward in place. Ignored pixels are skipped,
not masked. No classes x pixels temporaries: besides the gradient (the size of
x) and the log-sum-exp (x / C), two pair buffers per running chunk of tasks
(8 bytes per valid pixel of a set for float32, 16 for float64: 2 x 14 MB at
LIP size with per_image=False); the number of chunks is limited so that these
buffers never exceed max(size of x, 64 MiB) in all, whatever the thread count. Deterministic, independent of the thread count; ties in
the errors are broken differently from ``torch.sort`` (this changes which of
the tied pixels gets which Jaccard difference, not the loss). Inputs above
2^30 elements are refused (ValueError).

Measured on this project's 2-core AMD EPYC (shared with other jobs, so one
thread, float32, 'present', forward + gradient, median of 3), C++ kernel vs the
vectorised PyTorch path: B=2, C=20, 473x473 (SCHP's shape after the
119 -> 473 upsampling): 254 ms vs 1769 ms (7.0x), per_image 256 vs 1852 ms
(7.2x); B=2, 119x119: 14 vs 52 ms (3.7x); B=4, 64x64: 8.1 vs 29 ms; B=2, C=5,
16x16: 0.1 vs 0.5 ms; B=8, 32x32 per_image: 4.5 vs 11.9 ms. Faster in every
case measured, so CPU always uses it. Recomputing p instead of storing it
costs about 30% of the kernel's time (C x H x W extra exps) and saves one
x-sized tensor at the forward's peak.

Peak memory of forward + backward at LIP size (B=8, C=20, 473x473 float32
logits = 138 MB; peak RSS above the inputs in a fresh process, including the
138 MB gradient; ``python benchmarks/loss.py --full``, 2 threads): lipfast
285 MB (1.5 s): the saved gradient and the returned one scaled by the incoming
gradient, 138 MB each, plus the lse; the forward alone peaks lower (gradient,
lse, pair buffers). The vectorised PyTorch path: 1763 MB (18 s); Berman's
per-class eager loop: 1394 MB (15.7 s). (Before this kernel stopped storing p
and stopped materialising a zero gradient for its second output: 410-418 MB.)

Label range: labels outside [0, C) other than ``ignore_index`` raise ValueError
on CPU (from the C++ counting pass). On CUDA the same condition goes to
``torch._assert_async`` (no host sync; a device-side assert fires
asynchronously) -- that path is not exercised by the CPU test-suite.

Second derivatives are not implemented: the gradient is computed by the
forward and treated as a constant, so a double backward through
``lovasz_softmax`` (``create_graph=True``, then differentiating the gradient)
raises NotImplementedError instead of returning a silently wrong value.

Triton: on CUDA (float32 math, i.e. every input dtype but float64) the step after
the sort -- cumsum, Jaccard differences, masking and dot product per row -- is one
kernel, :func:`lipfast.kernels.lovasz.jaccard_grad`; the sort itself is
``torch.sort``. Float64 on CUDA runs the same step as PyTorch ops
(``_jaccard_grad_torch``). The kernel is tested under TRITON_INTERPRET=1 on CPU;
it has not been run on a GPU here.
"""

from __future__ import annotations

import torch

from .. import _ext

_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_lovasz_args(x: torch.Tensor, labels: torch.Tensor) -> None:
    """Shape / dtype / device checks that need no host synchronisation."""
    if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("lovasz_softmax expects tensors for the predictions and the labels")
    if x.dim() != 4:
        raise ValueError(f"lovasz_softmax expects B x C x H x W predictions, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"lovasz_softmax expects floating-point predictions, got {x.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"lovasz_softmax expects integer labels (uint8, int8, int16, int32 or "
                        f"int64), got {labels.dtype}")
    if labels.dim() != 3 or labels.shape[0] != x.shape[0] or labels.shape[1:] != x.shape[2:]:
        raise ValueError(f"lovasz_softmax: labels of shape {tuple(labels.shape)} do not match "
                         f"predictions of shape {tuple(x.shape)} (expected B x H x W = "
                         f"{(x.shape[0], *x.shape[2:])})")
    if x.shape[1] == 0:
        raise ValueError("lovasz_softmax: the predictions have no classes (C == 0)")
    if labels.device != x.device:
        raise ValueError(f"lovasz_softmax: predictions on {x.device} but labels on "
                         f"{labels.device}")


def _bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    lab = labels.long()
    return ((lab < 0) | (lab >= num_classes)) & (lab != ignore_index)


def _jaccard_grad_torch(e_sorted, g, gsum):
    """(grad, loss per row): Jaccard differences in closed form over the sorted
    rows, ignored positions (e < 0) masked; PyTorch path of the Triton kernel
    :func:`lipfast.kernels.lovasz.jaccard_grad`."""
    acc = e_sorted.dtype
    n = e_sorted.shape[-1]
    cg = torch.cumsum(g, dim=-1, dtype=torch.int32)  # cumsum(g)_k, exact
    kpos = torch.arange(1, n + 1, dtype=torch.int32, device=e_sorted.device)
    inter = (gsum - cg).to(acc)  # I_k
    union = (gsum + kpos - cg).to(acc)  # U_k >= 1
    grad = torch.where(g, 1.0 / union, inter / (union * (union - 1.0).clamp_min(1.0)))
    if n > 0:
        grad[..., 0] = 1.0 - inter[..., 0] / union[..., 0]  # J_1
    grad = grad * (e_sorted >= 0)  # valid positions: 1..n_valid
    return grad, (e_sorted.clamp_min(0) * grad).sum(-1)


def _lovasz_forward(x, labels, classes, present, per_image, ignore_index, from_logits,
                    kernels=None):
    """(loss in x.dtype, d loss / d x in the accumulation dtype). No host sync."""
    b, c, h, w = x.shape
    acc = _acc_dtype(x)
    xf = x.to(acc)
    p = torch.softmax(xf, dim=1) if from_logits else xf
    lab = labels.long()
    if per_image:
        s, n = b, h * w
        ps = p.reshape(b, c, n)
        ls = lab.reshape(b, n)
    else:
        s, n = 1, b * h * w
        ps = p.transpose(0, 1).reshape(1, c, n)  # pixel order (b, h, w), as Berman
        ls = lab.reshape(1, n)
    k_all = list(range(c))
    full = list(classes) == k_all
    # an explicit class list: one small host-to-device copy (never a device-to-host read)
    sel = None if full else torch.tensor(classes, dtype=torch.long).to(x.device,
                                                                       non_blocking=True)
    kk = len(classes)
    if not full:
        ps = ps.index_select(1, sel)  # S x K x N
    cls = torch.arange(c, device=x.device) if full else sel
    valid = ls != ignore_index  # S x N
    fg = (ls.unsqueeze(1) == cls.view(1, kk, 1)) & valid.unsqueeze(1)  # S x K x N
    e = (fg.to(acc) - ps).abs_()
    e = torch.where(valid.unsqueeze(1), e, torch.full((), -1.0, dtype=acc, device=x.device))
    e_sorted, perm = torch.sort(e, dim=-1, descending=True)
    g = torch.gather(fg, -1, perm)  # sorted fg (bool)
    gsum = fg.sum(-1, keepdim=True, dtype=torch.int32)  # G
    if kernels is not None:
        grad, loss_c = kernels.jaccard_grad(e_sorted, g, gsum)
    else:
        grad, loss_c = _jaccard_grad_torch(e_sorted, g, gsum)
    if present:
        used = (gsum.squeeze(-1) > 0).to(acc)
    else:
        used = torch.ones((s, kk), dtype=acc, device=x.device)
    n_used = used.sum(-1, keepdim=True).clamp_min(1.0)  # S x 1
    weight = used / n_used / s  # S x K
    loss = (loss_c * weight).sum()
    # d loss / d e in pixel order: scatter the per-position grad back (no second sort)
    ge = torch.empty_like(grad).scatter_(-1, perm, grad * weight.unsqueeze(-1))
    dps = ge * torch.sign(ps - fg.to(acc))  # d e / d P = sign(P - fg)
    if full:
        dp = dps
    else:
        dp = torch.zeros((s, c, n), dtype=acc, device=x.device).index_add_(1, sel, dps)
    if per_image:
        dp = dp.reshape(b, c, h, w)
    else:
        dp = dp.reshape(c, b, h, w).transpose(0, 1)
    if from_logits:
        dx = p * (dp - (dp * p).sum(1, keepdim=True))
    else:
        dx = dp.contiguous()
    return loss.to(x.dtype), dx.contiguous()


def _check_label_range(x, labels, ignore_index):
    if x.device.type == "cuda":
        # no host sync: a device-side assert fires asynchronously
        torch._assert_async(~_bad_labels(labels, x.shape[1], ignore_index).any(),
                            "lovasz_softmax: labels out of range [0, C) (and != ignore_index)")
        return
    bad = _bad_labels(labels, x.shape[1], ignore_index)
    if bad.any():
        raise ValueError(f"lovasz_softmax: labels must be in [0, {x.shape[1]}) or equal "
                         f"ignore_index={ignore_index}; found {labels.long()[bad][0].item()}")


# The op's schema is C++ (csrc/ops/lovasz.cpp), as is the CPU kernel
# (csrc/ops/cpu/lovasz_kernel.cpp); registered here: the CUDA path, the fake
# kernel and the autograd formula.
_ext.load()


def _triton_kernels(x: torch.Tensor):
    """lipfast.kernels.lovasz for a non-float64 CUDA input, else None (float64 and
    missing Triton, with a one-time warning, go to the PyTorch path)."""
    from .. import kernels

    return kernels.load("lovasz", "lipfast.lovasz_softmax", x.dtype)


@torch.library.register_kernel("lipfast::lovasz_softmax_loss", "cuda")
def _lovasz_cuda(x, labels, classes, present, per_image, ignore_index, from_logits):
    check_lovasz_args(x, labels)
    _check_label_range(x, labels, ignore_index)
    return _lovasz_forward(x, labels, classes, present, per_image, ignore_index, from_logits,
                           kernels=_triton_kernels(x))


@torch.library.register_fake("lipfast::lovasz_softmax_loss")
def _lovasz_fake(x, labels, classes, present, per_image, ignore_index, from_logits):
    return x.new_empty(()), x.new_empty(x.shape, dtype=_acc_dtype(x))


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    _, dx = output
    # dx stays a differentiable output (not mark_non_differentiable): under
    # create_graph=True the saved dx then unpacks attached to this node, so a
    # second derivative reaches _NoDoubleBackward and raises instead of silently
    # treating the gradient as a constant. Its own incoming gradient is ignored.
    ctx.save_for_backward(dx)
    ctx.x_dtype = x.dtype
    # dx's incoming gradient is never used: no zeros of x's size for it
    ctx.set_materialize_grads(False)


class _NoDoubleBackward(torch.autograd.Function):
    """``dx * dloss`` whose derivative raises: the first-order gradient of the
    Lovász op is a saved constant, so a second derivative through it would
    silently be wrong (zero); differentiating it raises instead."""

    @staticmethod
    def forward(dx, dloss):
        return dx * dloss

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "lipfast::lovasz_softmax_loss: second derivatives (double backward) of "
            "lovasz_softmax are not implemented")


def _backward(ctx, dloss, ddx):
    if dloss is None:  # only dx was used downstream: it carries no gradient
        return None, None, None, None, None, None, None
    (dx,) = ctx.saved_tensors
    dloss = dloss.to(dx.dtype)
    if torch.is_grad_enabled() and (dx.requires_grad or dloss.requires_grad):
        grad = _NoDoubleBackward.apply(dx, dloss)  # create_graph=True: a derivative raises
    else:
        grad = dx * dloss
    return grad.to(ctx.x_dtype), None, None, None, None, None, None


torch.library.register_autograd("lipfast::lovasz_softmax_loss", _backward,
                                setup_context=_setup_context)
