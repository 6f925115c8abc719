"""Human parsing of images in the wild with SCHP's released models:
:class:`Parser` and the tool ``python -m lipfast.parse``.

What it computes is SCHP's extractor (``simple_extractor.py``), batched and fused:

1. **Box.** Each image is one person box ``[0, 0, w-1, h-1]`` (or each of the
   boxes the caller gives, ``[x0, y0, x1, y1]`` in pixels): centre
   ``c = ((x0+x1)/2, (y0+y1)/2)``, size ``(bw, bh) = (x1-x0, y1-y0)`` widened or
   heightened to the input's aspect ratio ``W/H``.
2. **Warp to the input size** (473 x 473 for LIP, 512 x 512 for ATR and
   Pascal): the map ``p' = k (p - c) + ((W-1)/2, (H-1)/2)``, ``k = (W-1)/bw``,
   bilinear with a black border, rounded to uint8 as ``cv2.warpAffine`` does, on
   the device, batched (images of any sizes batch because each is warped to the
   same input size); then ``/255`` and the BGR mean/std of SCHP.
3. **Model**: CE2P with SCHP's layout (:class:`lipfast.models.CE2P`), or an
   HRNetV2 (:class:`lipfast.models.HRNetV2`, from an HRNet or lipfast.train
   checkpoint: its input is RGB normalised with ImageNet's mean/std, and the
   logits of its ``seg`` head are upsampled with align_corners=False, as
   HRNet-Semantic-Segmentation tests, before step 4), by
   default folded for inference (:func:`lipfast.models.fold_norms`: every norm
   inside its convolution, plain PyTorch modules); the fusion logits at 1/4 of
   the input resolution. ``flip=True`` averages with the mirrored image (the
   left/right classes of the dataset swapped back); ``scales`` averages over
   input scales as :func:`lipfast.metrics.tta.multi_scale_logits` defines it.
4. **Back to the image** in one op, :func:`lipfast.ops.parse_postprocess`: the
   composition of SCHP's bilinear upsampling to the input size
   (``align_corners=True``) and its inverse warp (bilinear, zero outside the
   input frame), then the argmax, straight from the 1/4-resolution logits
   without materialising logits at the input or the original size (when
   probabilities or logits are asked for, the same op writes them).

Differences from SCHP: the warps are exact bilinear (OpenCV 4.x rounds its
sampling positions to 1/32 pixel, which moves near-ties: label maps agree on
about 99.9% of pixels or more, not bit for bit); output files are named after
the input's stem (SCHP cuts the last four characters, which differs for
extensions such as ``.jpeg``).

Input images: a path (decoded with PIL, EXIF orientation applied, converted
as ``cv2.imread(path, IMREAD_COLOR)`` would: grayscale replicated to three
channels, alpha dropped without compositing, palette images expanded, 16-bit
images to 8 bits by their high byte; floating-point images are refused), a PIL
image, or an ``H x W x 3`` (or ``H x W`` grayscale) uint8 numpy array or
tensor, taken as RGB unless ``bgr=True``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._io import atomic_file
from .data.settings import DatasetSetting, dataset_setting
from .data.transforms import lip_palette
from .metrics.tta import flip_logits, multi_scale_logits
from .models.registry import full_size_logits
from .ops.parse_postprocess import parse_postprocess

__all__ = ["Parser", "Parsing", "load_image", "save_parsing", "save_picture", "box_affine",
           "warp_to_input", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".gif")


class Parsing(NamedTuple):
    """The result for one image when more than the label map is asked for.

    - ``labels``: H x W uint8, the class of every pixel (with boxes: of the
      person the pixel went to; 0 where no box covers it).
    - ``probs``: C x H x W float32 class probabilities (``return_probs``), with
      boxes K x C x H x W (one per box, zero outside the box).
    - ``logits``: H x W x C float32 (``return_logits``; SCHP's ``--logits``
      layout), with boxes K x H x W x C.
    - ``instances``: with boxes, H x W (uint8 up to 255 boxes, else int32):
      0 background, k where the pixel went to the k-th box (1-based).
    - ``persons``: with boxes, K x H x W uint8: each box's own label map pasted
      into the image frame (0 outside the box).
    """

    labels: torch.Tensor
    probs: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    instances: Optional[torch.Tensor] = None
    persons: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------- images

def _pil_to_bgr(im, name: str) -> np.ndarray:
    """A PIL image -> H x W x 3 uint8 BGR as cv2's IMREAD_COLOR gives it."""
    from PIL import ImageOps

    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: cv2 ignores it too
        pass
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if mode == "I" and (arr.min(initial=0) < 0 or arr.max(initial=0) > 65535):
            raise ValueError(f"{name}: 32-bit integer image with values outside 0..65535 "
                             "cannot be converted to 8 bits faithfully")
        gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError(f"{name}: floating-point image (mode F): its range is unknown, so it "
                         "cannot be converted to 8-bit colour faithfully; convert it first")
    if mode in ("L", "LA", "1", "La"):
        gray = np.asarray(im.convert("L"))
        return np.repeat(gray[:, :, None], 3, axis=2)
    rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def load_image(image, bgr: bool = False, name: str = "image") -> np.ndarray:
    """``image`` (a path, a PIL image, an H x W x 3 or H x W uint8 array or
    tensor) -> H x W x 3 uint8 BGR numpy array. Arrays and tensors are RGB
    unless ``bgr``. Raises ValueError/TypeError/FileNotFoundError naming the
    image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: is a folder, not an image")
        try:
            with Image.open(path) as im:
                im.load()
                return _pil_to_bgr(im, path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as err:
            if isinstance(err, ValueError) and str(err).startswith(path):
                raise
            raise ValueError(f"{path}: not a readable image ({err})") from None
    if isinstance(image, Image.Image):
        return _pil_to_bgr(image, name)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a path, a PIL image, or a uint8 array or tensor, got "
                        f"{type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name}: arrays and tensors must be uint8 (0..255), got {image.dtype}; "
                        "convert explicitly (the range of other dtypes is ambiguous)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an H x W x 3 (or H x W) array, got shape "
                         f"{tuple(image.shape)}" + (" (drop the alpha channel first)"
                                                    if image.ndim == 3 and image.shape[2] == 4
                                                    else ""))
    if not bgr:
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def _check_size(h: int, w: int, name: str) -> None:
    if h < 1 or w < 1 or (h == 1 and w == 1):
        raise ValueError(f"{name}: an image of {w} x {h} pixels cannot be parsed (at least 2 "
                         "pixels along one side)")


# ---------------------------------------------------------------------- geometry

def box_affine(box, input_size) -> tuple[float, float, float, float]:
    """SCHP's centre/scale rule for ``box = [x0, y0, x1, y1]`` (pixels) and the
    forward (image -> input) map as ``(ax, bx, ay, by)``: ``x' = ax x + bx``,
    ``y' = ay y + by``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    hh, ww = int(input_size[0]), int(input_size[1])
    cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    bw, bh = x1 - x0, y1 - y0
    ar = ww / hh
    if bw > ar * bh:
        bh = bw / ar
    elif bw < ar * bh:
        bw = bh * ar
    if not bw > 0:
        raise ValueError(f"box {list(box)} is a single point: it has no size to parse")
    k = (ww - 1) / bw if ww > 1 else 1.0 / bw
    return k, (ww - 1) * 0.5 - k * cx, k, (hh - 1) * 0.5 - k * cy


