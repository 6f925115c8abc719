"""Export a parsing checkpoint to ONNX (SCHP's in-the-wild settings).

``python -m lipfast.export --checkpoint PATH --dataset lip|atr|pascal --out model.onnx
[--opset N] [--output-stride 8|16] [--schp]``

- The checkpoint is read by :func:`lipfast.models.model_from_checkpoint`
  (``torch.load(weights_only=True)``): SCHP's released checkpoints
  (``{'state_dict': {'module.' + key: tensor}}``, e.g.
  ``exp-schp-201908261155-lip.pth``), ``lipfast.train`` checkpoints (``--schp``:
  their self-correction model) or a plain state_dict; the CE2P configuration
  comes from the keys. ``--output-stride`` leaves no trace in the keys (default:
  the stored one, else 16, SCHP's).
- ``--dataset`` (:func:`lipfast.data.settings.dataset_setting`) gives the input
  size (LIP 473 x 473, ATR and Pascal-Person-Part 512 x 512) and the class
  count (20, 18, 7); a checkpoint with another class count is refused before
  anything is written (the message names both numbers).
- The model is folded (:func:`lipfast.models.fold_norms`: norms into the
  convolutions, plain-PyTorch attention and ReLU -> conv, no lipfast op), cast
  to float32 and exported with ``torch.onnx.export(..., dynamo=True)`` (the
  ``torch.export``-based exporter, torch's default; the batch dimension is a
  ``torch.export.Dim``), default opset :data:`DEFAULT_OPSET`.
- The file is written atomically (:func:`lipfast._io.atomic_file`: a temporary
  file in the same folder, renamed over ``--out``): a failed export leaves an
  existing file as it was. The weights are stored inside the file (no external
  data). What was written is printed.

The ONNX model:

- input ``image``: float32, ``batch x 3 x H x W`` at the dataset's input size, the
  batch dynamic; BGR in [0, 1] normalised with :data:`lipfast.models.LIP_MEAN` /
  :data:`lipfast.models.LIP_STD` (SCHP's preprocessing; the image resized /
  affine-warped to H x W as SCHP's in-the-wild extractor does).
- outputs (float32 logits at 1/4 of the input resolution, ``h = ceil(ceil(H / 2) / 2)``,
  e.g. 119 x 119 for 473 x 473): ``parsing`` (``batch x classes x h x w``, the
  decoder's), ``fusion`` (``batch x classes x h x w``, the final prediction SCHP
  uses: upsample it bilinearly with align_corners=True to H x W and arg-max
  over the classes) and ``edge`` (``batch x 2 x h x w``, edge logits).

HRNetV2 checkpoints export the same way: with the CE2P head the outputs above;
with ``head="seg"`` one output ``logits`` (``batch x classes x h x w``; upsample
with align_corners=False, HRNet's setting); the input is **RGB** normalised with
:data:`lipfast.models.HRNET_MEAN` / :data:`lipfast.models.HRNET_STD`.

Python: :func:`export_onnx` exports any CE2P-like model (``forward`` returning
``[[parsing, fusion], [edge]]``) or a model returning one logits tensor.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn as nn

from ._io import atomic_file
from .data.settings import DATASETS, dataset_setting
from .models.checkpoint import checkpoint_config, model_from_checkpoint, read_checkpoint
from .models.fold import fold_norms
from .models.registry import describe_hparams, input_format

__all__ = ["DEFAULT_OPSET", "OUTPUT_NAMES", "export_onnx", "main"]

#: ONNX opset written by default: the lowest one the torch.export-based exporter
#: implements directly (no version conversion), run by onnxruntime >= 1.14.
DEFAULT_OPSET = 18
#: names of the ONNX model's outputs, in order
OUTPUT_NAMES = ("parsing", "fusion", "edge")
INPUT_NAME = "image"


#: the output of a model with one logits tensor (HRNetV2 with ``head="seg"``)
SEG_OUTPUT_NAMES = ("logits",)


class _Outputs(nn.Module):
    """CE2P's ``[[parsing, fusion], [edge]]`` as a flat tuple (the ONNX outputs);
    a single-tensor output (HRNetV2 ``head="seg"``) as it is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        out = self.model(image)
        if isinstance(out, torch.Tensor):
            return out
        return out[0][0], out[0][1], out[1][0]


