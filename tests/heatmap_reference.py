"""Reference Gaussian joint targets and JointsMSELoss (target weights on) of
deep-high-resolution-net.pytorch, written from SPEC section 10 for the tests, in
float64, one joint at a time with Python's own int() and float arithmetic.

- ``reference_targets(joints, visible, image_size, heatmap_size, sigma)``:
  (target B x J x h x w, weight B x J) as float64 numpy arrays. Per joint:
  feat_stride = image_size / heatmap_size; mu = int(x / stride + 0.5);
  tmp_size = 3 sigma; ul = int(mu - tmp_size), br = int(mu + tmp_size + 1);
  weight = visible (rounded to float32 like the reference's target_weight), 0
  when ul >= size or br < 0 on either axis; when weight > 0.5 the patch of
  side 2 tmp_size + 1 (np.arange(0, side) entries, centre side // 2) is
  pasted at ul, clipped to the map, its entry k being exp(-((k - centre)^2 +
  (l - centre)^2) / (2 sigma^2)).
- ``reference_loss(pred, target, weight)``: torch, differentiable:
  (1/J) sum_j 0.5 * mean over B x h x w of ((pred_j - target_j) * w_j)^2.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_targets(joints, visible, image_size, heatmap_size, sigma):
    joints = np.asarray(torch.as_tensor(joints).double().cpu(), dtype=np.float64)
    visible = np.asarray(torch.as_tensor(visible).double().cpu(), dtype=np.float64)
    b_n, j_n = joints.shape[:2]
    img_w, img_h = image_size
    w, h = heatmap_size
    stride_x, stride_y = img_w / w, img_h / h
    tmp_size = sigma * 3
    side = 2 * tmp_size + 1
    centre = side // 2
    n_patch = len(np.arange(0, side, 1))
    target = np.zeros((b_n, j_n, h, w), dtype=np.float64)
    weight = np.zeros((b_n, j_n), dtype=np.float64)
    for b in range(b_n):
        for j in range(j_n):
            wt = float(np.float32(visible[b, j]))
            x, y = float(joints[b, j, 0]), float(joints[b, j, 1])
            mu_x = int(x / stride_x + 0.5)
            mu_y = int(y / stride_y + 0.5)
            ul = (int(mu_x - tmp_size), int(mu_y - tmp_size))
            br = (int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1))
            if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
                weight[b, j] = 0.0
                continue
            weight[b, j] = wt
            if not wt > 0.5:
                continue
            for row in range(max(0, ul[1]), min(br[1], h)):
                gy = row - ul[1]
                assert 0 <= gy < n_patch
                for col in range(max(0, ul[0]), min(br[0], w)):
                    gx = col - ul[0]
                    assert 0 <= gx < n_patch
                    target[b, j, row, col] = math.exp(
                        -((gx - centre) ** 2 + (gy - centre) ** 2) / (2 * sigma ** 2))
    return target, weight


def reference_loss(pred, target, weight):
    b_n, j_n = pred.shape[:2]
    p = pred.reshape(b_n, j_n, -1)
    t = torch.as_tensor(target, dtype=p.dtype).reshape(b_n, j_n, -1)
    wt = torch.as_tensor(weight, dtype=p.dtype)
    loss = 0
    for j in range(j_n):
        wj = wt[:, j:j + 1]
        loss = loss + 0.5 * torch.mean((p[:, j] * wj - t[:, j] * wj) ** 2)
    return loss / j_n


def reference_heatmap_loss(pred, joints, visible, image_size, sigma):
    """reference_loss(pred, *reference_targets(...)) with pred's dtype."""
    h, w = pred.shape[2:]
    target, weight = reference_targets(joints, visible, image_size, (w, h), sigma)
    return reference_loss(pred, target, weight)
