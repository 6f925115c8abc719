"""The layout rules (README "Layout"), checked on the sources with ``ast``:

- ``lipfast/kernels`` imports nothing from the layers above it (ops, losses,
  metrics, models, nn, ...), lazy imports inside functions included; the kernel
  helpers that other layers import at module level do not import Triton at
  module level (lipfast works without Triton on CPU);
- every op in ``torch.ops.lipfast`` has its Python registration (fake kernel,
  CUDA kernel, autograd, ``custom_op``) in one file ``lipfast/ops/<file>.py``
  whose name is part of the op's name, and no file outside ``lipfast/ops``
  registers anything; ops with a C++ schema have it in ``csrc/ops/<file>.cpp``.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import pytest
import torch

import lipfast

ROOT = pathlib.Path(lipfast.__file__).resolve().parent  # .../lipfast
KERNELS = ROOT / "kernels"
OPS = ROOT / "ops"
CSRC = ROOT.parent / "csrc" / "ops"

# lipfast's layers above the kernels (and lipfast itself, which imports them all)
ABOVE = ("ops", "losses", "metrics", "models", "nn", "data", "patch", "pose", "train", "evaluate")

# torch.library calls that register something for an op named by their first argument
REGISTER_FUNCS = {"register_fake", "register_kernel", "register_autograd", "impl",
                  "impl_abstract", "custom_op", "define", "register_vmap",
                  "register_torch_dispatch", "register_autocast", "triton_op"}
# methods of a custom_op object that register something for it
OPDEF_METHODS = {"register_fake", "register_kernel", "register_autograd", "register_vmap",
                 "register_torch_dispatch", "register_autocast"}


def _py_files(folder: pathlib.Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _module_level(tree: ast.Module):
    """The nodes run at import time: everything but function and lambda bodies."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _imports(path: pathlib.Path, module_level_only: bool = False):
    """(line, absolute module name) of every import in ``path``, lazy imports in
    functions included unless ``module_level_only``; ``from X import name`` also
    gives ``X.name`` (``from .. import ops`` imports the package ``lipfast.ops``)."""
    tree = _tree(path)
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = ".".join(base[: len(base) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def _is_above(name: str) -> bool:
    return name == "lipfast" or any(
        name == f"lipfast.{layer}" or name.startswith(f"lipfast.{layer}.") for layer in ABOVE)


def test_kernels_import_nothing_from_above():
    files = _py_files(KERNELS)
    assert files, KERNELS
    bad = [f"{p.relative_to(ROOT.parent)}:{line}: imports {name}"
           for p in files for line, name in _imports(p) if _is_above(name)]
    assert not bad, ("lipfast/kernels must not import from the layers above it:\n"
                     + "\n".join(bad))


def _kernel_module_file(name: str) -> pathlib.Path | None:
    """The file of ``lipfast.kernels[.<sub>...]`` (None for a name inside a module)."""
    parts = name.split(".")[2:]
    path = KERNELS
    for i, part in enumerate(parts):
        if (path / part).is_dir():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return path / f"{part}.py"
        else:
            return None if i else KERNELS / "__init__.py"
    return path / "__init__.py"


def test_kernel_helpers_used_outside_load_without_triton():
    """Module-level imports of lipfast.kernels from the other layers reach only
    files that do not import Triton at module level (transitively)."""
    outside = [p for p in _py_files(ROOT) if KERNELS not in p.parents]
    todo = {}
    for p in outside:
        for line, name in _imports(p, module_level_only=True):
            if name == "lipfast.kernels" or name.startswith("lipfast.kernels."):
                f = _kernel_module_file(name)
                if f is not None:
                    todo.setdefault(f, f"{p.relative_to(ROOT.parent)}:{line}")
    bad, seen = [], set()
    while todo:
        f, why = todo.popitem()
        if f in seen:
            continue
        seen.add(f)
        for line, name in _imports(f, module_level_only=True):
            if name == "triton" or name.startswith("triton."):
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} imports {name} "
                           f"(reached from {why})")
            elif name == "lipfast.kernels" or name.startswith("lipfast.kernels."):
                g = _kernel_module_file(name)
                if g is not None and g not in seen:
                    todo.setdefault(g, why)
    assert not bad, "\n".join(bad)


def _registrations(path: pathlib.Path):
    """(op name, what, line) of every op registration in ``path``:
    ``torch.library.<fn>("lipfast::<op>", ...)`` calls and decorators, and the
    ``register_*`` methods of the objects ``custom_op("lipfast::<op>")`` makes;
    ("*", "Library", line) for a ``torch.library.Library("lipfast", ...)``."""
    tree = _tree(path)
    opdefs = {}  # variable name -> op, for custom_op-decorated functions
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and dec.func.attr in ("custom_op", "triton_op") and dec.args
                        and isinstance(dec.args[0], ast.Constant)
                        and str(dec.args[0].value).startswith("lipfast::")):
                    opdefs[node.name] = dec.args[0].value.split("::", 1)[1]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "Library" and node.args and isinstance(node.args[0], ast.Constant) and (
                node.args[0].value == "lipfast"):
            yield "*", "Library", node.lineno
        if name in REGISTER_FUNCS and node.args and isinstance(node.args[0], ast.Constant):
            value = node.args[0].value
            if isinstance(value, str) and value.startswith("lipfast::"):
                yield value.split("::", 1)[1].split(".")[0], name, node.lineno
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in OPDEF_METHODS
                and isinstance(node.value, ast.Name) and node.value.id in opdefs):
            yield opdefs[node.value.id], node.attr, node.lineno


