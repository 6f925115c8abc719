"""The ops behind :func:`lipfast.pose.heatmap_loss` and
:func:`lipfast.pose.generate_heatmaps`: deep-high-resolution-net.pytorch's
Gaussian joint targets (``JointsDataset.generate_target``, target_type
'gaussian') and ``JointsMSELoss(use_target_weight=True)`` (SPEC section 10),
fused: the loss and its gradient evaluate the target inside the kernel from the
joint coordinates, and no B x J x h x w target tensor exists.

The per-joint rule (float64, Python's float arithmetic; ``int()`` truncates
toward zero, also for negative values), for a joint (x, y) in pixels of the
network input of size ``image_size = (W, H)`` and heatmaps of ``w x h``:

- ``stride = (W / w, H / h)``; ``mu = trunc(x / stride + 0.5)`` per axis;
- ``t = 3 sigma``; ``ul = trunc(mu - t)``; ``br = trunc(mu + t + 1)`` (exclusive);
- ``weight = visible`` (as float32), set to 0 where ``ul >= size`` or ``br < 0``
  on either axis;
- when ``weight > 0.5`` the target is ``exp(-((X - cx)^2 + (Y - cy)^2) / (2 sigma^2))``
  for X in ``[max(0, ul_x), min(br_x, w))`` and Y likewise, 0 elsewhere, with
  ``c = ul + floor((2 t + 1) / 2)``: the reference's (6 sigma + 1)-wide patch
  indexed by ``X - ul``, centred at ``size // 2``. For integer sigma,
  ``c = mu``; for non-integer sigma this is the reference's slicing exactly
  (its patch has ``ceil(6 sigma + 1)`` entries, and for ``ul < 0`` its centre is
  not at ``mu``), so every sigma in [1e-6, 1e6] is supported.

Loss: ``(1/J) sum_j 0.5 * mean over B x h x w of ((pred - target) * w_bj)^2``
(zero-weight joints still count in 1/J), i.e.
``0.5 / (J B h w) * sum_{b,j} w_bj^2 sum_pixels (pred - target)^2``;
d loss / d heatmaps = ``dloss * w_bj^2 / (J B h w) * (pred - target)``.
No gradient for the joints or the visibilities.

Registered ops (schemas in C++, ``csrc/ops/heatmap_loss.cpp``; CPU kernels in
``csrc/ops/cpu/heatmap_loss_kernel.cpp``; registered here: the CUDA kernels,
the fake kernels, ``register_autograd``):

- ``lipfast::heatmap_loss(heatmaps, joints, visible, image_size, sigma)
  -> (loss, weight, window)``: the 0-d loss (float32; float64 for float64
  heatmaps), and the per-joint table: ``weight`` B x J float32 (the reference's
  target_weight) and ``window`` B x J x 6 int64 (``WINDOW_COLUMNS``: the drawn
  window clipped to the map, half-open and empty where nothing is drawn, and the
  Gaussian's centre). The backward needs only the heatmaps and the table.
- ``lipfast::heatmap_loss_backward(grad, heatmaps, weight, window, sigma)
  -> d heatmaps`` (contiguous, the heatmaps' dtype).
- ``lipfast::heatmap_loss_targets(joints, visible, image_size, heatmap_size,
  sigma) -> (target B x J x h x w float32, weight B x J float32)``: the targets
  materialised, ``heatmap_size = (w, h)``.

Kernels:

- CPU: C++ (parallel over the B*J maps with at::parallel_for; heatmaps read
  through their strides; the Gaussian evaluated only inside each joint's window;
  deterministic, thread-count independent).
- CUDA: the Triton kernels of :mod:`lipfast.kernels.heatmap_loss` (forward: one
  program per map computes the joint's table entry in float64 and the map's
  weighted squared error; backward: one program per map and block of pixels).
  For float64 heatmaps, or without Triton: a PyTorch path (``_torch_forward`` /
  ``_torch_backward``) that gathers only each joint's window (at most
  ``(ceil(6 sigma + 1) + 1)^2`` pixels per map), never the B x J x h x w target.
  ``heatmap_loss_targets`` on CUDA: vectorised PyTorch (``_torch_targets``).

Precision: float16/bfloat16 heatmaps are computed in float32, float64 in float64;
the loss is float32 (float64), the gradient has the heatmaps' dtype. The
float32 Gaussian (the CPU targets) is computed as the reference's numpy patch:
float32 ``-(dx^2 + dy^2) / float32(2 sigma^2)``, then exp.

Non-finite joint coordinates: ignored where ``visible == 0`` (weight 0; the
reference's int() would raise for them); where ``visible != 0`` they are an
error: CPU and the CUDA PyTorch path raise ValueError at once (the latter with
one host sync); the Triton path sets a device flag that goes to
``torch._assert_async`` (no host sync: a device-side assert at the next
synchronising call; on CPU tensors under the interpreter a RuntimeError at once).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .. import _ext

WINDOW_COLUMNS = ("x_lo", "x_hi", "y_lo", "y_hi", "cx", "cy")
SIGMA_MIN = 1e-6
SIGMA_MAX = 1e6
OWNER = "heatmap_loss"

_BAD_JOINT_MSG = ("heatmap_loss: a joint with visible != 0 has non-finite coordinates "
                  "(set visible to 0 for missing joints)")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# argument checks (no host sync)

def check_size_pair(value, name: str, owner: str = OWNER) -> tuple[int, int]:
    """``value`` as (width, height), two positive ints; TypeError / ValueError
    naming ``name`` otherwise (a tensor or array of two ints is accepted)."""
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be 2 positive ints (width, height), got "
                        f"{value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{owner}: {name} must be 2 positive ints (width, height), got "
                         f"{len(items)} values {value!r}")
    out = []
    for v in items:
        if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
            raise TypeError(f"{owner}: {name} must be 2 positive ints (width, height), got "
                            f"{value!r}")
        try:
            iv = operator.index(v)
        except TypeError:
            raise TypeError(f"{owner}: {name} must be 2 positive ints (width, height), got "
                            f"{value!r}") from None
        if iv <= 0:
            raise ValueError(f"{owner}: {name} must be 2 positive ints (width, height), got "
                             f"{value!r}")
        out.append(int(iv))
    return out[0], out[1]


def check_sigma(sigma, owner: str = OWNER) -> float:
    """``sigma`` as a float, finite and in [SIGMA_MIN, SIGMA_MAX]."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"{owner}: sigma must be a real number, got {sigma!r}")
    s = float(sigma)
    if not (math.isfinite(s) and SIGMA_MIN <= s <= SIGMA_MAX):
        raise ValueError(f"{owner}: sigma must be a finite number in [{SIGMA_MIN:g}, "
                         f"{SIGMA_MAX:g}], got {sigma!r}")
    return s