def _inverse(affine) -> tuple[float, float, float, float]:
    """The inverse of ``(ax, bx, ay, by)`` computed as ``cv2.invertAffineTransform``
    computes it (``warpAffine`` samples through that inverse), so that sampling
    positions agree with OpenCV's to the last bit."""
    ax, bx, ay, by = (float(v) for v in affine)
    d = 1.0 / (ax * ay)
    iax, iay = ay * d, ax * d
    return iax, -iax * bx, iay, -iay * by


def _taps(n_out: int, n_src: int, a: float, b: float, device, dtype):
    """Bilinear taps: output i samples the source at ``a * i + b``;
    (i0, i1, w0, w1) with out-of-range taps weighted 0."""
    pos = a * torch.arange(n_out, dtype=torch.float64) + b
    f = torch.floor(pos)
    frac = pos - f
    i0 = f.long()
    i1 = i0 + 1
    w0 = torch.where((i0 >= 0) & (i0 < n_src), 1.0 - frac, torch.zeros_like(frac))
    w1 = torch.where((i1 >= 0) & (i1 < n_src), frac, torch.zeros_like(frac))
    i0, i1 = i0.clamp(0, n_src - 1), i1.clamp(0, n_src - 1)
    return (i0.to(device), i1.to(device), w0.to(device=device, dtype=dtype),
            w1.to(device=device, dtype=dtype))


