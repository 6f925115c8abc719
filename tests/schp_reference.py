"""SCHP's in-the-wild extractor (``simple_extractor.py``), written from SPEC section 8,
per image, batch 1, as plain functions: the yardstick of :class:`lipfast.Parser` in
the tests and in ``benchmarks/parse.py`` (which loads this file by path).

Pipeline of one image (:func:`schp_extract`):

1. ``cv2.imread(path, IMREAD_COLOR)``: BGR uint8 (:func:`schp_read`).
2. Person box = the whole image ``[0, 0, w-1, h-1]``, expanded to the input aspect
   ratio (:func:`schp_center_scale`); rotation 0.
3. Affine map original -> input: SCHP's three-point construction through
   ``cv2.getAffineTransform`` (:func:`get_affine_transform`, float32 points as
   SCHP), or the same matrix from the closed form in float64 (:func:`exact_affine`).
4. ``cv2.warpAffine(img, M, (W, H), INTER_LINEAR, BORDER_CONSTANT, 0)`` on the uint8
   image (``warp="cv2"``), or :func:`warp_affine_exact` (float64 bilinear without
   OpenCV's fixed-point arithmetic, rounded back to uint8; ``warp="exact"``).
5. ToTensor (/255, CHW, channels stay BGR) and Normalize(mean (0.406, 0.456, 0.485),
   std (0.225, 0.224, 0.229)).
6. Model forward; the fusion head ``output[0][-1][0]`` (C x h x w).
7. Post-processing (:func:`schp_postprocess`): bilinear upsampling to (H, W)
   with align_corners=True, permuted to H x W x C float32 numpy, each channel
   warped back separately with the inverse matrix to (w, h) (cv2 or exact),
   stacked to h x w x C float32, argmax over C -> uint8.
8. :func:`schp_save`: ``<name[:-4]>.png`` (mode P, VOC palette) and, with logits,
   ``<name[:-4]>.npy`` (h x w x C float32).

Numerics: OpenCV 4.x's INTER_LINEAR warps round the source position to 1/32 pixel
(and uint8 warps use fixed-point weights); OpenCV 5.0 does not. ``warp="exact"``
is the reference without that quantisation.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SCHP_MEAN = (0.406, 0.456, 0.485)  # BGR
SCHP_STD = (0.225, 0.224, 0.229)

__all__ = ["SCHP_MEAN", "SCHP_STD", "schp_center_scale", "box_center_scale",
           "get_affine_transform", "exact_affine", "warp_affine_exact", "get_palette",
           "schp_read", "schp_preprocess", "schp_postprocess", "schp_extract", "schp_save",
           "affine_rows"]


# --------------------------------------------------------------------------- geometry


def _xywh_center_scale(x, y, bw, bh, input_size):
    """SCHP's ``_xywh2cs``: centre ``(x + bw/2, y + bh/2)`` and the box expanded to
    the input aspect ratio ``W / H``; float32 arrays like SCHP's."""
    aspect_ratio = input_size[1] * 1.0 / input_size[0]
    center = np.zeros((2,), dtype=np.float32)
    center[0] = x + bw * 0.5
    center[1] = y + bh * 0.5
    if bw > aspect_ratio * bh:
        bh = bw * 1.0 / aspect_ratio
    elif bw < aspect_ratio * bh:
        bw = bh * aspect_ratio
    scale = np.array([bw, bh], dtype=np.float32)
    return center, scale


def schp_center_scale(w, h, input_size):
    """Centre and scale of the whole ``w`` x ``h`` image as the person box
    ``[0, 0, w-1, h-1]`` (SCHP's ``_box2cs``); ``input_size = (H, W)``.
    Returns (center (2,), scale (2,)) float32 arrays."""
    return _xywh_center_scale(0, 0, w - 1, h - 1, input_size)