def check_joint_args(joints, visible, owner: str = OWNER) -> None:
    """joints B x J x 2 real, visible B x J (bool, integer or float), same device."""
    if not isinstance(joints, torch.Tensor) or not isinstance(visible, torch.Tensor):
        raise TypeError(f"{owner}: joints and visible must be tensors, got "
                        f"{type(joints).__name__} and {type(visible).__name__}")
    if joints.dim() != 3 or joints.shape[2] != 2:
        raise ValueError(f"{owner}: joints must be B x J x 2 (x = column, y = row), got "
                         f"{tuple(joints.shape)}")
    if joints.dtype == torch.bool or joints.is_complex():
        raise TypeError(f"{owner}: joints must be a real (floating or integer) tensor, got "
                        f"{joints.dtype}")
    if visible.dim() != 2:
        raise ValueError(f"{owner}: visible must be B x J, got {tuple(visible.shape)}")
    if visible.is_complex():
        raise TypeError(f"{owner}: visible must be bool, integer or floating point, got "
                        f"{visible.dtype}")
    if tuple(visible.shape) != tuple(joints.shape[:2]):
        raise ValueError(f"{owner}: joints {tuple(joints.shape)} and visible "
                         f"{tuple(visible.shape)} disagree on B x J")
    if joints.shape[0] == 0 or joints.shape[1] == 0:
        raise ValueError(f"{owner}: no joints (B x J = {joints.shape[0]} x {joints.shape[1]})")
    if visible.device != joints.device:
        raise ValueError(f"{owner}: joints on {joints.device}, visible on {visible.device}")