def warp_to_input(image: torch.Tensor, affine, input_size) -> torch.Tensor:
    """H x W x 3 uint8 image (any device) -> 3 x H_in x W_in uint8, SCHP's
    ``cv2.warpAffine(image, M, (W_in, H_in), INTER_LINEAR, BORDER_CONSTANT, 0)``
    for the axis-aligned ``affine = (ax, bx, ay, by)``, exact bilinear (float64
    on the CPU, float32 on GPUs), rounded half to even like cv2's
    ``saturate_cast``. The four taps are gathered row by row (the map is
    axis-aligned) and summed in the order ``w00 a + w01 b + w10 c + w11 d``."""
    iax, ibx, iay, iby = _inverse(affine)
    hh, ww = int(input_size[0]), int(input_size[1])
    h, w = image.shape[0], image.shape[1]
    dtype = torch.float64 if image.device.type == "cpu" else torch.float32
    rows = _taps(hh, h, iay, iby, image.device, dtype)
    cols = _taps(ww, w, iax, ibx, image.device, dtype)
    acc = None
    for r, wr in ((rows[0], rows[2]), (rows[1], rows[3])):
        picked = image[r]                                   # H_in x w x 3 uint8
        for c, wc in ((cols[0], cols[2]), (cols[1], cols[3])):
            term = (wr[:, None, None] * wc[None, :, None]) * picked[:, c].to(dtype)
            acc = term if acc is None else acc + term
    return acc.round_().clamp_(0, 255).to(torch.uint8).permute(2, 0, 1)


# ---------------------------------------------------------------------- the parser

def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def _check_scales(scales) -> tuple:
    try:
        out = tuple(float(s) for s in scales)
    except TypeError:
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}") from None
    if not out or any(not (math.isfinite(s) and s > 0) for s in out):
        raise ValueError(f"scales must be positive finite numbers, got {scales!r}")
    return out


def _check_boxes(boxes, k: int) -> np.ndarray:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"boxes of image {k}: expected K x 4 numbers [x0, y0, x1, y1], got "
                        f"{type(boxes).__name__}") from None
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes of image {k}: expected K x 4 [x0, y0, x1, y1], got shape "
                         f"{tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"boxes of image {k}: non-finite coordinates")
    bad = np.nonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))[0]
    if bad.size:
        raise ValueError(f"boxes of image {k}: box {int(bad[0])} {arr[bad[0]].tolist()} has "
                         "x1 < x0 or y1 < y0 (boxes are [x0, y0, x1, y1])")
    return arr


