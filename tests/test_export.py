"""ONNX / torch.export of folded CE2P models (lipfast.export): onnxruntime against
PyTorch at batch 1 and 3 (float32: |ort - torch| <= 1e-4 x max|out|), torch.export
with a dynamic batch, and the ``python -m lipfast.export`` command line on a
checkpoint in SCHP's release layout. One ONNX export per context (psp: the
command line's)."""

import contextlib
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from fold_helpers import assert_close_rel, flat, randomize, small_ce2p

import lipfast.export as lexport
from lipfast.export import DEFAULT_OPSET, OUTPUT_NAMES, export_onnx, main
from lipfast.models import CE2P, fold_norms, model_from_checkpoint

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CONTEXTS = ("psp", "base_oc", "pyramid_oc", "asp_oc")
#: onnxruntime vs PyTorch (float32), relative to max|out|
ORT_TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _cli(argv):
    """main(argv) with its stdout captured: (returned dict, stdout)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.filterwarnings("ignore")
        info = main(argv)
    return info, buf.getvalue()


@pytest.fixture(scope="module")
def schp_checkpoint(tmp_path_factory):
    """A small PSP CE2P with Pascal-Person-Part's 7 classes, saved as SCHP releases
    its weights: {'state_dict': {'module.' + key: tensor}, 'epoch': ...}, without
    num_batches_tracked (the vendored ABN has none)."""
    model = randomize(CE2P(num_classes=7, layers=(1, 1, 1, 1), width_mult=0.125), seed=9)
    state = {"module." + k: v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("ckpt") / "exp-schp-tiny-pascal.pth"
    torch.save({"state_dict": state, "epoch": 149, "cycle_n": 5}, path)
    return path


@pytest.fixture(scope="module")
def cli_export(schp_checkpoint, tmp_path_factory):
    """``python -m lipfast.export`` (as ``main``) once on the SCHP-layout checkpoint,
    into a folder that does not exist yet: (path, returned dict, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "sub" / "pascal.onnx"
    info, printed = _cli(["--checkpoint", str(schp_checkpoint), "--dataset", "pascal",
                          "--out", str(out)])
    return out, info, printed


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cli_export, schp_checkpoint):
    """{context: (folded model, input size, classes, path, export_onnx's dict)}."""
    folder = tmp_path_factory.mktemp("onnx")
    path, info, _ = cli_export
    model, _ = model_from_checkpoint(schp_checkpoint)
    out = {"psp": (fold_norms(model), (512, 512), 7, path, info)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for context in CONTEXTS[1:]:
            model, size = small_ce2p(context, "inplace_abn_sync", seed=7)
            path = folder / f"{context}.onnx"
            info = export_onnx(model, path, size)
            out[context] = (fold_norms(model), size, 20, path, info)
    return out


@pytest.mark.parametrize("context", CONTEXTS)
def test_onnx_matches_pytorch(exported, context):
    folded, (h, w), classes, path, info = exported[context]
    assert info["path"] == str(path) and os.path.getsize(path) == info["bytes"]
    assert info["opset"] == DEFAULT_OPSET
    assert info["inputs"] == {"image": ["batch", 3, h, w]}
    assert list(info["outputs"]) == list(OUTPUT_NAMES)
    hh, ww = -(-(-(-h // 2)) // 2), -(-(-(-w // 2)) // 2)
    assert info["outputs"]["parsing"] == ["batch", classes, hh, ww]
    assert info["outputs"]["fusion"] == ["batch", classes, hh, ww]
    assert info["outputs"]["edge"] == ["batch", 2, hh, ww]
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 3, h, w, generator=g)
        with torch.no_grad():
            expected = flat(folded(x))
        actual = sess.run(None, {"image": x.numpy()})
        for name, a, e in zip(OUTPUT_NAMES, actual, expected):
            assert a.dtype == np.float32
            assert_close_rel(torch.from_numpy(a), e, ORT_TOL, f"{context}/{name}/batch {batch}")


@pytest.mark.parametrize("context", CONTEXTS)
def test_torch_export_dynamic_batch(context):
    model, (h, w) = small_ce2p(context, "inplace_abn", seed=2)
    folded = model.for_inference()
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(folded, (torch.randn(2, 3, h, w),), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "lipfast" in t], targets
    x = torch.randn(3, 3, h, w)
    with torch.no_grad():
        expected = flat(model(x))
        actual = flat(ep.module()(x))
    for a, e in zip(actual, expected):
        assert_close_rel(a, e, 1e-4, context)


def test_export_onnx_leaves_the_model_alone_and_checks_arguments(tmp_path):
    model, size = small_ce2p("base_oc", "inplace_abn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "a.onnx", (0, 5))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", size, opset="18")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        export_onnx(model, tmp_path / "a.onnx", size)
    assert not list(tmp_path.iterdir())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------- the command line

def test_cli_end_to_end(cli_export, schp_checkpoint):
    out, info, printed = cli_export
    assert f"lipfast.export: wrote {out}" in printed
    assert "7 classes" in printed and "512 x 512" in printed and "SCHP release" in printed
    assert info["config"]["num_classes"] == 7 and info["config"]["context"] == "psp"
    assert info["inputs"] == {"image": ["batch", 3, 512, 512]}
    assert info["outputs"]["fusion"] == ["batch", 7, 128, 128]
    assert sorted(os.listdir(out.parent)) == ["pascal.onnx"]          # no temporary left
    # The ONNX model against the checkpoint's unfolded model (batch 2).
    model, _ = model_from_checkpoint(schp_checkpoint)
    x = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = flat(model(x))
    actual = _session(out).run(None, {"image": x.numpy()})
    for name, a, e in zip(OUTPUT_NAMES, actual, expected):
        assert_close_rel(torch.from_numpy(a), e, ORT_TOL, name)


def test_cli_refuses_a_class_count_mismatch(schp_checkpoint, tmp_path):
    out = tmp_path / "lip.onnx"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "lipfast.export", "--checkpoint",
                           str(schp_checkpoint), "--dataset", "lip", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "lipfast.export: error:" in proc.stderr
    assert "has 7 classes, but dataset 'lip' has 20" in proc.stderr
    assert not list(tmp_path.iterdir())                               # nothing written
    # An existing file stays as it was.
    out.write_bytes(b"old model")
    with pytest.raises(ValueError, match="has 7 classes, but dataset 'atr' has 18"):
        main(["--checkpoint", str(schp_checkpoint), "--dataset", "ATR", "--out", str(out)])
    assert out.read_bytes() == b"old model"
    assert sorted(os.listdir(tmp_path)) == ["lip.onnx"]


def test_failed_export_does_not_clobber(schp_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old model")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke")

    with monkeypatch.context() as mp:
        mp.setattr(lexport.torch.onnx, "export", broken)
        with pytest.raises(RuntimeError, match="exporter broke"):
            main(["--checkpoint", str(schp_checkpoint), "--dataset", "pascal", "--out",
                  str(out)])
    assert out.read_bytes() == b"old model"

    # A failure half-way through writing: the temporary file goes, the old file stays.
    # (A tiny stand-in with CE2P's output structure keeps this export quick.)
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return [[y, y * 2], [y[:, :2]]]

    real = lexport.atomic_file

    @contextlib.contextmanager
    def failing_atomic_file(path, mode="wb"):
        with real(path, mode) as f:
            f.write(b"partial")
            raise OSError("disk full")
        yield f  # pragma: no cover

    monkeypatch.setattr(lexport, "atomic_file", failing_atomic_file)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(Tiny().eval(), out, (8, 8))
    assert out.read_bytes() == b"old model"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


@pytest.mark.parametrize("head", ["seg"])   # the CE2P head exports as CE2P does (above)
def test_hrnet_exports(head, tmp_path):
    """HRNetV2 (width 18, small input): the seg head as one output ``logits``
    (onnxruntime against the folded model at batch 1 and 2; the CE2P head gives
    CE2P's three outputs, the same code path as above, and costs a minute more)."""
    from lipfast.export import SEG_OUTPUT_NAMES
    from lipfast.models import HRNetV2

    torch.manual_seed(0)
    model = randomize(HRNetV2(5, 18, head=head, norm="inplace_abn"), seed=4).eval()
    path = tmp_path / f"hrnet_{head}.onnx"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        info = export_onnx(model, path, (65, 49))
    names = list(SEG_OUTPUT_NAMES if head == "seg" else OUTPUT_NAMES)
    assert list(info["outputs"]) == names
    assert info["outputs"][names[0]] == ["batch", 5, 17, 13]
    folded = fold_norms(model)
    sess = _session(path)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 65, 49, generator=g)
        with torch.no_grad():
            out = folded(x)
        expected = [out] if head == "seg" else flat(out)
        actual = sess.run(None, {"image": x.numpy()})
        for name, a, e in zip(names, actual, expected):
            assert_close_rel(torch.from_numpy(a), e, ORT_TOL, f"hrnet {head}/{name}/{batch}")