def check_heatmap_loss_args(heatmaps, joints, visible, image_size, sigma,
                            owner: str = OWNER) -> tuple[tuple[int, int], float]:
    """All checks of :func:`lipfast.pose.heatmap_loss`; returns (image_size, sigma)
    normalised."""
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"{owner}: heatmaps must be a tensor, got {type(heatmaps).__name__}")
    if heatmaps.dim() != 4:
        raise ValueError(f"{owner}: heatmaps must be B x J x h x w, got "
                         f"{tuple(heatmaps.shape)}")
    if not heatmaps.is_floating_point():
        raise TypeError(f"{owner}: heatmaps must be floating point (float32, float64, "
                        f"bfloat16, float16), got {heatmaps.dtype}")
    check_joint_args(joints, visible, owner)
    if tuple(heatmaps.shape[:2]) != tuple(joints.shape[:2]):
        raise ValueError(f"{owner}: heatmaps {tuple(heatmaps.shape)} and joints "
                         f"{tuple(joints.shape)} disagree on B x J")
    if heatmaps.shape[2] == 0 or heatmaps.shape[3] == 0:
        raise ValueError(f"{owner}: empty heatmaps {tuple(heatmaps.shape)}")
    if joints.device != heatmaps.device:
        raise ValueError(f"{owner}: heatmaps on {heatmaps.device}, joints on {joints.device}")
    return check_size_pair(image_size, "image_size", owner), check_sigma(sigma, owner)


def check_targets_args(joints, visible, image_size, heatmap_size, sigma,
                       owner: str = "generate_heatmaps"):
    """All checks of :func:`lipfast.pose.generate_heatmaps`; returns
    (image_size, heatmap_size, sigma) normalised."""
    check_joint_args(joints, visible, owner)
    return (check_size_pair(image_size, "image_size", owner),
            check_size_pair(heatmap_size, "heatmap_size", owner), check_sigma(sigma, owner))


# ---------------------------------------------------------------------------
# the PyTorch path (CUDA float64 / no Triton; runs on any device)

def joint_table(joints, visible, image_size, heatmap_size, sigma):
    """(weight B x J float32, window B x J x 6 int64, bad B x J bool) by the
    per-joint rule of the module docstring, vectorised in float64 (the C++ and
    Triton kernels compute the same table). ``bad``: visible != 0 with a
    non-finite coordinate."""
    (iw, ih), (w, h) = image_size, heatmap_size
    jt = joints.to(torch.float64)
    vis = visible.to(torch.float32)
    tmp = sigma * 3
    centre = (2 * tmp + 1) // 2
    mu_x = torch.trunc(jt[..., 0] / (iw / w) + 0.5)
    mu_y = torch.trunc(jt[..., 1] / (ih / h) + 0.5)
    ul_x, ul_y = torch.trunc(mu_x - tmp), torch.trunc(mu_y - tmp)
    br_x, br_y = torch.trunc(mu_x + tmp + 1), torch.trunc(mu_y + tmp + 1)
    off = (ul_x >= w) | (ul_y >= h) | (br_x < 0) | (br_y < 0)
    active = vis != 0
    finite = torch.isfinite(jt).all(-1)
    weight = torch.where(off, torch.zeros_like(vis), vis)
    drawn = active & finite & (weight > 0.5)
    x_lo, y_lo = ul_x.clamp(min=0), ul_y.clamp(min=0)
    x_hi = torch.maximum(br_x.clamp(max=w), x_lo)
    y_hi = torch.maximum(br_y.clamp(max=h), y_lo)
    cols = torch.stack([x_lo, x_hi, y_lo, y_hi, ul_x + centre, ul_y + centre], -1)
    window = torch.where(drawn[..., None], cols, torch.zeros_like(cols)).to(torch.int64)
    return weight, window, active & ~finite


def _raise_bad_joint(bad: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor) -> None:
    """ValueError naming the first joint with visible != 0 and non-finite
    coordinates (host sync)."""
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        xy = tuple(float(v) for v in joints[b, j])
        raise ValueError(f"heatmap_loss: joint {j} of image {b} has non-finite coordinates "
                         f"{xy} but visible = {float(visible[b, j])} (set visible to 0 for "
                         "missing joints)")


