"""Eager reference for OCNet attention (SPEC section 1): materialised similarity
map, Python loop over the pyramid regions as OCNet writes it."""

import torch


def oc_attention_reference(qk, v, scale, regions=0):
    b, _, h, w = qk.shape
    s = max(1, regions)
    step_h, step_w = h // s, w // s
    rows = []
    for i in range(s):
        r0, r1 = i * step_h, (h if i == s - 1 else (i + 1) * step_h)
        cols = []
        for j in range(s):
            c0, c1 = j * step_w, (w if j == s - 1 else (j + 1) * step_w)
            q = qk[:, :, r0:r1, c0:c1].reshape(b, qk.shape[1], -1).permute(0, 2, 1)
            k = qk[:, :, r0:r1, c0:c1].reshape(b, qk.shape[1], -1)
            val = v[:, :, r0:r1, c0:c1].reshape(b, v.shape[1], -1).permute(0, 2, 1)
            sim = torch.softmax(torch.matmul(q, k) * scale, dim=-1)
            ctx = torch.matmul(sim, val).permute(0, 2, 1).reshape(b, v.shape[1], r1 - r0, c1 - c0)
            cols.append(ctx)
        rows.append(torch.cat(cols, 3))
    return torch.cat(rows, 2)