def box_center_scale(box, input_size):
    """The same rule for a box ``[x0, y0, x1, y1]``: bw = x1 - x0, bh = y1 - y0,
    centre ((x0 + x1)/2, (y0 + y1)/2)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    return _xywh_center_scale(x0, y0, x1 - x0, y1 - y0, input_size)


def _get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [src_point[0] * cs - src_point[1] * sn, src_point[0] * sn + src_point[1] * cs]


def _get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot, output_size, shift=(0.0, 0.0), inv=False):
    """SCHP's ``get_affine_transform``: ``output_size = (H, W)``; three point pairs
    (the centre, the point half the box width "up" from it rotated by ``rot``
    degrees, and the third point by the perpendicular rule) in float32 arrays,
    solved by ``cv2.getAffineTransform``. Returns the 2 x 3 float64 matrix
    original -> input (``inv``: input -> original)."""
    if not isinstance(scale, (np.ndarray, list, tuple)):
        scale = np.array([scale, scale])
    scale_tmp = np.asarray(scale)
    shift = np.asarray(shift, dtype=np.float32)
    src_w = scale_tmp[0]
    dst_w = output_size[1]
    dst_h = output_size[0]

    rot_rad = np.pi * rot / 180
    src_dir = _get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, (dst_w - 1) * -0.5], np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_tmp * shift
    src[1, :] = center + src_dir + scale_tmp * shift
    dst[0, :] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
    dst[1, :] = np.array([(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]) + dst_dir
    src[2:, :] = _get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = _get_3rd_point(dst[0, :], dst[1, :])

    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def exact_affine(center, scale, output_size, inv=False, rot=0.0):
    """The same map from the closed form in float64: p' = k R(rot) (p - c) +
    ((W-1)/2, (H-1)/2), k = (W-1) / s[0], R = [[cos, sin], [-sin, cos]];
    ``inv`` gives the exact inverse. 2 x 3 float64."""
    hh, ww = int(output_size[0]), int(output_size[1])
    k = (ww - 1) / float(scale[0])
    t = np.deg2rad(float(rot))
    cs, sn = np.cos(t), np.sin(t)
    cx, cy = float(center[0]), float(center[1])
    dx, dy = (ww - 1) * 0.5, (hh - 1) * 0.5
    if not inv:
        a = k * np.array([[cs, sn], [-sn, cs]])
        b = np.array([dx, dy]) - a @ np.array([cx, cy])
    else:  # p = R^T (p' - d) / k + c
        a = np.array([[cs, -sn], [sn, cs]]) / k
        b = np.array([cx, cy]) - a @ np.array([dx, dy])
    return np.concatenate([a, b[:, None]], axis=1).astype(np.float64)


def affine_rows(m):
    """The (ax, bx, ay, by) row of an axis-aligned 2 x 3 matrix [[ax, 0, bx], [0, ay, by]]
    (lipfast.ops.parse_postprocess's ``affine``), float64."""
    m = np.asarray(m, dtype=np.float64)
    return np.array([m[0, 0], m[0, 2], m[1, 1], m[1, 2]], dtype=np.float64)


def _invert_affine(m):
    """The inverse of a 2 x 3 affine matrix in float64, as cv2.invertAffineTransform."""
    m = np.asarray(m, dtype=np.float64)
    d = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[1, 1] * d, m[0, 0] * d
    a12, a21 = -m[0, 1] * d, -m[1, 0] * d
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    return np.array([[a11, a12, b1], [a21, a22, b2]])


def warp_affine_exact(src, M, dsize, rows_per_chunk=None):
    """``cv2.warpAffine(src, M, dsize, INTER_LINEAR, BORDER_CONSTANT, 0)`` without
    OpenCV's fixed-point quantisation: float64 bilinear, dst(x, y) = src at
    M^-1 (x, y), every tap outside the source contributes 0. ``src``: H x W or
    H x W x C; ``dsize = (width, height)``. uint8 sources come back rounded half to
    even and clipped to uint8 (cv2's saturate_cast), float sources as float32."""
    src = np.asarray(src)
    squeeze = src.ndim == 2
    s = src[:, :, None] if squeeze else src
    hs, ws, nc = s.shape
    wd, hd = int(dsize[0]), int(dsize[1])
    a = _invert_affine(M)
    flat = s.reshape(hs * ws, nc)
    out_dtype = np.uint8 if src.dtype == np.uint8 else np.float32
    out = np.empty((hd, wd, nc), dtype=out_dtype)
    if rows_per_chunk is None:  # about 4M float64 taps at a time
        rows_per_chunk = max(1, (1 << 22) // max(1, wd * nc))
    xs = np.arange(wd, dtype=np.float64)
    for y0 in range(0, hd, rows_per_chunk):
        ys = np.arange(y0, min(hd, y0 + rows_per_chunk), dtype=np.float64)
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        sx = a[0, 0] * gx + a[0, 1] * gy + a[0, 2]
        sy = a[1, 0] * gx + a[1, 1] * gy + a[1, 2]
        ix = np.floor(sx)
        iy = np.floor(sy)
        fx = (sx - ix).reshape(-1, 1)
        fy = (sy - iy).reshape(-1, 1)
        ix = ix.astype(np.int64).reshape(-1)
        iy = iy.astype(np.int64).reshape(-1)
        acc = np.zeros((ix.size, nc), dtype=np.float64)
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            for dx, wx in ((0, 1.0 - fx), (1, fx)):
                tx, ty = ix + dx, iy + dy
                inside = (tx >= 0) & (tx < ws) & (ty >= 0) & (ty < hs)
                idx = np.where(inside, ty * ws + tx, 0)
                tap = flat[idx].astype(np.float64)
                tap[~inside] = 0.0
                acc += wy * wx * tap
        acc = acc.reshape(len(ys), wd, nc)
        if out_dtype == np.uint8:
            out[y0:y0 + len(ys)] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
        else:
            out[y0:y0 + len(ys)] = acc.astype(np.float32)
    return out[:, :, 0] if squeeze else out


def _warp(src, M, dsize, warp):
    if warp == "cv2":
        return cv2.warpAffine(src, M, (int(dsize[0]), int(dsize[1])), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if warp == "exact":
        return warp_affine_exact(src, M, dsize)
    raise ValueError(f"warp = {warp!r}: 'cv2' or 'exact'")


def _affine(center, scale, input_size, inv, warp):
    if warp == "cv2":
        return get_affine_transform(center, scale, 0, input_size, inv=inv)
    return exact_affine(center, scale, input_size, inv=inv)


# --------------------------------------------------------------------------- palette, I/O


def get_palette(num_cls=256):
    """SCHP's ``get_palette``: the PASCAL VOC colour map as a flat list of 3 * num_cls
    ints (for class j, its bits three at a time from the lowest group i = 0: bits 0,
    1, 2 of group i set bit 7 - i of R, G, B)."""
    palette = [0] * (num_cls * 3)
    for j in range(num_cls):
        lab = j
        i = 0
        while lab:
            palette[j * 3 + 0] |= ((lab >> 0) & 1) << (7 - i)
            palette[j * 3 + 1] |= ((lab >> 1) & 1) << (7 - i)
            palette[j * 3 + 2] |= ((lab >> 2) & 1) << (7 - i)
            i += 1
            lab >>= 3
    return palette


def schp_read(path):
    """``cv2.imread(path, cv2.IMREAD_COLOR)``: h x w x 3 BGR uint8 (EXIF orientation
    applied)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cv2.imread could not read {path}")
    return img


def schp_save(labels, logits, out_dir, name, palette):
    """SCHP's outputs for image ``name``: ``<name[:-4]>.png`` (mode P with ``palette``)
    and, when ``logits`` is not None, ``<name[:-4]>.npy`` (np.save of h x w x C
    float32). Returns the paths written."""
    from PIL import Image

    base = os.path.join(str(out_dir), name[:-4])
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    img.putpalette(palette)
    img.save(base + ".png")
    paths = [base + ".png"]
    if logits is not None:
        np.save(base + ".npy", logits)
        paths.append(base + ".npy")
    return paths


# --------------------------------------------------------------------------- pipeline


def schp_preprocess(image_bgr, input_size, warp="cv2"):
    """Steps 2-5: (1 x 3 x H x W float32 tensor, M, M_inv, (center, scale))."""
    h, w = image_bgr.shape[:2]
    center, scale = schp_center_scale(w, h, input_size)
    m = _affine(center, scale, input_size, False, warp)
    m_inv = _affine(center, scale, input_size, True, warp)
    hh, ww = int(input_size[0]), int(input_size[1])
    inp = _warp(image_bgr, m, (ww, hh), warp)
    # torchvision ToTensor + Normalize
    x = torch.from_numpy(np.ascontiguousarray(inp)).permute(2, 0, 1).contiguous()
    x = x.float().div(255)
    mean = torch.tensor(SCHP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SCHP_STD, dtype=torch.float32).view(3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x.unsqueeze(0), m, m_inv, (center, scale)


def schp_postprocess(fusion_logits_chw, M_inv, input_size, out_hw, warp="cv2"):
    """Step 7 alone: ``fusion_logits_chw`` (C x h x w tensor, any device) upsampled
    bilinearly (align_corners=True) to ``input_size`` (H, W) on its device, moved to
    the host as H x W x C float32, each channel warped back with ``M_inv`` to
    ``out_hw`` = (h, w) (``warp``: "cv2" or "exact"), stacked to h x w x C float32,
    argmax -> uint8. Returns (labels h x w uint8, logits h x w x C float32)."""
    hh, ww = int(input_size[0]), int(input_size[1])
    up = F.interpolate(fusion_logits_chw.float().unsqueeze(0), size=(hh, ww), mode="bilinear",
                       align_corners=True)
    up = up.squeeze(0).permute(1, 2, 0)  # CHW -> HWC (a view, as SCHP)
    logits = up.data.cpu().numpy()
    h, w = int(out_hw[0]), int(out_hw[1])
    target = [_warp(logits[:, :, i], M_inv, (w, h), warp) for i in range(logits.shape[2])]
    target = np.stack(target, axis=2).astype(np.float32, copy=False)
    labels = np.asarray(np.argmax(target, axis=2), dtype=np.uint8)
    return labels, target


def schp_extract(model, image_bgr, setting, warp="cv2", device="cpu", dtype=torch.float32):
    """SCHP's whole per-image pipeline (batch 1) on an h x w x 3 BGR uint8 image.
    ``setting``: a :class:`lipfast.data.settings.DatasetSetting` (or anything with
    ``input_size``). ``model`` returns ``[[parsing, fusion], [edge]]`` and is run
    under ``torch.no_grad()`` on ``device`` with the input in ``dtype`` (SCHP: float32;
    the fusion logits are taken to float32 before upsampling). Returns (labels
    h x w uint8, logits h x w x C float32)."""
    input_size = tuple(int(v) for v in setting.input_size)
    h, w = image_bgr.shape[:2]
    x, _, m_inv, _ = schp_preprocess(image_bgr, input_size, warp)
    with torch.no_grad():
        output = model(x.to(device=device, dtype=dtype))
        fusion = output[0][-1][0]
        return schp_postprocess(fusion, m_inv, input_size, (h, w), warp)