def _patch(window, w, h, sigma, acc):
    """Per joint the window's pixels: (rows B x J x ky, columns B x J x kx, the
    mask B x J x ky x kx of pixels inside the window, the Gaussian there in
    ``acc``), with at most ceil(6 sigma + 1) + 1 rows and columns."""
    k = math.ceil(6 * sigma + 1) + 1
    kx, ky = min(w, k), min(h, k)
    dev = window.device
    xs = window[..., 0:1] + torch.arange(kx, device=dev)
    ys = window[..., 2:3] + torch.arange(ky, device=dev)
    mask = (ys < window[..., 3:4])[..., :, None] & (xs < window[..., 1:2])[..., None, :]
    dx = (xs - window[..., 4:5]).to(acc)
    dy = (ys - window[..., 5:6]).to(acc)
    den = torch.tensor(2.0 * sigma * sigma, dtype=acc)
    g = torch.exp(-(dx[..., None, :] * dx[..., None, :] + dy[..., :, None] * dy[..., :, None])
                  / den.to(dev))
    return ys.clamp(max=h - 1), xs.clamp(max=w - 1), mask, g


def _patch_index(heatmaps, ys, xs):
    b, j = heatmaps.shape[:2]
    dev = heatmaps.device
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ji = torch.arange(j, device=dev)[None, :, None, None]
    return bi, ji, ys[..., :, None], xs[..., None, :]


def _torch_forward(heatmaps, joints, visible, image_size, sigma):
    """(loss, weight, window) by the PyTorch path: sum of squares of the maps plus,
    inside each window, g * (g - 2 p) (= (p - g)^2 - p^2)."""
    b, j, h, w = heatmaps.shape
    acc = _acc_dtype(heatmaps)
    weight, window, bad = joint_table(joints, visible, image_size, (w, h), sigma)
    _raise_bad_joint(bad, joints, visible)
    p = heatmaps.to(acc)
    total = p.flatten(2).square().sum(-1)
    ys, xs, mask, g = _patch(window, w, h, sigma, acc)
    patch = p[_patch_index(heatmaps, ys, xs)]
    total = total + torch.where(mask, g * (g - 2 * patch), torch.zeros_like(g)).sum((2, 3))
    wa = weight.to(acc)
    loss = (wa * wa * total).sum() * (0.5 / (j * b * h * w))
    return loss, weight, window


def _torch_backward(grad, heatmaps, weight, window, sigma):
    """d heatmaps = grad * w^2 / (J B h w) * (p - g), g scattered into the windows."""
    b, j, h, w = heatmaps.shape
    acc = _acc_dtype(heatmaps)
    wa = weight.to(acc)
    c = grad.to(acc) * wa * wa / (j * b * h * w)
    # p - g first (the window's pixels are distinct; the clamped indices of pixels
    # outside it add 0), then the scale: the rounding of the kernels
    out = heatmaps.to(acc, memory_format=torch.contiguous_format, copy=True)
    ys, xs, mask, g = _patch(window, w, h, sigma, acc)
    out.index_put_(_patch_index(heatmaps, ys, xs), torch.where(mask, -g, torch.zeros_like(g)),
                   accumulate=True)
    return out.mul_(c[..., None, None]).to(heatmaps.dtype)


def _torch_targets(joints, visible, image_size, heatmap_size, sigma):
    """(target B x J x h x w float32, weight B x J float32), vectorised; the
    Gaussian in float32 as the reference's patch."""
    w, h = heatmap_size
    weight, window, bad = joint_table(joints, visible, image_size, heatmap_size, sigma)
    _raise_bad_joint(bad, joints, visible)
    dev = joints.device
    xs = torch.arange(w, device=dev)
    ys = torch.arange(h, device=dev)
    inx = (xs >= window[..., 0:1]) & (xs < window[..., 1:2])
    iny = (ys >= window[..., 2:3]) & (ys < window[..., 3:4])
    dx = (xs - window[..., 4:5]).to(torch.float32)
    dy = (ys - window[..., 5:6]).to(torch.float32)
    d2 = dx[..., None, :] * dx[..., None, :] + dy[..., :, None] * dy[..., :, None]
    den = torch.tensor(2.0 * sigma * sigma, dtype=torch.float32, device=dev)
    g = torch.exp(-d2 / den)
    target = torch.where(iny[..., :, None] & inx[..., None, :], g, torch.zeros_like(g))
    return target, weight