def _lipfast_ops() -> set[str]:
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("lipfast::")}
    assert names, "no op registered under torch.ops.lipfast after import lipfast"
    return names


def test_no_registration_outside_ops():
    bad = [f"{p.relative_to(ROOT.parent)}:{line}: {what} for lipfast::{op}"
           for p in _py_files(ROOT) if OPS not in p.parents
           for op, what, line in _registrations(p)]
    assert not bad, ("op registrations belong in lipfast/ops/<op>.py:\n" + "\n".join(bad))


def _ops_registration_files() -> dict[str, dict[pathlib.Path, set[str]]]:
    found: dict = {}
    for p in _py_files(OPS):
        for op, what, _ in _registrations(p):
            found.setdefault(op, {}).setdefault(p, set()).add(what)
    return found


def test_every_op_registered_in_one_ops_file():
    found = _ops_registration_files()
    problems = []
    for op in sorted(_lipfast_ops()):
        files = found.get(op, {})
        if len(files) != 1:
            problems.append(f"lipfast::{op}: registered in {sorted(str(f) for f in files) or 'no file'}"
                            " of lipfast/ops (expected exactly one)")
            continue
        (path, whats), = files.items()
        if "register_fake" not in whats:
            problems.append(f"lipfast::{op}: no fake kernel in {path.name} ({sorted(whats)})")
        if path.stem not in op:
            problems.append(f"lipfast::{op}: registered in {path.name}, whose name is not part "
                            "of the op's")
    assert not problems, "\n".join(problems)


def _cpp_schemas() -> dict[str, pathlib.Path]:
    out = {}
    for cpp in sorted(CSRC.glob("*.cpp")):
        text = cpp.read_text(encoding="utf-8")
        for block in re.findall(r"TORCH_LIBRARY_FRAGMENT\(lipfast,\s*m\)\s*\{(.*?)\n\}", text,
                                re.S):
            for name in re.findall(r'm\.def\(\s*"(\w+)\(', block):
                out[name] = cpp
    return out


@pytest.mark.skipif(not CSRC.is_dir(), reason="no csrc/ next to the package (installed copy)")
def test_cpp_schemas_share_the_registration_file_name():
    schemas = _cpp_schemas()
    assert schemas, CSRC
    found = _ops_registration_files()
    problems = []
    for op in sorted(_lipfast_ops()):
        files = found.get(op, {})
        custom = any(w in ("custom_op", "triton_op") for ws in files.values() for w in ws)
        if op not in schemas:
            if not custom:
                problems.append(f"lipfast::{op}: neither a C++ schema in csrc/ops/*.cpp nor a "
                                "custom_op in lipfast/ops")
            continue
        if custom:
            problems.append(f"lipfast::{op}: both a C++ schema and a custom_op")
        for path in files:
            if path.stem != schemas[op].stem:
                problems.append(f"lipfast::{op}: schema in csrc/ops/{schemas[op].name}, "
                                f"registration in lipfast/ops/{path.name}")
    assert not problems, "\n".join(problems)


def _fake_kernel_file(qualname: str):
    """File that registered the fake kernel torch holds for ``qualname`` (torch
    internals; None when they have changed shape)."""
    try:
        from torch._library import custom_ops, simple_registry

        opdef = custom_ops._maybe_get_opdef(qualname)
        if opdef is not None:
            fn = opdef._abstract_fn
            return None if fn is None else pathlib.Path(inspect.getsourcefile(inspect.unwrap(fn)))
        kernel = simple_registry.singleton.find(qualname).fake_impl.kernel
        return None if kernel is None else pathlib.Path(kernel.source.rsplit(":", 1)[0])
    except (ImportError, AttributeError, TypeError):
        return None


def test_fake_kernels_torch_holds_come_from_ops():
    """The same rule seen from torch's side: the fake kernel registered for each
    op was registered by a file of lipfast/ops."""
    problems, unknown = [], []
    for op in sorted(_lipfast_ops()):
        path = _fake_kernel_file(f"lipfast::{op}")
        if path is None:
            unknown.append(op)
            continue
        path = path.resolve()
        if OPS not in path.parents:
            problems.append(f"lipfast::{op}: fake kernel registered from {path}")
    if unknown and not problems and len(unknown) == len(_lipfast_ops()):
        pytest.skip("this torch does not expose where fake kernels come from")
    assert not problems, "\n".join(problems)
    assert not unknown, f"no fake kernel found for {unknown}"
