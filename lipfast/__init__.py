"""lipfast: fast, checked kernels for human-parsing models (CE2P, SCHP, OCNet).

Importing lipfast loads the compiled extension ``lipfast._C`` (building it just
in time when the installed one is missing or was built for another torch) and
registers the ops under ``torch.ops.lipfast``. Subpackages: ``nn`` (ABN, OC
modules), ``ops``, ``losses``, ``metrics``, ``models`` (CE2P, HRNetV2,
PoseHRNet), ``data`` (LIP, CIHP, LIP pose), ``pose`` (heatmap loss, decoding,
PCKh), ``patch``; :class:`lipfast.Parser` parses photos with SCHP's models. The tools:
``python -m lipfast.train`` / ``evaluate`` / ``parse`` / ``export``.

Layers, bottom up: ``kernels`` (Triton, imports nothing from lipfast above it) ->
``ops`` (every op's Python registration, ``lipfast/ops/<op>.py``) -> ``nn``,
``losses``, ``metrics`` (the user-facing functions and modules) -> ``models`` ->
the tools (``tests/test_layout.py`` checks the first two rules).
"""

from ._ext import build_info
from .nn import (
    ABN,
    ASP_OC_Module,
    ASPOCModule,
    BaseOC_Context_Module,
    BaseOC_Module,
    BaseOCContextModule,
    BaseOCModule,
    InPlaceABN,
    InPlaceABNSync,
    OCModule,
    Pyramid_OC_Module,
    PyramidOCModule,
    PyramidSelfAttentionBlock2D,
    SelfAttentionBlock2D,
)
from . import losses, metrics, models
from .patch import patch
from .ops import inplace_abn, inplace_abn_sync, oc_attention

__version__ = "0.1.0"


def __getattr__(name):
    # lipfast.Parser is imported on first use, so that ``python -m lipfast.parse``
    # does not find lipfast.parse already imported by the package.
    if name in ("Parser", "Parsing"):
        from . import parse

        return getattr(parse, name)
    raise AttributeError(f"module 'lipfast' has no attribute {name!r}")

__all__ = [
    "ABN",
    "InPlaceABN",
    "InPlaceABNSync",
    "OCModule",
    "BaseOCModule",
    "BaseOCContextModule",
    "PyramidOCModule",
    "ASPOCModule",
    "SelfAttentionBlock2D",
    "PyramidSelfAttentionBlock2D",
    "BaseOC_Module",
    "BaseOC_Context_Module",
    "Pyramid_OC_Module",
    "ASP_OC_Module",
    "build_info",
    "inplace_abn",
    "inplace_abn_sync",
    "losses",
    "metrics",
    "models",
    "patch",
    "oc_attention",
    "Parser",
    "Parsing",
]