def _size(input_size) -> tuple[int, int]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    try:
        h, w = (int(v) for v in input_size)
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                 for v in input_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"export_onnx: input_size must be (H, W) positive ints, got "
                         f"{input_size!r}")
    return h, w


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def export_onnx(model: nn.Module, path, input_size, opset: int = DEFAULT_OPSET) -> dict:
    """Exports ``model`` (a CE2P in eval mode, folded or not; it is left unchanged) to
    the ONNX file ``path``, written atomically, and returns what was written:
    ``{"path", "bytes", "opset", "inputs": {name: shape}, "outputs": {name: shape}}``
    (a shape entry is ``"batch"`` for the dynamic dimension).

    The model is folded (:func:`lipfast.models.fold_norms`) and cast to float32;
    input ``image`` (``batch x 3 x H x W``, ``input_size = (H, W)`` or one int,
    batch dynamic), outputs :data:`OUTPUT_NAMES` (see the module docstring).
    Exported with ``torch.onnx.export(dynamo=True)`` at ``opset``."""
    h, w = _size(input_size)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise ValueError(f"export_onnx: opset must be an int (e.g. {DEFAULT_OPSET}), got "
                         f"{opset!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder")
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"export_onnx needs {' and '.join(missing)} (torch.onnx's exporter): "
                           f"pip install {' '.join(missing)}")
    folded = _Outputs(fold_norms(model).float()).eval()
    # A batch of 2 as the example: export specialises sizes 0 and 1.
    example = torch.zeros(2, 3, h, w, dtype=torch.float32,
                          device=next(folded.parameters()).device)
    batch = torch.export.Dim("batch", min=1)
    single = getattr(model, "head", "ce2p") == "seg"
    names = SEG_OUTPUT_NAMES if single else OUTPUT_NAMES
    program = torch.onnx.export(folded, (example,), dynamo=True, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=list(names),
                                dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    foreign = sorted({n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
                      for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"export_onnx: the exported graph has non-standard ops {foreign}")
    data = proto.SerializeToString()
    with atomic_file(path) as f:
        f.write(data)
    return {
        "path": path,
        "bytes": len(data),
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {i.name: _shape(i) for i in proto.graph.input},
        "outputs": {o.name: _shape(o) for o in proto.graph.output},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lipfast.export",
        description="Export a parsing checkpoint (SCHP's release layout, lipfast.train's or a "
                    "plain state_dict) to ONNX at a dataset's input size, norms folded, "
                    "dynamic batch.")
    p.add_argument("--checkpoint", required=True,
                   help="SCHP release checkpoint ({'state_dict': {'module.*': ...}}), "
                        "lipfast.train checkpoint or plain state_dict")
    p.add_argument("--dataset", required=True, choices=tuple(DATASETS), type=str.lower,
                   help="input size and class count: lip 473x473 / 20, atr 512x512 / 18, "
                        "pascal 512x512 / 7")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--output-stride", type=int, choices=(8, 16), default=None,
                   help="not visible in the keys: default the stored one, else 16 (SCHP)")
    p.add_argument("--schp", action="store_true",
                   help="export the self-correction model stored in a lipfast.train checkpoint")
    return p


def main(argv=None) -> dict:
    """The command line; returns :func:`export_onnx`'s dict (plus ``"config"``)."""
    args = build_parser().parse_args(argv)
    setting = dataset_setting(args.dataset)
    ckpt = read_checkpoint(args.checkpoint)
    cfg = checkpoint_config(ckpt, output_stride=args.output_stride)
    setting.check_num_classes(cfg["num_classes"], f"checkpoint {args.checkpoint!r}")
    model, cfg = model_from_checkpoint(ckpt, which="schp_model" if args.schp else "model",
                                       output_stride=args.output_stride)
    info = export_onnx(model, args.out, setting.input_size, opset=args.opset)
    info["config"] = cfg

    def shape(s):
        return " x ".join(map(str, s))

    outs = ", ".join(f"{k} [{shape(s)}]" for k, s in info["outputs"].items())
    ins = ", ".join(f"{k} [{shape(s)}]" for k, s in info["inputs"].items())
    order = input_format(model)[0]
    norm_names = "LIP_MEAN / LIP_STD" if order == "BGR" else "HRNET_MEAN / HRNET_STD"
    print(f"lipfast.export: wrote {info['path']} ({info['bytes'] / 2**20:.1f} MiB, ONNX opset "
          f"{info['opset']}): {describe_hparams(cfg)}, norms folded, from {args.checkpoint} "
          f"({ckpt.description}); input {ins} float32 ({order}, {norm_names} normalised, "
          f"{setting.name} {setting.input_size[0]} x {setting.input_size[1]}); "
          f"outputs {outs} (float32 logits)", flush=True)
    return info


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"lipfast.export: error: {err}", file=sys.stderr)
        sys.exit(2)
