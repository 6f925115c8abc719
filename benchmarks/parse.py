#!/usr/bin/env python
"""In-the-wild parsing benchmark: image files -> label maps, lipfast.Parser against
SCHP's extractor (simple_extractor.py), on the same model.

Model: a random-weight CE2P / SCHP AugmentCE2P (ResNet-101, PSP, 20 LIP classes;
``--layers`` / ``--width-mult`` shrink it), built once: nn.BatchNorm2d norms with
positive weights (U(0.5, 1.5)) and random biases, running statistics set by one
train-mode forward of two smooth random 161 x 161 images (so that activations stay
in range), the fusion classifier then standardised per class on those images (a
random head predicts nearly one class everywhere; this one gives label maps of
many classes, so that their agreement means something), saved as
an SCHP-format checkpoint ``{'state_dict': {'module.' + k: v}}`` (no
num_batches_tracked) in a temporary folder. Both sides load that file:

  schp          tests/schp_reference.py (loaded by path), SCHP's pipeline per
                image, batch 1: cv2.imread, centre/scale, SCHP's three-point
                affine, cv2.warpAffine of the uint8 image, ToTensor + Normalize,
                the model as SCHP's CPU users run it (CE2P(norm="batchnorm"):
                BatchNorm + activation in place of the vendored In-Place ABN;
                float32), the fusion logits upsampled on the device, moved to the
                host, 20 per-channel cv2.warpAffine back to the image, numpy argmax.
  schp-<dtype>  (only with --dtype other than fp32) the same pipeline with the
                model in lipfast's dtype (and memory format): SCHP's code, lipfast's
                numeric precision, to separate the pipeline from the dtype.
  lipfast-b1    lipfast.Parser(checkpoint, "lip", device, dtype) called on the list
                of paths with batch_size=1 (PIL decoding, exact bilinear warps on
                the device, the model folded for inference, one fused
                post-processing op, labels as CPU tensors).
  lipfast-bN    the same with batch_size=N (--batch, default 8).
  lipfast-bN-compiled  (with --compile) the same with lipfast.Parser(compile=True).
  lipfast-bN forward   the model forward alone (Parser._logits) on the Parser's own
                normalised batch of the first N images: the share of lipfast-bN's
                time spent in the model is (forward ms / N) / (lipfast-bN ms / image).

Images: generated, smooth random colour fields with noise, of mixed sizes
(``--sizes``, default 640x480, 480x640, 1000x750, 512x384, 333x500, 800x600,
1280x720, 375x500, cycled; ``--images`` of them), written as JPEG (quality 90) into a
temporary folder: every pipeline decodes them from the files in every round
(cv2.imread for SCHP, PIL for lipfast).

One row times every pipeline on the whole image list (benchmarks/_timing.py,
shared by every benchmark: warm-up until each pipeline's last two rounds agree
within 10%, then rounds in which each pipeline processes all images once, in an
order rotated every round; CUDA synchronised; a wide spread or a busy machine is
warned about). Reported per pipeline: ms per image, median [p20-p80] of the
rounds divided by the number of images, images per second (the median's), the
speed-up over schp, peak memory, and the agreement of its label maps with schp's
(the fraction of pixels with the same label, over all images, from one untimed
pass before timing; lipfast's warps are exact bilinear and its decoder is PIL's,
so near-ties may move: below 100% is expected, well below is a bug). With
``--check-exact`` also the agreement with SCHP's pipeline run with exact warps
(tests/schp_reference.py, warp="exact"), which isolates OpenCV 4.x's 1/32-pixel
rounding from everything else.

Post-processing alone (a second row): SCHP's schp_postprocess (upsampling to the
input size on the device, the H x W x C map to the host, 20 cv2.warpAffine back,
argmax) against lipfast.ops.parse_postprocess (one op from the 1/4-resolution
logits, labels moved to the host), on the same random C x 119 x 119 float32 logits
on the device, back to ``--pp-size`` (default 1000x750, i.e. w x h), with their
label agreement.

Peak memory (one untimed pass over all images per pipeline, after one warm-up
image; the model's weights, loaded before, are excluded):

  CUDA  torch.cuda.max_memory_allocated minus memory_allocated before the pass
        (device memory only: SCHP's host-side cv2 work is not in it).
  CPU   ``--memory subprocess`` (default): each pipeline in a fresh Python process
        (MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the OS and RSS
        follows live memory); the kernel's peak-RSS mark VmHWM, reset through
        /proc/self/clear_refs (a 1 ms RSS sampling thread where that is refused),
        minus the RSS before the pass: what `top` would show growing, allocator
        overhead and numpy/cv2 buffers included. ``--memory inprocess``: the same
        mark in this process after gc and malloc_trim (cheaper; memory the
        allocator keeps from earlier pipelines can hide part of a peak).
        ``--memory none``: not measured.

Shapes: CUDA default 16 images, CPU 8 (the full ResNet-101 forward at 473 x 473
takes about 2 s per image on one Xeon core: a CPU run at the defaults takes about
ten minutes on 2 cores, ``--images 4`` halves it); ``--quick``: a reduced model (one Bottleneck per stage,
width x0.25), 4 small images (96x72 ... 50x75), 1 warm-up and 3 rounds, post-
processing to 120x90 (seconds; what the smoke test runs; figures not for quoting).
``--dtype bf16`` runs lipfast's model in bfloat16 (fastest on GPUs; logits are
post-processed in float32); ``--channels-last`` on/off (default: lipfast.Parser's,
on); on the CPU the Parser runs its model one crop at a time within a batch
(its ``forward_batch`` default), warping and post-processing batched. ``--json PATH`` writes the rows and the environment record (first after the
pipeline row with ``"partial": true``, so a run cut off keeps it, then complete).
On a CPU where other processes keep half the cores or more busy at the start,
the run uses one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402
from _common import PeakRSS, run_environment  # noqa: E402

import lipfast  # noqa: E402,F401

SCHP_REFERENCE = ROOT / "tests" / "schp_reference.py"
FULL_SIZES = "640x480,480x640,1000x750,512x384,333x500,800x600,1280x720,375x500"
QUICK_SIZES = "96x72,72x96,120x90,50x75"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DATASET = "lip"


def load_schp_reference():
    """tests/schp_reference.py as a module, loaded by its path (the benchmark does not
    depend on the tests package layout)."""
    name = "lipfast_bench_schp_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCHP_REFERENCE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        w, _, h = item.partition("x")
        out.append((int(w), int(h)))
        if out[-1][0] < 2 or out[-1][1] < 2:
            raise ValueError(f"size {item}: at least 2 x 2")
    if not out:
        raise ValueError("no sizes")
    return out


# --------------------------------------------------------------------------- inputs


def make_images(folder: Path, sizes, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEG files (sizes cycled, w x h) of smooth random colour with noise."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        low = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        p = folder / f"img_{i:03d}_{w}x{h}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(p))
    return paths


def model_config(args) -> dict:
    return dict(num_classes=20, layers=tuple(args.layers), width_mult=float(args.width_mult))


def _smooth_batch(g, n: int, size: int) -> torch.Tensor:
    """n normalised images like make_images' (smooth colour fields), n x 3 x size x size."""
    from lipfast.models.ce2p import LIP_MEAN, LIP_STD

    low = torch.rand(n, 3, size // 24 + 2, size // 24 + 2, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic",
                                        align_corners=False).clamp_(0, 1)
    mean = torch.tensor(LIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_checkpoint(path: Path, cfg: dict, seed: int = 0) -> dict:
    """The random-weight model as an SCHP checkpoint at ``path`` (see the docstring).
    Returns facts about it (parameters, entries)."""
    from lipfast.models import CE2P

    torch.manual_seed(seed)
    model = CE2P(norm="batchnorm", **cfg)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
            m.reset_running_stats()
            m.momentum = None  # cumulative: the statistics of the calibration batch
    x = _smooth_batch(g, 2, 161)
    model.train()
    with torch.no_grad():
        model(x)
    # The classifier standardised per class on the calibration images, so that the
    # label maps hold many classes (a random head predicts nearly one class
    # everywhere, which would make the label agreement say nothing).
    model.eval()
    head = model.fushion[-1]
    seen = []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        model(x)
        hook.remove()
        z = seen[0].transpose(0, 1).reshape(head.out_channels, -1)
        mean, std = z.mean(1), z.std(1).clamp_min(1e-6)
        head.weight.div_(std.view(-1, 1, 1, 1))
        head.bias.sub_(mean).div_(std)
    state = OrderedDict(("module." + k, v.detach().clone()) for k, v in model.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    torch.save({"state_dict": state}, path)
    return dict(entries=len(state), parameters=sum(p.numel() for p in model.parameters()))


def schp_model(ckpt: str, cfg: dict, device, dtype=torch.float32, channels_last=False):
    """The model as SCHP's extractor loads it: the state_dict entry, the first 7
    characters ('module.') cut off every key, loaded strictly; eval mode."""
    from lipfast.models import CE2P

    model = CE2P(norm="batchnorm", **cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(OrderedDict((k[7:], v) for k, v in state.items()))
    model = model.to(device=device, dtype=dtype).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _SCHPModel(nn.Module):
    """Casts the input to the model's memory format (for the schp-<dtype> row)."""

    def __init__(self, model, channels_last):
        super().__init__()
        self.model, self.channels_last = model, channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def pipeline_names(args) -> list[str]:
    names = ["schp"]
    if args.dtype != "fp32":
        names.append(f"schp-{args.dtype}")
    names += ["lipfast-b1"] + ([f"lipfast-b{args.batch}"] if args.batch != 1 else [])
    if args.compile:
        names.append(f"lipfast-b{args.batch}-compiled")
    return names


def make_parser(ckpt: str, device, args, compile: bool = False):
    return lipfast.Parser(ckpt, dataset=DATASET, device=device, dtype=DTYPES[args.dtype],
                          flip=False, scales=(1.0,), compile=compile, fold=not args.no_fold,
                          channels_last=_channels_last(args, device))


def _channels_last(args, device) -> bool | None:
    if args.channels_last == "auto":
        return None  # lipfast.Parser's default (on)
    return args.channels_last == "on"


def make_pipelines(names, ckpt: str, cfg: dict, paths, device, args) -> tuple[dict, object]:
    """name -> callable() that processes every path and returns the label maps; and
    the Parser (None when no lipfast pipeline is asked for)."""
    ref = load_schp_reference()
    from lipfast.data.settings import dataset_setting

    setting = dataset_setting(DATASET)
    fns, parser = {}, None
    for name in names:
        if name.startswith("schp"):
            low = name != "schp"
            dtype = DTYPES[args.dtype] if low else torch.float32
            cl = low and (args.channels_last == "on" or (args.channels_last == "auto"
                                                         and device.type == "cuda"))
            model = _SCHPModel(schp_model(ckpt, cfg, device, dtype, cl), cl).eval()

            def run(model=model, dtype=dtype):
                return [ref.schp_extract(model, ref.schp_read(p), setting, "cv2", device,
                                         dtype)[0] for p in paths]
        elif name.endswith("-compiled"):
            bs = int(name.split("-b")[1].split("-")[0])
            compiled = make_parser(ckpt, device, args, compile=True)

            def run(bs=bs, compiled=compiled):
                return compiled(list(paths), batch_size=bs)
        else:
            bs = int(name.split("-b")[1])
            if parser is None:
                parser = make_parser(ckpt, device, args)

            def run(bs=bs):
                return parser(list(paths), batch_size=bs)
        fns[name] = run
    return fns, parser


def forward_step(parser, paths, batch: int):
    """The Parser's model forward alone on its own normalised batch of the first
    ``batch`` images: (callable, images in the batch)."""
    from lipfast.parse import box_affine, load_image

    size = parser.input_size
    arrays = [load_image(p) for p in paths[:batch]]
    with torch.inference_mode():
        x = torch.cat([parser._prepare(a, [box_affine((0, 0, a.shape[1] - 1, a.shape[0] - 1),
                                                      size)]) for a in arrays])

    def run():
        with torch.inference_mode():
            return parser._logits(x)

    return run, len(arrays)


def exact_labels(ckpt: str, cfg: dict, paths, device) -> list:
    """SCHP's pipeline with exact warps (tests/schp_reference.py, warp="exact": no
    OpenCV fixed-point rounding) in float32: the label maps --check-exact compares with."""
    ref = load_schp_reference()
    from lipfast.data.settings import dataset_setting

    setting = dataset_setting(DATASET)
    model = schp_model(ckpt, cfg, device)
    return [ref.schp_extract(model, ref.schp_read(p), setting, "exact", device)[0]
            for p in paths]


def agreement(a_list, b_list) -> float:
    """Fraction of pixels with the same label, over all images."""
    same = total = 0
    for a, b in zip(a_list, b_list):
        a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
        b = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b)
        if a.shape != b.shape:
            raise AssertionError(f"label maps of different shapes {a.shape} and {b.shape}")
        same += int((a == b).sum())
        total += a.size
    return same / max(total, 1)


# --------------------------------------------------------------------------- memory


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn, device) -> dict:
    """Peak memory of fn() above what exists before it (see the docstring)."""
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return dict(peak_MiB=(torch.cuda.max_memory_allocated(device) - base) / 2**20,
                    how="cuda max_memory_allocated")
    _malloc_trim()
    rss = PeakRSS()
    fn()
    return dict(peak_MiB=rss.growth() / 2**20, how=f"RSS peak ({rss.how})",
                base_rss_MiB=rss.base / 2**20)


def _memory_worker(args) -> int:
    """Child process: one pipeline, one warm-up image, then the peak of one pass."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    every = sorted(str(p) for p in Path(args._image_dir).iterdir())
    name = args._memory_worker
    paths = every[:1]  # the pipelines read this list when called
    fns, _ = make_pipelines([name], args._ckpt, model_config(args), paths, device, args)
    fns[name]()
    paths[:] = every
    res = peak_memory(fns[name], device)
    res["pipeline"] = name
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def memory_subprocess(name, ckpt, image_dir, device, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", name,
           "--_ckpt", str(ckpt), "--_image-dir", str(image_dir), "--device", str(device),
           "--dtype", args.dtype, "--channels-last", args.channels_last, "--batch",
           str(args.batch), "--width-mult", str(args.width_mult), "--layers",
           ",".join(str(n) for n in args.layers),
           "--threads", str(args.threads or torch.get_num_threads())]
    cmd += ["--no-fold"] if args.no_fold else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop(_timing.PARSE_ONLY_ENV, None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {name} failed (exit {out.returncode}):\n"
                           f"{out.stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["how"] += ", fresh process"
    return res


# --------------------------------------------------------------------------- post-processing


def postprocess_case(device, pp_size, c: int = 20, seed: int = 0) -> dict:
    """(steps, labels check) of the post-processing row: the same C x 119 x 119 float32
    logits on the device, back to pp_size = (w, h)."""
    ref = load_schp_reference()
    import lipfast.ops

    pp = lipfast.ops.parse_postprocess
    if not callable(pp):  # the module, not the function
        pp = pp.parse_postprocess
    from lipfast.data.settings import dataset_setting

    input_size = tuple(dataset_setting(DATASET).input_size)
    w, h = pp_size
    g = torch.Generator().manual_seed(seed)
    hq = (input_size[0] + 3) // 4
    wq = (input_size[1] + 3) // 4
    # smooth logits (a 1/4-resolution map of a larger random field): realistic ties
    low = torch.randn(1, c, hq // 4 + 2, wq // 4 + 2, generator=g)
    logits = torch.nn.functional.interpolate(low, size=(hq, wq), mode="bilinear",
                                             align_corners=True)[0].contiguous().to(device)
    center, scale = ref.schp_center_scale(w, h, input_size)
    m_inv = ref.get_affine_transform(center, scale, 0, input_size, inv=True)
    rows = ref.affine_rows(ref.exact_affine(center, scale, input_size))
    affine = torch.tensor(rows[None], dtype=torch.float64, device=device)

    def schp():
        return ref.schp_postprocess(logits, m_inv, input_size, (h, w))[0]

    def fast():
        labels = pp(logits[None], affine, input_size, (h, w))[0]
        return labels[0].cpu()

    return dict(steps={"schp": schp, "lipfast": fast}, shape=(c, hq, wq), out=(h, w))


# --------------------------------------------------------------------------- command line

CPU_TIMING = _timing.Settings(warmup=1, max_warmup=3, max_warmup_seconds=300.0, min_rounds=5,
                              min_seconds=0.0, max_rounds=100, max_seconds=900.0)
CUDA_TIMING = _timing.Settings(warmup=2, max_warmup=10, max_warmup_seconds=20.0, min_rounds=8,
                               min_seconds=5.0, max_rounds=200, max_seconds=30.0)
QUICK_TIMING = _timing.QUICK
PP_CPU_TIMING = _timing.Settings(warmup=2, max_warmup=10, min_rounds=10, min_seconds=2.0,
                                 max_rounds=500, max_seconds=60.0)
PP_CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, max_warmup_seconds=10.0,
                                  min_rounds=20, min_seconds=2.0, max_rounds=1000,
                                  max_seconds=15.0)


def timing_defaults_help() -> str:
    return _timing.defaults_help(
        CPU_TIMING, CUDA_TIMING, QUICK_TIMING, "pass over all images",
        f"Post-processing row: CPU {PP_CPU_TIMING.as_flags()}; CUDA {PP_CUDA_TIMING.as_flags()}"
        " (the timing flags given apply to both rows). --reps is --min-rounds.")


def _layers(text: str) -> tuple:
    vals = tuple(int(v) for v in text.split(","))
    if len(vals) != 4 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: four counts >= 1, e.g. 3,4,23,3")
    return vals


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="reduced model, 4 small images, 1 warm-up and 3 rounds: seconds")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="lipfast's model dtype (default fp32; bf16 is the fast one on GPUs); "
                         "with another than fp32 a schp-<dtype> row runs SCHP's pipeline in it "
                         "too (the schp row stays float32, as SCHP)")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                    help="lipfast.Parser's channels_last (auto: the Parser's default, on), also used by the "
                         "schp-<dtype> row (the schp row is contiguous, as SCHP)")
    ap.add_argument("--compile", action="store_true",
                    help="add a lipfast-bN-compiled row: lipfast.Parser(compile=True) (on the "
                         "CPU inductor with freezing); its compilation falls in the warm-up")
    ap.add_argument("--no-fold", action="store_true",
                    help="lipfast.Parser(fold=False): keep the norms as modules")
    ap.add_argument("--batch", type=int, default=8, help="lipfast's batch row (default 8)")
    ap.add_argument("--images", type=int, default=None,
                    help="number of images (default: CUDA 16, CPU 8, --quick 4)")
    ap.add_argument("--sizes", default=None,
                    help=f"image sizes WxH, cycled (default {FULL_SIZES}; --quick {QUICK_SIZES})")
    ap.add_argument("--pp-size", default=None,
                    help="post-processing row: original size WxH (default 1000x750; --quick "
                         "120x90)")
    ap.add_argument("--layers", type=_layers, default=None,
                    help="Bottlenecks per stage (default 3,4,23,3 = ResNet-101; --quick 1,1,1,1)")
    ap.add_argument("--width-mult", type=float, default=None,
                    help="width factor of the model (default 1; --quick 0.25)")
    ap.add_argument("--memory", choices=("subprocess", "inprocess", "none"), default=None,
                    help="peak-memory method on CPU: subprocess (default; one fresh process "
                         "per pipeline, VmHWM), inprocess (VmHWM in this process) or none; "
                         "CUDA measures max_memory_allocated in process unless none")
    ap.add_argument("--check-exact", action="store_true",
                    help="also compare every pipeline's label maps with SCHP's pipeline with "
                         "exact warps (tests/schp_reference.py warp='exact', numpy float64: "
                         "seconds per large image, untimed)")
    ap.add_argument("--no-postprocess", action="store_true",
                    help="skip the post-processing row")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                         "when other processes keep half the cores or more busy at the start)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the rows and the environment")
    ap.add_argument("--_memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_image-dir", default=None, help=argparse.SUPPRESS)
    _timing.add_arguments(ap, timing_defaults_help())
    return ap


def _defaults(args, ap) -> None:
    gpu = torch.device(args.device).type == "cuda"
    if args.layers is None:
        args.layers = (1, 1, 1, 1) if args.quick else (3, 4, 23, 3)
    if args.width_mult is None:
        args.width_mult = 0.25 if args.quick else 1.0
    if not args.width_mult > 0:
        ap.error(f"--width-mult {args.width_mult}: must be positive")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: at least 1")
    if args.images is None:
        args.images = 4 if args.quick else (16 if gpu else 8)
    if args.images < 1:
        ap.error(f"--images {args.images}: at least 1")
    try:
        args.size_list = _parse_sizes(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
        args.pp = _parse_sizes(args.pp_size or ("120x90" if args.quick else "1000x750"))
    except ValueError as err:
        ap.error(f"--sizes / --pp-size: {err}")
    if len(args.pp) != 1:
        ap.error("--pp-size: one size WxH")
    args.pp = args.pp[0]
    if args.memory is None:
        args.memory = "subprocess"


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _defaults(args, ap)
    if args._memory_worker:
        return _memory_worker(args)
    _timing.exit_if_parse_only(args, __file__)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if gpu else CPU_TIMING))
    pp_settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (PP_CUDA_TIMING if gpu else PP_CPU_TIMING))
    env, machine, threads_note = run_environment(device, __file__, argv, args.threads)
    import cv2

    env["opencv"] = cv2.__version__
    cfg = model_config(args)
    sizes = " ".join(f"{w}x{h}" for w, h in args.size_list)
    print(f"device {device} ({env['device_name']}), threads {env['num_threads']}, model "
          f"CE2P layers {cfg['layers']} width x{cfg['width_mult']:g}, lipfast dtype "
          f"{args.dtype}, {args.images} images (sizes cycled: {sizes}), OpenCV {cv2.__version__}")
    _timing.print_run_header(env, settings)
    _timing.print_machine_notes(machine, threads_note)

    result = {"env": env, "args": {k: v for k, v in vars(args).items()
                                   if not k.startswith("_")},
              "timing_settings": _timing.settings_summary(settings),
              "postprocess_timing_settings": _timing.settings_summary(pp_settings)}
    with tempfile.TemporaryDirectory(prefix="lipfast-bench-parse-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "schp-random.pth"
        facts = build_checkpoint(ckpt, cfg)
        image_dir = tmp / "images"
        paths = make_images(image_dir, args.size_list, args.images)
        result["model"] = dict(cfg, **facts)
        result["images"] = [Path(p).name for p in paths]
        names = pipeline_names(args)
        fns, parser = make_pipelines(names, str(ckpt), cfg, paths, device, args)

        # One untimed pass each: the label maps' agreement with schp's.
        labels = {n: fn() for n, fn in fns.items()}
        agree = {n: agreement(labels[n], labels["schp"]) for n in names}
        agree_exact = {}
        if args.check_exact:
            exact = exact_labels(str(ckpt), cfg, paths, device)
            agree_exact = {n: agreement(labels[n], exact) for n in names}
            del exact
        del labels
        steps = dict(fns)
        fwd_name = f"lipfast-b{args.batch} forward"
        fwd, fwd_n = forward_step(parser, paths, args.batch)
        steps[fwd_name] = fwd
        m = _timing.measure(steps, device, settings)
        print(f"pipelines, ms per pass over {len(paths)} images: "
              + ", ".join(f"{k} {m[k].fmt()}" for k in steps)
              + f"; {m.rounds} rounds after {m.warmup_rounds} warm-up", flush=True)
        _timing.print_warnings(m, "  ")

        # Peak memory, one pipeline at a time.
        mem = {}
        for n in names if args.memory != "none" else ():
            if gpu or args.memory == "inprocess":
                mem[n] = peak_memory(fns[n], device)
            else:
                mem[n] = memory_subprocess(n, ckpt, image_dir, device, args)
        del fns, steps, fwd, parser
        gc.collect()

        n_img = len(paths)
        base = m["schp"].median / n_img
        rows = []
        for n in names:
            t = m[n]
            per = t.median / n_img
            rows.append(dict(pipeline=n, ms_per_image=per, p20_ms_per_image=t.p20 / n_img,
                             p80_ms_per_image=t.p80 / n_img, images_per_s=1e3 / per,
                             speedup_vs_schp=base / per, rounds=t.rounds,
                             pass_ms=t.summary()["times_ms"], warmup_ms=list(t.warmup_ms),
                             label_agreement_vs_schp=agree[n],
                             label_agreement_vs_schp_exact=agree_exact.get(n),
                             peak_MiB=mem.get(n, {}).get("peak_MiB"),
                             memory_how=mem.get(n, {}).get("how")))
        ft = m[fwd_name]
        b8 = m[f"lipfast-b{args.batch}"].median / n_img
        fwd_share = dict(forward_ms_per_batch=ft.median, p20_ms=ft.p20, p80_ms=ft.p80,
                         batch_images=fwd_n, forward_ms_per_image=ft.median / fwd_n,
                         share_of_lipfast_batch=(ft.median / fwd_n) / b8, rounds=ft.rounds)
        result.update(rows=rows, forward=fwd_share, timing=m.summary(times=False))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(result, partial=True), indent=1,
                                                  default=str))

        # Post-processing alone.
        if not args.no_postprocess:
            case = postprocess_case(device, args.pp)
            lab = {k: fn() for k, fn in case["steps"].items()}
            pp_agree = agreement([lab["lipfast"]], [lab["schp"]])
            pm = _timing.measure(case["steps"], device, pp_settings)
            print(f"post-processing {case['shape'][0]}x{case['shape'][1]}x{case['shape'][2]} "
                  f"-> {case['out'][0]}x{case['out'][1]} (h x w), ms: "
                  + ", ".join(f"{k} {pm[k].fmt()}" for k in case["steps"])
                  + f"; {pm.rounds} rounds after {pm.warmup_rounds} warm-up", flush=True)
            _timing.print_warnings(pm, "  ")
            pbase = pm["schp"].median
            result["postprocess"] = dict(
                logits_shape=list(case["shape"]), out_hw=list(case["out"]),
                label_agreement=pp_agree, timing=pm.summary(times=False),
                rows=[dict(impl=k, ms=pm[k].median, p20_ms=pm[k].p20, p80_ms=pm[k].p80,
                           rounds=pm[k].rounds, speedup_vs_schp=pbase / pm[k].median)
                      for k in case["steps"]])

    # Table.
    how = (rows[0]["memory_how"] + ", above the loaded model" if rows and rows[0]["memory_how"]
           else "not measured")
    print(f"\nper image over {n_img} images of mixed sizes (JPEG decoding included); peak "
          f"memory: {how}")
    ex = args.check_exact
    print("| pipeline | ms / image, median [p20-p80] | images / s | x schp | rounds | "
          "peak MiB | labels = schp |" + (" labels = schp exact warps |" if ex else ""))
    print("|---" * (8 if ex else 7) + "|")
    for r in rows:
        pk = "-" if r["peak_MiB"] is None else f"{r['peak_MiB']:.1f}"
        spread = _timing.fmt_spread(r["ms_per_image"], r["p20_ms_per_image"],
                                    r["p80_ms_per_image"])
        print(f"| {r['pipeline']} | {spread} | {r['images_per_s']:.2f} | "
              f"{r['speedup_vs_schp']:.2f} | {r['rounds']} | {pk} | "
              f"{100 * r['label_agreement_vs_schp']:.3f}% |"
              + (f" {100 * r['label_agreement_vs_schp_exact']:.3f}% |" if ex else ""))
    spread = _timing.fmt_spread(fwd_share["forward_ms_per_batch"], fwd_share["p20_ms"],
                                fwd_share["p80_ms"])
    print(f"lipfast-b{args.batch}: the model forward alone takes {spread} ms per batch of "
          f"{fwd_n} = {100 * fwd_share['share_of_lipfast_batch']:.0f}% of its time per image")
    if "postprocess" in result:
        p = result["postprocess"]
        print(f"\npost-processing alone, {'x'.join(map(str, p['logits_shape']))} logits -> "
              f"{p['out_hw'][0]} x {p['out_hw'][1]} (h x w), labels on the host:")
        print("| impl | ms, median [p20-p80] | x schp | rounds |")
        print("|---|---|---|---|")
        for r in p["rows"]:
            print(f"| {r['impl']} | {_timing.fmt_spread(r['ms'], r['p20_ms'], r['p80_ms'])} | "
                  f"{r['speedup_vs_schp']:.2f} | {r['rounds']} |")
        print(f"label agreement lipfast vs schp: {100 * p['label_agreement']:.3f}%")
    warned = [k for k in ("pipelines", "postprocess")
              if (result["timing"] if k == "pipelines" else result.get("postprocess", {})
                  .get("timing", {})).get("warnings")]
    if warned:
        print(f"timing warnings (see above) in: {', '.join(warned)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
