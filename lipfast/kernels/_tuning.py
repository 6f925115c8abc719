"""Configuration spaces, autotuning, resource pruning and pinning of lipfast's
Triton kernels.

Every kernel is registered here under a name (``oc_attention.fwd``,
``oc_attention.bwd_dv``, ``oc_attention.bwd_dx``, ``upsample_ce.fwd``,
``upsample_ce.bwd``, ``lovasz``, ``edge``, ``confusion_matrix``,
``parse_postprocess``) with

- a configuration space: a list of ``triton.Config`` (block sizes, the number of
  value/key-width passes where there is one, ``num_warps``, ``num_stages``); the
  first configuration that survives pruning is the kernel's default;
- a shape rule (``valid``): configurations that make no sense for the call
  (a channel block wider than the channels, more passes than the width rule
  allows, ...) are dropped;
- a resource estimate (``resources``: registers per thread and shared memory in
  bytes of one program): a configuration whose estimate exceeds the device's
  limits (:class:`Limits`: shared memory per block, 255 registers per thread) is
  dropped before any trial (``prune_configs_by={'early_config_prune': ...}``).

The kernels are wrapped in ``triton.autotune`` keyed on power-of-two buckets the
launchers compute and pass as (otherwise unused, unspecialised) kernel arguments
(``*_B``: size, channel and region-count buckets) and on the dtypes of the tensor
arguments (which ``triton.autotune`` adds to the key itself), so the tuning cache
holds a handful of entries per kernel, not one per shape. Kernels that accumulate
with atomics (``confusion_matrix``) restore their output between trials
(``restore_value``: the matrix is added to, not overwritten).

Choosing a configuration (:func:`launch`), in this order:

1. explicit block sizes given to a launcher (the tests' ``block_m=...``
   arguments), merged over the default configuration;
2. a pinned configuration: :func:`lipfast.kernels.pin_config` or the environment
   variable ``LIPFAST_TRITON_CONFIG="<kernel>:<key>=<value>,...;<kernel>:..."``,
   e.g. ``LIPFAST_TRITON_CONFIG="oc_attention.fwd:BLOCK_M=64,BLOCK_N=64,num_warps=4"``
   (keys not given keep the default's values; the function wins over the variable);
3. ``LIPFAST_TRITON_AUTOTUNE=0``, or Triton's interpreter (``TRITON_INTERPRET=1``):
   the default configuration (first after pruning), no trials;
4. otherwise ``triton.autotune``: every configuration that survives pruning is
   timed once per key (``TRITON_PRINT_AUTOTUNING=1`` prints the choice).

Under the interpreter the limits are those of sm_90, so the tests see the space a
Hopper GPU gets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

import torch
import triton

from . import KERNEL_NAMES as NAMES
CONFIG_KEYS = ("num_warps", "num_stages")  # besides each space's kwargs


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-block and per-SM resources of one GPU architecture."""
    arch: int
    smem_per_block: int  # opt-in maximum of dynamic shared memory of one block, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    regs_per_thread: int = 255
    warps_per_sm: int = 64
    blocks_per_sm: int = 32


LIMITS = {
    90: Limits(90, 232448, 233472),
    80: Limits(80, 166912, 167936),
    86: Limits(86, 101376, 102400, warps_per_sm=48, blocks_per_sm=16),
    89: Limits(89, 101376, 102400, warps_per_sm=48, blocks_per_sm=24),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> Limits:
    major, minor = torch.cuda.get_device_capability(index)
    arch = 10 * major + minor
    base = LIMITS.get(arch, LIMITS[80] if arch < 90 else LIMITS[90])
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None) or base.smem_per_block
    per_sm = getattr(props, "shared_memory_per_multiprocessor", None) or base.smem_per_sm
    return dataclasses.replace(base, arch=arch, smem_per_block=int(smem), smem_per_sm=int(per_sm))


def device_limits(args: dict) -> Limits:
    """The limits of the GPU holding the call's first tensor; sm_90's under the
    interpreter or for CPU tensors."""
    if not interpreting():
        for v in args.values():
            dev = getattr(v, "device", None)
            if dev is not None and dev.type == "cuda":
                return _cuda_limits(dev.index if dev.index is not None else torch.cuda.current_device())
    return LIMITS[90]


