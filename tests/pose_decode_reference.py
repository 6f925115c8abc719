"""Plain numpy (float64) references of HRNet's pose decoding, flip test and MPII's
PCKh, written from ../shared/SPEC.md section 10 and the rules of
deep-high-resolution-net.pytorch (get_max_preds, get_final_preds with
POST_PROCESS, get_affine_transform / transform_preds, flip_back + SHIFT_HEATMAP,
lib/dataset/mpii.py's evaluate), loop by loop, for the tests of lipfast.pose.

Deliberate differences from the reference code: everything in float64 (the
reference rounds the affine's points to float32 and keeps coordinates in
float32), and the affine of transform_preds is solved from its three point pairs
with numpy.linalg.solve instead of cv2.getAffineTransform (same equations).
"""

from __future__ import annotations

import numpy as np


def get_max_preds(hm: np.ndarray):
    """hm B x J x h x w -> (coords B x J x 2 float64 (x, y), maxvals B x J): first
    np.argmax of each flattened map; coordinates zeroed unless maxval > 0."""
    b, j, h, w = hm.shape
    flat = hm.reshape(b, j, h * w)
    idx = np.argmax(flat, axis=2)
    maxvals = np.amax(flat, axis=2)
    coords = np.zeros((b, j, 2), dtype=np.float64)
    coords[..., 0] = idx % w
    coords[..., 1] = np.floor(idx / w)
    mask = np.greater(maxvals, 0.0)
    coords *= mask[..., None]
    return coords, maxvals


def get_3rd_point(a, b):
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float64)


def get_affine_transform(center, scale, output_size, inv=False):
    """The 2 x 3 affine of get_affine_transform(center, scale, rot=0, output_size):
    three points (the centre, a point half a width above it, the third corner of
    the right angle) mapped to the output's centre etc.; both directions use the
    widths (scale[0] * 200 and output_size[0])."""
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    src_w = scale[0] * 200.0
    dst_w, dst_h = float(output_size[0]), float(output_size[1])
    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = center
    src[1] = center + np.array([0.0, -0.5 * src_w])
    dst[0] = [0.5 * dst_w, 0.5 * dst_h]
    dst[1] = dst[0] + np.array([0.0, -0.5 * dst_w])
    src[2] = get_3rd_point(src[0], src[1])
    dst[2] = get_3rd_point(dst[0], dst[1])
    a, bb = (dst, src) if inv else (src, dst)
    # solve [x y 1] M^T = x' for the 2 x 3 M
    lhs = np.concatenate([a, np.ones((3, 1))], axis=1)
    return np.linalg.solve(lhs, bb).T


def transform_preds(coords, center, scale, output_size):
    t = get_affine_transform(center, scale, output_size, inv=True)
    out = np.zeros_like(coords, dtype=np.float64)
    for p in range(coords.shape[0]):
        out[p] = t @ np.array([coords[p, 0], coords[p, 1], 1.0])
    return out


def get_final_preds(hm: np.ndarray, center: np.ndarray, scale: np.ndarray):
    """(image coords B x J x 2, maxvals B x J) of heatmaps hm B x J x h x w."""
    coords, maxvals = get_max_preds(hm)
    b, j, h, w = hm.shape
    for n in range(b):
        for p in range(j):
            m = hm[n, p]
            px = int(np.floor(coords[n, p, 0] + 0.5))
            py = int(np.floor(coords[n, p, 1] + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([m[py][px + 1] - m[py][px - 1], m[py + 1][px] - m[py - 1][px]],
                                dtype=np.float64)
                coords[n, p] += np.sign(diff) * 0.25
    preds = np.zeros_like(coords)
    for n in range(b):
        preds[n] = transform_preds(coords[n], center[n], scale[n], [w, h])
    return preds, maxvals


def flip_back(flipped: np.ndarray, pairs, shift: bool = True) -> np.ndarray:
    """Reverse W, swap each pair's channels, then (SHIFT_HEATMAP) out[..., 1:] =
    out[..., :-1] with column 0 kept."""
    out = flipped[:, :, :, ::-1].copy()
    for a, b in pairs:
        tmp = out[:, a].copy()
        out[:, a] = out[:, b]
        out[:, b] = tmp
    if shift:
        out[:, :, :, 1:] = out.copy()[:, :, :, :-1]
    return out


def pckh(pred, gt, visible, head_size, threshold, groups, mean_excludes):
    """MPII's evaluation on numpy arrays (pred, gt B x J x 2, visible B x J bool,
    head_size B), with lipfast's documented choices for what MPII does not cover:
    a visible joint with a non-positive / non-finite head size or a non-finite gt
    is skipped (counted neither visible nor correct). Returns (per-joint PCKh J,
    table dict, visible counts J, correct counts J, skipped counts J)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    vis = np.asarray(visible, dtype=bool)
    hs = np.asarray(head_size, dtype=np.float64)
    b, j = vis.shape
    vis_cnt = np.zeros(j, dtype=np.int64)
    cor_cnt = np.zeros(j, dtype=np.int64)
    skp_cnt = np.zeros(j, dtype=np.int64)
    for n in range(b):
        h_ok = np.isfinite(hs[n]) and hs[n] > 0
        for p in range(j):
            if not vis[n, p]:
                continue
            if not h_ok or not np.all(np.isfinite(gt[n, p])):
                skp_cnt[p] += 1
                continue
            vis_cnt[p] += 1
            d = np.sqrt(np.sum((pred[n, p] - gt[n, p]) ** 2))
            if d / hs[n] <= threshold:
                cor_cnt[p] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        per = 100.0 * cor_cnt / vis_cnt.astype(np.float64)
    table = {}
    for name, idx in groups:
        table[name] = float(np.mean([per[i] for i in idx]))
    inc = [i for i in range(j) if i not in mean_excludes]
    ratio_den = vis_cnt[inc].sum()
    if ratio_den > 0:
        # sum of PCKh weighted by the visible counts (MPII's jnt_ratio); joints
        # with no visible instance have ratio 0 and are left out of the sum
        table["Mean"] = float(sum(per[i] * vis_cnt[i] / ratio_den for i in inc if vis_cnt[i]))
    else:
        table["Mean"] = float("nan")
    return per, table, vis_cnt, cor_cnt, skp_cnt
