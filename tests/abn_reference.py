"""Plain PyTorch reference for In-Place ABN, written from SPEC section 2."""

import torch
import torch.nn.functional as F


def activation(z, act, param):
    if act == "leaky_relu":
        return F.leaky_relu(z, param)
    if act == "elu":
        return F.elu(z, param)
    if act == "relu":
        return F.relu(z)
    return z


def inplace_abn_reference(x, weight, bias, running_mean, running_var, training, momentum, eps,
                          act, param):
    """act(batch_norm(x) with w~ = |w| + eps); updates running stats like F.batch_norm
    (unbiased variance with n / (n - 1))."""
    w = weight.abs() + eps if weight is not None else None
    z = F.batch_norm(x, running_mean, running_var, w, bias, training, momentum, eps)
    return activation(z, act, param)