# ---------------------------------------------------------------------------
# custom ops

def _triton_kernels(t: torch.Tensor):
    from .. import kernels

    return kernels.load("heatmap_loss", "lipfast.pose.heatmap_loss", t.dtype)


# Schemas and CPU kernels: C++ (csrc/ops/heatmap_loss.cpp, cpu/heatmap_loss_kernel.cpp);
# registered here: the CUDA kernels, the fake kernels and the autograd formula.
_ext.load()


@torch.library.register_kernel("lipfast::heatmap_loss", "cuda")
def _heatmap_loss_cuda(heatmaps, joints, visible, image_size, sigma):
    image_size, sigma = check_heatmap_loss_args(heatmaps, joints, visible, image_size, sigma)
    kernels = _triton_kernels(heatmaps)
    if kernels is None:
        return _torch_forward(heatmaps, joints, visible, image_size, sigma)
    return _triton_forward(kernels, heatmaps, joints, visible, image_size, sigma)


def _triton_forward(kernels, heatmaps, joints, visible, image_size, sigma):
    """(loss, weight, window) from the Triton forward kernel; its bad-joint flag
    goes to ``torch._assert_async`` (no host sync; on CPU tensors, under the
    interpreter, it raises RuntimeError at once)."""
    loss, weight, window, bad = kernels.forward(heatmaps, joints, visible, image_size, sigma)
    torch._assert_async(bad[0] == 0, _BAD_JOINT_MSG)
    return loss, weight, window


@torch.library.register_fake("lipfast::heatmap_loss")
def _heatmap_loss_fake(heatmaps, joints, visible, image_size, sigma):
    b, j = heatmaps.shape[:2]
    return (heatmaps.new_empty((), dtype=_acc_dtype(heatmaps)),
            heatmaps.new_empty((b, j), dtype=torch.float32),
            heatmaps.new_empty((b, j, len(WINDOW_COLUMNS)), dtype=torch.int64))


@torch.library.register_kernel("lipfast::heatmap_loss_backward", "cuda")
def _heatmap_loss_backward_cuda(grad, heatmaps, weight, window, sigma):
    kernels = _triton_kernels(heatmaps)
    if kernels is None:
        return _torch_backward(grad, heatmaps, weight, window, sigma)
    return kernels.backward(grad, heatmaps, weight, window, sigma)


@torch.library.register_fake("lipfast::heatmap_loss_backward")
def _heatmap_loss_backward_fake(grad, heatmaps, weight, window, sigma):
    return torch.empty_like(heatmaps, memory_format=torch.contiguous_format)


@torch.library.register_kernel("lipfast::heatmap_loss_targets", "cuda")
def _heatmap_loss_targets_cuda(joints, visible, image_size, heatmap_size, sigma):
    image_size, heatmap_size, sigma = check_targets_args(joints, visible, image_size,
                                                         heatmap_size, sigma)
    return _torch_targets(joints, visible, image_size, heatmap_size, sigma)


@torch.library.register_fake("lipfast::heatmap_loss_targets")
def _heatmap_loss_targets_fake(joints, visible, image_size, heatmap_size, sigma):
    b, j = joints.shape[:2]
    w, h = heatmap_size
    return (joints.new_empty((b, j, h, w), dtype=torch.float32),
            joints.new_empty((b, j), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    heatmaps, _, _, _, sigma = inputs
    _, weight, window = output
    ctx.save_for_backward(heatmaps, weight, window)
    ctx.sigma = sigma
    ctx.mark_non_differentiable(weight, window)


def _backward(ctx, dloss, dweight, dwindow):
    heatmaps, weight, window = ctx.saved_tensors
    dh = None
    if ctx.needs_input_grad[0] and dloss is not None:
        dh = torch.ops.lipfast.heatmap_loss_backward(dloss, heatmaps, weight, window, ctx.sigma)
    return dh, None, None, None, None


torch.library.register_autograd("lipfast::heatmap_loss", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, grad):
    raise NotImplementedError(
        "lipfast::heatmap_loss_backward has no derivative: second derivatives (double "
        "backward) of lipfast.pose.heatmap_loss are not implemented")


torch.library.register_autograd("lipfast::heatmap_loss_backward", _no_double_backward)