class Parser:
    """SCHP's extractor as a batched, fused parser (see the module docstring).

    Args:
        checkpoint: a checkpoint path (SCHP's released ``{'state_dict':
            {'module.'...}}``, a lipfast.train checkpoint, or a plain state dict;
            read with ``weights_only=True``), or a :class:`lipfast.models.CE2P`
            already built (used as it is, in eval mode).
        dataset: ``"lip"``, ``"atr"`` or ``"pascal"``: input size, classes,
            names, flip pairs (:mod:`lipfast.data.settings`). A checkpoint
            whose class count differs is refused.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: the model's dtype (default float32; ``torch.bfloat16`` on GPUs
            is fastest; logits are post-processed in float32 in any case).
        flip, scales: test-time augmentation (default: none, as SCHP's extractor).
        compile: ``torch.compile`` the model (on the CPU with inductor's
            ``freezing``: weights prepacked for oneDNN). The first batch pays the
            compilation (about 30 s for ResNet-101 on a CPU); worth it for folders.
        fold: fold the norms into the convolutions (default True).
        channels_last: run the model channels_last (default True: faster on
            CUDA and, measured, on oneDNN CPUs too).
        forward_batch: crops per model call within a batch (default: 1 on the
            CPU, where oneDNN's convolutions were measured 30% slower per image
            at batch 8 than at batch 1; the whole batch on GPUs). Warping and
            post-processing stay batched.
        input_size: (H, W) to warp to instead of the dataset's (for models
            trained at another crop size); at least 2 x 2.
    """

    def __init__(self, checkpoint, dataset: str = "lip", device=None, dtype=None,
                 flip: bool = False, scales: Sequence[float] = (1.0,), compile: bool = False,
                 fold: bool = True, channels_last: Optional[bool] = None,
                 input_size: Optional[Sequence[int]] = None,
                 forward_batch: Optional[int] = None):
        from .models.checkpoint import checkpoint_config, model_from_checkpoint, read_checkpoint
        from .models.registry import input_format

        self.setting: DatasetSetting = dataset_setting(dataset)
        if input_size is None:
            self._input_size = tuple(self.setting.input_size)
        else:
            try:
                hh, ww = (int(v) for v in input_size)
            except (TypeError, ValueError):
                raise ValueError(f"input_size must be two ints (H, W), got {input_size!r}") from None
            if hh < 2 or ww < 2 or (hh, ww) != tuple(input_size):
                raise ValueError(f"input_size must be two ints >= 2, got {input_size!r}")
            self._input_size = (hh, ww)
        self.device = _resolve_device(device)
        if dtype is None:
            dtype = torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.flip = bool(flip)
        self.scales = _check_scales(scales)
        if isinstance(checkpoint, nn.Module):
            have = getattr(checkpoint, "num_classes", None)
            if have is not None:
                self.setting.check_num_classes(
                    have, f"the model given ({type(checkpoint).__name__})")
            model = copy.deepcopy(checkpoint)   # the caller's model stays as it is
        else:
            ckpt = read_checkpoint(checkpoint)
            self.setting.check_num_classes(checkpoint_config(ckpt)["num_classes"],
                                           f"checkpoint {ckpt.path!r}")
            model, _ = model_from_checkpoint(ckpt)
        model = model.eval()
        self.input_order, mean, std = input_format(model)
        if fold:
            from .models import fold_norms

            model = fold_norms(model)
        elif hasattr(model, "fuse_relu_conv"):
            model.fuse_relu_conv = False
        model = model.to(device=self.device, dtype=dtype)
        if channels_last is None:
            channels_last = True
        if forward_batch is None:
            forward_batch = 1 if self.device.type == "cpu" else 0
        if isinstance(forward_batch, bool) or not isinstance(forward_batch, int) or (
                forward_batch < 0):
            raise ValueError(f"forward_batch must be an int >= 1 (0: the whole batch), got "
                             f"{forward_batch!r}")
        self.forward_batch = forward_batch
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            # CPU: inductor's freezing folds the weights into the graph and prepacks
            # them for oneDNN (measured about 1.4x on the ResNet-101 forward here)
            opts = {"freezing": True} if self.device.type == "cpu" else None
            model = torch.compile(model, options=opts)
        self.model = model
        self._mean = torch.tensor(mean, device=self.device, dtype=torch.float64).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device, dtype=torch.float64).view(3, 1, 1)

    # -- properties
    @property
    def labels(self) -> tuple:
        """The class names, in index order."""
        return self.setting.labels

    @property
    def input_size(self) -> tuple:
        """(H, W) every image or box is warped to."""
        return self._input_size

    @property
    def palette(self) -> list:
        """The PASCAL VOC colour palette (flat list for ``PIL.Image.putpalette``)."""
        return lip_palette(256)

    # -- the pipeline
    def _fusion(self, x: torch.Tensor) -> torch.Tensor:
        n = self.forward_batch
        if n and x.shape[0] > n:
            return torch.cat([self._fusion(x[i:i + n]) for i in range(0, x.shape[0], n)])
        return full_size_logits(self.model, self.model(x), x.shape[-2:])

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised input -> fusion logits (float32, float64 for float64 models) (1/4 resolution, or
        the input resolution with several scales)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        pairs = self.setting.flip_pairs
        if self.scales == (1.0,):
            if self.flip:
                out = flip_logits(self._fusion, batch, pairs)
            else:
                out = self._fusion(batch)
        else:
            out = multi_scale_logits(self._fusion, batch, self.scales, self.flip, pairs,
                                     size=tuple(batch.shape[-2:]))
        return out if out.dtype in (torch.float32, torch.float64) else out.float()

    def _prepare(self, image: np.ndarray, affines) -> torch.Tensor:
        """One BGR uint8 image and its crops' affines -> K x 3 x H x W normalised input."""
        img = torch.from_numpy(image)
        if self.device.type == "cuda":
            img = img.pin_memory().to(self.device, non_blocking=True)
        crops = [warp_to_input(img, a, self.input_size) for a in affines]
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        x = torch.stack(crops).to(work).div_(255.0)
        if self.input_order == "RGB":   # HRNetV2: RGB, ImageNet's mean / std
            x = x.flip(1)
        return ((x - self._mean.to(work)) / self._std.to(work)).to(self.dtype)

    @torch.inference_mode()
    def parse_arrays(self, images: Sequence[np.ndarray], boxes=None, return_probs: bool = False,
                     return_logits: bool = False):
        """BGR uint8 H x W x 3 arrays (already decoded) -> one result per image;
        everything on the device in one batch (see :meth:`__call__`)."""
        hh, ww = self.input_size
        per_image = []   # list of (affine rows, box or None per crop)
        for k, im in enumerate(images):
            h, w = im.shape[:2]
            _check_size(h, w, f"image {k}")
            if boxes is None:
                per_image.append(([box_affine((0, 0, w - 1, h - 1), (hh, ww))], None))
            else:
                arr = _check_boxes(boxes[k], k)
                rows = []
                for j, b in enumerate(arr):
                    try:
                        rows.append(box_affine(b, (hh, ww)))
                    except ValueError as err:
                        raise ValueError(f"image {k}, box {j}: {err}") from None
                per_image.append((rows, arr))
        batch = [self._prepare(im, rows) for im, (rows, _) in zip(images, per_image) if rows]
        logits = self._logits(torch.cat(batch)) if batch else None
        results, at = [], 0
        for im, (rows, arr) in zip(images, per_image):
            h, w = im.shape[:2]
            kk = len(rows)
            lg = logits[at:at + kk] if kk else None
            at += kk
            results.append(self._finish(lg, rows, arr, (h, w), return_probs, return_logits))
        return results

    def _finish(self, logits, rows, boxes, size, return_probs, return_logits):
        h, w = size
        n = self.setting.num_classes
        maps = "logits" if return_logits else ("probs" if return_probs else None)
        if boxes is None:
            affine = torch.tensor(rows, dtype=torch.float64, device=logits.device)
            labels, m, _ = parse_postprocess(logits, affine, self.input_size, (h, w), maps=maps)
            labels = labels[0].cpu()
            if maps is None:
                return labels
            m = m[0]
            probs = (torch.softmax(m, 0) if return_logits else m).cpu() if return_probs else None
            lg = m.permute(1, 2, 0).contiguous().cpu() if return_logits else None
            return Parsing(labels, probs, lg)
        k = len(rows)
        if k == 0:
            zeros = torch.zeros((h, w), dtype=torch.uint8)
            empty = torch.zeros((0, h, w), dtype=torch.uint8)
            return Parsing(zeros, torch.zeros((0, n, h, w)) if return_probs else None,
                           torch.zeros((0, h, w, n)) if return_logits else None,
                           zeros.clone(), empty)
        affine = torch.tensor(rows, dtype=torch.float64, device=logits.device)
        labels, m, fg = parse_postprocess(logits, affine, self.input_size, (h, w), maps=maps,
                                          fg=True)
        # each person only inside its own box (clipped to the image)
        ys = torch.arange(h, device=labels.device)
        xs = torch.arange(w, device=labels.device)
        bx = torch.as_tensor(boxes, dtype=torch.float64, device=labels.device)
        inside = ((ys[None, :, None] >= bx[:, 1, None, None]) & (ys[None, :, None] <= bx[:, 3, None, None])
                  & (xs[None, None, :] >= bx[:, 0, None, None]) & (xs[None, None, :] <= bx[:, 2, None, None]))
        labels = labels * inside
        score = torch.where(inside, fg, torch.full_like(fg, -1.0))
        best = score.argmax(0)                                     # h x w
        covered = inside.any(0)
        combined = labels.gather(0, best[None])[0] * covered
        idx_dtype = torch.uint8 if k <= 255 else torch.int32
        instances = torch.where(combined > 0, best + 1, torch.zeros_like(best)).to(idx_dtype)
        probs = lg = None
        if maps is not None:
            m = m * inside[:, None]
            if return_probs:
                probs = (torch.softmax(m, 1) * inside[:, None] if return_logits else m).cpu()
            if return_logits:
                lg = m.permute(0, 2, 3, 1).contiguous().cpu()
        return Parsing(combined.cpu(), probs, lg, instances.cpu(), labels.cpu())

    def __call__(self, images, boxes=None, return_probs: bool = False,
                 return_logits: bool = False, batch_size: int = 8, bgr: bool = False):
        """Parses ``images``: one image (path, PIL image, H x W x 3 uint8 array or
        tensor) or a list of them, of any sizes.

        Returns per image an H x W uint8 label map (CPU tensor) at the image's
        size; with ``return_probs`` / ``return_logits`` or ``boxes`` a
        :class:`Parsing`. A list in gives a list out.

        ``boxes``: for one image a K x 4 sequence of ``[x0, y0, x1, y1]`` person
        boxes (pixels; partly outside the image is fine), for a list one such
        sequence per image. Each box is parsed as one person (SCHP's centre and
        scale rule on the box), all boxes of all images of a chunk in one
        batch; each pixel inside some box goes to the box with the highest
        foreground probability (1 - p(background)) there.
        ``batch_size``: images per device batch (boxes: crops per batch count
        whole images, so a batch may hold more crops).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if boxes is not None:
            boxes = [boxes] if single else list(boxes)
            if len(boxes) != len(items):
                raise ValueError(f"boxes: {len(boxes)} box lists for {len(items)} images")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            arrays = [load_image(im, bgr=bgr, name=f"image {start + i}")
                      for i, im in enumerate(chunk)]
            bx = None if boxes is None else boxes[start:start + batch_size]
            out.extend(self.parse_arrays(arrays, bx, return_probs, return_logits))
        return out[0] if single else out


# ---------------------------------------------------------------------- files

def save_parsing(labels: torch.Tensor, path, palette=None) -> None:
    """Writes an H x W uint8 label map as a palette PNG (mode P, PASCAL VOC
    colours), atomically."""
    from PIL import Image

    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(lip_palette(256) if palette is None else palette)
    with atomic_file(path) as f:
        im.save(f, format="PNG")


def save_picture(image_bgr: np.ndarray, labels, class_names, path) -> None:
    """Writes image | parsing with a legend naming the classes (PNG, atomically);
    ``image_bgr`` H x W x 3 uint8 BGR."""
    from .evaluate import picture

    rgb = torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    im = picture(rgb, [torch.as_tensor(labels)], ("image", "parsing"), len(class_names),
                 class_names)
    with atomic_file(path) as f:
        im.save(f, format="PNG")


def _save_npy(arr: np.ndarray, path) -> None:
    with atomic_file(path) as f:
        np.save(f, arr)


class _Folder(torch.utils.data.Dataset):
    """Decodes the images of a folder (in the loader's workers): item i is
    ``(i, BGR array or None, error or None)``."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(self.paths[i]), None
        except (ValueError, TypeError, OSError) as err:
            return i, None, str(err)


def _collate(items):
    return items


def _parse_batch(parser, good, paths, logits: bool, failed: list):
    """Parses the decoded ``good`` items ``(index, array)`` in one call and returns
    ``(items parsed, their results)``; when the call fails, image by image, so that
    one bad image does not sink the batch (its error goes to ``failed``)."""
    try:
        return good, parser.parse_arrays([a for _, a in good], return_logits=logits)
    except (ValueError, RuntimeError) as err:
        if len(good) == 1:
            failed.append((os.path.basename(paths[good[0][0]]), str(err)))
            return [], []
    kept, results = [], []
    for i, a in good:
        try:
            results.extend(parser.parse_arrays([a], return_logits=logits))
            kept.append((i, a))
        except (ValueError, RuntimeError) as err:
            failed.append((os.path.basename(paths[i]), str(err)))
    return kept, results


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m lipfast.parse",
        description="Parse every image of a folder with an SCHP checkpoint, as SCHP's "
                    "simple_extractor.py does: a palette PNG per image (and .npy logits "
                    "with --logits) under the image's name, written atomically.")
    p.add_argument("--dataset", default="lip", choices=("lip", "atr", "pascal"),
                   help="the checkpoint's dataset setting (default lip)")
    p.add_argument("--checkpoint", required=True, help="SCHP or lipfast checkpoint (.pth)")
    p.add_argument("--input-dir", required=True, help="folder of images (not recursive)")
    p.add_argument("--output-dir", required=True, help="where the PNGs (and .npy) go")
    p.add_argument("--logits", action="store_true",
                   help="also save <name>.npy: H x W x C float32 fusion logits at the image size")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image")
    p.add_argument("--scales", default="1",
                   help="comma-separated input scales to average, e.g. 0.75,1,1.25 (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default float32; bfloat16 is fastest on recent GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a one-off ~30 s on a CPU; faster after)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes decoding images (default 2; 0 decodes in the main process)")
    p.add_argument("--input-size", default=None, metavar="H,W",
                   help="warp to this size instead of the dataset's (models trained on other "
                        "crops)")
    p.add_argument("--vis", default=None, metavar="DIR",
                   help="also write <name>_vis.png pictures (image | parsing | legend) to DIR")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"),
                   help="progress display (default: a bar on a terminal, lines otherwise)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.input_size is not None:
        try:
            args.input_size = tuple(int(v) for v in args.input_size.split(","))
        except ValueError:
            p.error(f"--input-size must be H,W, got {args.input_size!r}")
    try:
        args.scales = _check_scales([float(s) for s in args.scales.split(",") if s.strip()])
    except (ValueError, TypeError) as err:
        p.error(f"--scales: {err}")
    return p, args


