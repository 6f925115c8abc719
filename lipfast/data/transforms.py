"""Affine geometry and warps of SCHP's LIP pipeline, in torch (no OpenCV).

SCHP (and CE2P) centre a *person box* in the crop with one similarity transform
(``get_affine_transform``): the box's centre ``c`` goes to the crop centre
``((W_c - 1) / 2, (H_c - 1) / 2)``, the box width ``s_w`` (after the box was
expanded to the crop's aspect ratio) goes to ``W_c - 1`` pixels, and the image is
rotated by ``r`` degrees about ``c`` (counter-clockwise on screen for r > 0).
With pixel coordinates (x right, y down, pixel centres at integers)::

    dst = k * R(r) @ (src - c) + d,   k = (W_c - 1) / s_w,
    R(r) = [[cos r, sin r], [-sin r, cos r]],   d = ((W_c - 1) / 2, (H_c - 1) / 2)

A horizontal flip of the source image (``x -> W - 1 - x``) is composed into the
same matrix instead of copying the image.

The warps sample the source at ``M^-1 @ dst`` for every destination pixel:
images bilinearly with a black (zero) border, labels at the *nearest* pixel with
border 255. Differences from ``cv2.warpAffine`` in SCHP, by design: OpenCV's
nearest-neighbour warp truncates the fixed-point coordinate (a shift of up to
one pixel against the bilinear image warp); lipfast rounds, so the label stays
aligned with the image it was drawn on. OpenCV rounds the warped uint8 image to
integers; lipfast keeps float32 (differences below 0.5 / 255).

The pose crops (SPEC section 10, deep-high-resolution-net) use their own box and
matrix: :func:`pose_box_to_center_scale` (scale in units of 200 px, 1.25
enlargement) and :func:`pose_affine_matrix` (centre to ``(W/2, H/2)``, box width
to ``W``, no ``- 1``); :func:`flip_matrix` and :func:`affine_points` carry the
flip and the joints. The same :func:`warp_image` warps the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE = 255


def box_to_center_scale(width: int, height: int, aspect_ratio: float):
    """SCHP's ``_box2cs`` for the whole image as the person box ``[0, 0, W-1, H-1]``.

    Returns ``(center (cx, cy), scale (s_w, s_h))`` with the box expanded to the
    crop aspect ratio ``aspect_ratio = W_c / H_c``.
    """
    w = float(width - 1)
    h = float(height - 1)
    cx = w * 0.5
    cy = h * 0.5
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return (cx, cy), (w, h)


def affine_matrix(center, scale, rotation: float, crop_size: Sequence[int],
                  flip_width: int | None = None) -> torch.Tensor:
    """3 x 3 float64 matrix mapping source pixel coordinates to crop pixel
    coordinates (see the module docstring). ``crop_size = (H_c, W_c)``.
    ``flip_width=W`` composes a horizontal flip of a W-wide source first.
    """
    hc, wc = int(crop_size[0]), int(crop_size[1])
    s_w = float(scale[0])
    if not s_w > 0:
        raise ValueError(f"affine_matrix: scale must be positive, got {s_w}")
    k = (wc - 1) / s_w if wc > 1 else 1.0 / s_w
    rad = math.radians(float(rotation))
    cs, sn = math.cos(rad), math.sin(rad)
    cx, cy = float(center[0]), float(center[1])
    a = torch.tensor([[k * cs, k * sn, 0.0], [-k * sn, k * cs, 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, (wc - 1) * 0.5], [0.0, 1.0, (hc - 1) * 0.5], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    m = d @ a @ t
    if flip_width is not None:
        f = torch.tensor([[-1.0, 0.0, float(flip_width - 1)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                         dtype=torch.float64)
        m = m @ f
    return m


def _source_coords(inv: torch.Tensor, out_h: int, out_w: int, device=None):
    """Source (x, y) pixel coordinates (float64) of every destination pixel."""
    ys = torch.arange(out_h, dtype=torch.float64, device=device)
    xs = torch.arange(out_w, dtype=torch.float64, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    inv = inv.to(device=device, dtype=torch.float64)
    sx = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
    sy = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    return sx, sy


def warp_image(image: torch.Tensor, matrix: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Bilinear warp of ``image`` (C x H x W or B x C x H x W, floating) by the
    source->destination ``matrix`` (3 x 3) to ``out_size = (H_o, W_o)``; outside
    the source the result fades to 0 exactly as OpenCV's constant border."""
    squeeze = image.dim() == 3
    x = image.unsqueeze(0) if squeeze else image
    h, w = x.shape[-2:]
    inv = torch.linalg.inv(matrix.to(torch.float64))
    sx, sy = _source_coords(inv, int(out_size[0]), int(out_size[1]), x.device)
    # grid_sample with align_corners=False: pixel i spans [i - 0.5, i + 0.5].
    gx = (2.0 * sx + 1.0) / w - 1.0
    gy = (2.0 * sy + 1.0) / h - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(0) if squeeze else out


def warp_label(label: torch.Tensor, matrix: torch.Tensor, out_size: Sequence[int],
               border: int = IGNORE) -> torch.Tensor:
    """Nearest-neighbour warp of an integer H x W ``label`` map (rounding the
    source coordinate); destination pixels whose source lies outside the map get
    ``border``."""
    h, w = label.shape[-2:]
    inv = torch.linalg.inv(matrix.to(torch.float64))
    sx, sy = _source_coords(inv, int(out_size[0]), int(out_size[1]), label.device)
    ix = torch.floor(sx + 0.5).long()
    iy = torch.floor(sy + 0.5).long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).reshape(-1)
    out = label.reshape(-1)[flat].reshape(inside.shape)
    return torch.where(inside, out, torch.full_like(out, border))