def bucket(n: int, lo: int = 1) -> int:
    """Power-of-two bucket (>= lo) of n, the autotuning key of a size."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def elem_size(t) -> int:
    return t.element_size() if hasattr(t, "element_size") else 4


@dataclasses.dataclass
class KernelSpec:
    name: str
    configs: list
    valid: Callable  # (kwargs of the config, num_warps, args) -> bool
    resources: Callable  # (kwargs, num_warps, num_stages, args) -> (regs/thread, smem bytes)
    tuner: object = None
    last: object = None  # the configuration of the last launch

    @property
    def fn(self):
        return self.tuner.fn

    def keys(self):
        out = []
        for c in self.configs:
            out.extend(k for k in c.kwargs if k not in out)
        return out + list(CONFIG_KEYS)


SPECS: dict[str, KernelSpec] = {}


def fits(spec: KernelSpec, cfg, args: dict, limits: Limits) -> bool:
    """Estimated registers per thread within 255 and within what one block of
    num_warps may hold (65536 / threads: 128 at 16 warps), shared memory within
    the per-block maximum."""
    regs, smem = spec.resources(cfg.kwargs, cfg.num_warps, cfg.num_stages, args)
    cap = min(limits.regs_per_thread, limits.regs_per_sm // (32 * cfg.num_warps))
    return regs <= cap and smem <= limits.smem_per_block


def prune(spec: KernelSpec, configs, args: dict, limits: Limits | None = None) -> list:
    """The configurations valid for the call's shapes whose resource estimate fits
    ``limits`` (the device's by default). Never empty: when nothing fits, the
    valid configuration of smallest estimated shared memory and registers."""
    limits = limits or device_limits(args)
    ok = [c for c in configs if spec.valid(c.kwargs, c.num_warps, args)]
    if not ok:
        raise ValueError(f"{spec.name}: no configuration of the space is valid for this call")
    keep = [c for c in ok if fits(spec, c, args, limits)]
    if keep:
        return keep
    return [min(ok, key=lambda c: tuple(reversed(spec.resources(c.kwargs, c.num_warps,
                                                                c.num_stages, args))))]


def _early_prune(spec, configs, named_args, **kwargs):
    return prune(spec, configs, {**named_args, **kwargs})


def autotuned(name: str, configs: list, key: list, valid, resources, restore_value=None,
              reset_to_zero=None):
    """Decorator: ``triton.autotune`` with the space, key and resource pruning of
    kernel ``name``; registers the kernel in :data:`SPECS`."""
    assert name in NAMES, name

    def deco(jitfn):
        spec = KernelSpec(name, list(configs), valid, resources)
        spec.tuner = triton.autotune(
            configs=spec.configs, key=key,
            prune_configs_by={"early_config_prune": functools.partial(_early_prune, spec)},
            restore_value=restore_value, reset_to_zero=reset_to_zero)(jitfn)
        SPECS[name] = spec
        return spec.tuner

    return deco


# ------------------------------------------------------------------------- pinning

_env_cache: tuple = (None, {})


def parse_config_env(text: str | None) -> dict:
    """``"k1:A=1,B=2;k2:C=3"`` -> {"k1": {"A": 1, "B": 2}, "k2": {"C": 3}}."""
    out: dict = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or name not in NAMES:
            raise ValueError(f"LIPFAST_TRITON_CONFIG: {part!r} is not '<kernel>:<key>=<value>,...' "
                             f"with a kernel among {', '.join(NAMES)}")
        cfg = {}
        for item in body.split(","):
            item = item.strip()
            if not item:
                continue
            k, eq, v = item.partition("=")
            try:
                cfg[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"LIPFAST_TRITON_CONFIG: {item!r} in {part!r} is not "
                                 "<key>=<integer>") from None
            if not eq:
                raise ValueError(f"LIPFAST_TRITON_CONFIG: {item!r} is not <key>=<integer>")
        out[name] = cfg
    return out


def _env_pins() -> dict:
    global _env_cache
    text = os.environ.get("LIPFAST_TRITON_CONFIG")
    if _env_cache[0] != text:
        _env_cache = (text, parse_config_env(text))
    return _env_cache[1]


def pinned(name: str) -> dict | None:
    from . import _pins

    if name in _pins:
        return _pins[name]
    return _env_pins().get(name)


def autotune_enabled() -> bool:
    return os.environ.get("LIPFAST_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no",
                                                                               "off")


def merge(spec: KernelSpec, base, override: dict):
    """``base`` (a triton.Config) with the keys of ``override`` replaced."""
    bad = [k for k in override if k not in spec.keys()]
    if bad:
        raise ValueError(f"{spec.name}: unknown configuration keys {bad}; the space has "
                         f"{spec.keys()}")
    kw = {k: v for k, v in override.items() if k not in CONFIG_KEYS}
    return triton.Config({**base.kwargs, **kw},
                         num_warps=override.get("num_warps", base.num_warps),
                         num_stages=override.get("num_stages", base.num_stages))


def choose(spec: KernelSpec, args: dict, explicit: dict | None = None):
    """The configuration a launch uses without trials, or None to autotune."""
    over = dict(pinned(spec.name) or {})
    over.update({k: v for k, v in (explicit or {}).items() if v is not None})
    if over or interpreting() or not autotune_enabled():
        base = prune(spec, spec.configs, args)[0]
        return merge(spec, base, over) if over else base
    return None


def launch(name: str, grid, args: tuple, kwargs: dict, explicit: dict | None = None):
    """Launches kernel ``name``: a pinned/default configuration without trials, or
    through ``triton.autotune``; ``grid`` is a function of the meta-parameters.
    Returns the configuration used (also in ``SPECS[name].last``)."""
    spec = SPECS[name]
    named = {**dict(zip(spec.fn.arg_names, args)), **kwargs}
    cfg = choose(spec, named, explicit)
    if cfg is None:
        spec.tuner[grid](*args, **kwargs)
        cfg = spec.tuner.best_config
    else:
        spec.fn[grid](*args, **kwargs, **cfg.all_kwargs())
    spec.last = cfg
    return cfg


def describe(cfg) -> str:
    items = [f"{k}={v}" for k, v in cfg.kwargs.items()]
    items += [f"num_warps={cfg.num_warps}", f"num_stages={cfg.num_stages}"]
    return ",".join(items)


def occupancy(regs: int, smem: int, warps: int, limits: Limits) -> dict:
    """Blocks per SM allowed by registers (allocated per warp in units of 256),
    shared memory (plus 1 KiB reserved per block) and warps; and the minimum."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = limits.regs_per_sm // (per_warp * warps)
    by_smem = limits.smem_per_sm // (smem + 1024)
    by_warps = limits.warps_per_sm // warps
    return dict(regs=by_regs, smem=by_smem, warps=by_warps,
                blocks=min(by_regs, by_smem, by_warps, limits.blocks_per_sm))