def main(argv=None) -> int:
    """The command line tool (``python -m lipfast.parse --help``). Exit status
    0 when every file was parsed, 1 when some were skipped, 2 for a usage error
    (bad checkpoint, empty folder, ...)."""
    from ._train_utils import Progress

    p, args = _parse_args(argv)
    if not os.path.isdir(args.input_dir):
        p.error(f"--input-dir {args.input_dir!r} is not a folder")
    names = sorted(n for n in os.listdir(args.input_dir)
                   if os.path.isfile(os.path.join(args.input_dir, n)))
    if not names:
        p.error(f"--input-dir {args.input_dir!r} holds no files")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output-dir {args.output_dir!r} exists and is not a folder")
    try:
        parser = Parser(args.checkpoint, dataset=args.dataset, device=args.device,
                        dtype=getattr(torch, args.dtype), flip=args.flip, scales=args.scales,
                        input_size=args.input_size, compile=args.compile)
    except (ValueError, TypeError, OSError) as err:
        p.error(str(err))
    os.makedirs(args.output_dir, exist_ok=True)

    failed: list[tuple[str, str]] = []
    outputs: dict[str, str] = {}
    paths = []
    for n in names:
        stem = os.path.splitext(n)[0]
        if stem in outputs:
            failed.append((n, f"its output {stem}.png would overwrite that of {outputs[stem]}"))
            continue
        outputs[stem] = n
        paths.append(os.path.join(args.input_dir, n))
    loader = torch.utils.data.DataLoader(_Folder(paths), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=_collate)
    progress = Progress(len(paths), prefix="parse", mode=args.progress, every=10)
    done = parsed = 0
    t0 = time.perf_counter()
    for items in loader:
        good = []
        for i, arr, err in items:
            if err is not None:
                failed.append((os.path.basename(paths[i]), err))
            else:
                good.append((i, arr))
        if good:
            good, results = _parse_batch(parser, good, paths, args.logits, failed)
            for (i, arr), res in zip(good, results):
                stem = os.path.splitext(os.path.basename(paths[i]))[0]
                labels = res.labels if isinstance(res, Parsing) else res
                save_parsing(labels, os.path.join(args.output_dir, stem + ".png"))
                if args.logits:
                    _save_npy(res.logits.numpy(), os.path.join(args.output_dir, stem + ".npy"))
                if args.vis:
                    save_picture(arr, labels, parser.labels,
                                 os.path.join(args.vis, stem + "_vis.png"))
                parsed += 1
        done += len(items)
        elapsed = time.perf_counter() - t0
        progress.update(done, f"{parsed / max(elapsed, 1e-9):.2f} img/s")
    progress.close()
    elapsed = time.perf_counter() - t0
    print(f"parsed {parsed} of {len(names)} files into {args.output_dir} in {elapsed:.1f} s "
          f"({parsed / max(elapsed, 1e-9):.2f} images/s)")
    if failed:
        print(f"skipped {len(failed)}:")
        for n, why in failed:
            print(f"  {n}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