def warp_back(logits: torch.Tensor, matrix: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Maps crop-resolution maps back to the original image: ``logits`` is
    C x H_c x W_c (the network output upsampled to the crop size), ``matrix`` the
    sample's original->crop matrix (``meta["affine"]``), ``size = (H, W)`` the
    original size. Bilinear, zero outside the crop (SCHP's ``transform_logits``)."""
    inv = torch.linalg.inv(matrix.to(torch.float64))  # crop -> original
    return warp_image(logits, inv, size)


# --------------------------------------------------------------- pose (SPEC section 10)

PIXEL_STD = 200.0  # the pose crops' scale unit (deep-high-resolution-net's pixel_std)


def pose_box_to_center_scale(x: float, y: float, w: float, h: float, aspect_ratio: float,
                             enlarge: float = 1.25, pixel_std: float = PIXEL_STD):
    """deep-high-resolution-net's ``box_to_center_scale`` / ``_xywh2cs`` for a
    box with top-left ``(x, y)``, width ``w`` and height ``h``: the centre
    ``(x + w / 2, y + h / 2)``; the box widened or heightened to
    ``aspect_ratio = W_in / H_in``; the scale ``(w, h) / pixel_std`` times
    ``enlarge`` (the reference's 1.25; pass 1.0 for a box that is the whole
    image). Returns ``(center (cx, cy), scale (s_w, s_h))`` as float tuples."""
    ar = float(aspect_ratio)
    if not ar > 0:
        raise ValueError(f"pose_box_to_center_scale: aspect_ratio must be positive, got {ar}")
    w, h = float(w), float(h)
    if not (w >= 0 and h >= 0 and max(w, h) > 0):
        raise ValueError(f"pose_box_to_center_scale: the box must have a positive size, "
                         f"got w={w}, h={h}")
    cx, cy = float(x) + w * 0.5, float(y) + h * 0.5
    if w > ar * h:
        h = w / ar
    elif w < ar * h:
        w = h * ar
    f = float(enlarge) / float(pixel_std)
    return (cx, cy), (w * f, h * f)


def pose_affine_matrix(center, scale, rotation: float, image_size: Sequence[int],
                       pixel_std: float = PIXEL_STD) -> torch.Tensor:
    """3 x 3 float64 matrix of deep-high-resolution-net's ``get_affine_transform``
    (no shift): source pixel -> input pixel coordinates for an input of
    ``image_size = (W, H)`` (width first, as the reference)::

        dst = k * R(r) @ (src - c) + (W / 2, H / 2),   k = W / (pixel_std * s_w)

    with ``R(r)`` as in :func:`affine_matrix` (the image turns counter-clockwise
    on screen for r > 0). Unlike SCHP's parsing crop (:func:`affine_matrix`) the
    centre goes to ``W / 2`` and the box width to ``W`` pixels (no ``- 1``),
    SPEC section 10. ``scale`` is in units of ``pixel_std`` pixels; only its
    width ``s_w`` sets the zoom (the reference's rule)."""
    wi, hi = int(image_size[0]), int(image_size[1])
    s_w = float(scale[0]) * float(pixel_std)
    if not s_w > 0 or not math.isfinite(s_w):
        raise ValueError(f"pose_affine_matrix: scale must be positive, got {scale[0]}")
    k = wi / s_w
    rad = math.radians(float(rotation))
    cs, sn = math.cos(rad), math.sin(rad)
    cx, cy = float(center[0]), float(center[1])
    a = torch.tensor([[k * cs, k * sn], [-k * sn, k * cs]], dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64)
    m[:2, :2] = a
    m[:2, 2] = torch.tensor([wi * 0.5, hi * 0.5], dtype=torch.float64) - a @ torch.tensor(
        [cx, cy], dtype=torch.float64)
    return m


def flip_matrix(width: int) -> torch.Tensor:
    """3 x 3 float64 matrix of a horizontal flip of a ``width``-wide image,
    ``x -> width - 1 - x`` (pixel centres at integers)."""
    return torch.tensor([[-1.0, 0.0, float(width) - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)


def affine_points(points, matrix) -> torch.Tensor:
    """Applies the 3 x 3 (or 2 x 3) affine ``matrix`` to ``points`` (... x 2,
    (x, y) pixel coordinates); float64 result of the same leading shape. NaN
    coordinates stay NaN (a missing joint stays missing)."""
    p = torch.as_tensor(points, dtype=torch.float64)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if p.shape[-1:] != (2,):
        raise ValueError(f"affine_points: points must be ... x 2, got {tuple(p.shape)}")
    if m.shape not in ((3, 3), (2, 3)):
        raise ValueError(f"affine_points: matrix must be 3 x 3 or 2 x 3, got {tuple(m.shape)}")
    return p @ m[:2, :2].T + m[:2, 2]


def lip_palette(num_classes: int = 256) -> list[int]:
    """The LIP / Pascal-VOC colour palette (SCHP's ``get_palette``), as a flat
    list of 3 * 256 ints for ``PIL.Image.putpalette``; class 0 is black."""
    pal = [0] * (3 * 256)
    for j in range(min(int(num_classes), 256)):
        lab = j
        r = g = b = 0
        i = 0
        while lab:
            r |= ((lab >> 0) & 1) << (7 - i)
            g |= ((lab >> 1) & 1) << (7 - i)
            b |= ((lab >> 2) & 1) << (7 - i)
            i += 1
            lab >>= 3
        pal[3 * j:3 * j + 3] = [r, g, b]
    return pal


__all__ = ["box_to_center_scale", "affine_matrix", "warp_image", "warp_label", "warp_back",
           "lip_palette", "IGNORE", "PIXEL_STD", "pose_box_to_center_scale",
           "pose_affine_matrix", "flip_matrix", "affine_points"]
