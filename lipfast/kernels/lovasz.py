"""Triton kernel of ``lipfast::lovasz_softmax_loss``: the Lovász gradient step.

After the batched sort of the (set, class) x pixels error matrix, one program per
row fuses, over the sorted arrays, in blocks of ``BLOCK`` positions with a running
carry: the integer cumsum of the sorted foreground flags g, I_k = G - cumsum(g)_k,
U_k = G + k - cumsum(g)_k, the Jaccard differences in closed form
(grad_1 = 1 - I_1 / U_1; k >= 2: 1 / U_k if g_k else I_k / (U_k (U_k - 1))),
the mask of ignored positions (error < 0 -> grad 0) and the dot product
loss_row = sum_k max(e_k, 0) grad_k. It writes grad (row-major like e) and
loss_row. float32 and float64 rows (float64 runs under TRITON_INTERPRET=1 in the
tests; on a GPU the loss routes float64 to the PyTorch path).

Configuration (``lipfast.kernels._tuning``, kernel name ``lovasz``): BLOCK,
num_warps (num_stages 1: no dot); key: the power-of-two bucket of the row length
and the dtypes; a block wider than max(64, n padded) is dropped; registers are
estimated from the [BLOCK] vectors and the cumsum over warps. Plain stores only:
trials need no reset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning

# (BLOCK, num_warps); the first valid one is the default
SPACE = [(1024, 4), (2048, 8), (512, 4), (4096, 8), (256, 2), (128, 4), (64, 2)]
CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in SPACE]


def _valid(kw, warps, args):
    return kw["BLOCK"] <= max(64, triton.next_power_of_2(args["n"]))


def _res(kw, warps, stages, args):
    return 40 + 12 * kw["BLOCK"] // (32 * warps), 8 * kw["BLOCK"]


@_tuning.autotuned("lovasz", CONFIGS, ["N_B"], _valid, _res)
@triton.jit(do_not_specialize=["N_B"])
def _lovasz_grad_kernel(e_ptr, g_ptr, gsum_ptr, grad_ptr, loss_ptr, n, N_B, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n
    gs = tl.load(gsum_ptr + row)  # int32 G
    carry = gs * 0
    acc = tl.zeros([BLOCK], dtype=e_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        e = tl.load(e_ptr + base + offs, mask=m, other=-1.0)
        g = tl.load(g_ptr + base + offs, mask=m, other=0).to(tl.int32)
        cg = tl.cumsum(g, 0) + carry
        carry += tl.sum(g, 0)
        inter = (gs - cg).to(e.dtype)
        union = (gs + offs + 1 - cg).to(e.dtype)
        grad = tl.where(g != 0, 1.0 / union, inter / (union * tl.maximum(union - 1.0, 1.0)))
        grad = tl.where(offs == 0, 1.0 - inter / union, grad)
        grad = tl.where(e >= 0, grad, 0.0)
        tl.store(grad_ptr + base + offs, grad, mask=m)
        acc += tl.maximum(e, 0.0) * grad
    tl.store(loss_ptr + row, tl.sum(acc, 0))


def jaccard_grad(e_sorted: torch.Tensor, g_sorted: torch.Tensor, gsum: torch.Tensor,
                 block: int | None = None, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad like e_sorted, loss per row) for ... x N sorted errors (float32/64,
    ignored positions < 0), sorted foreground flags (bool) and G (int32, ... x 1).
    ``block`` (min(block, n padded)) or ``config`` (dict) force a configuration."""
    shape = e_sorted.shape
    n = shape[-1]
    e = e_sorted.reshape(-1, n).contiguous()
    g = g_sorted.reshape(-1, n).contiguous().view(torch.uint8)
    gs = gsum.reshape(-1).to(torch.int32).contiguous()
    rows = e.shape[0]
    grad = torch.empty_like(e)
    loss = torch.empty(rows, dtype=e.dtype, device=e.device)
    if rows == 0:
        return grad.reshape(shape), loss.reshape(shape[:-1])
    if n == 0:
        return grad.reshape(shape), loss.zero_().reshape(shape[:-1])
    explicit = dict(config or {})
    if block:
        explicit["BLOCK"] = min(int(block), triton.next_power_of_2(n))
    _tuning.launch("lovasz", (rows,), (e, g, gs, grad, loss, n, _tuning.bucket(n)), {}, explicit)
    return grad.reshape(shape), loss.reshape(shape[:-1])
