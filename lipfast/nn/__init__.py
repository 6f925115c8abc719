"""lipfast's nn.Module wrappers: thin modules over the ops in :mod:`lipfast.ops`."""

from .abn import ABN, InPlaceABN, InPlaceABNSync
from .oc import (
    ASP_OC_Module,
    ASPOCModule,
    BaseOC_Context_Module,
    BaseOC_Module,
    BaseOCContextModule,
    BaseOCModule,
    OCModule,
    Pyramid_OC_Module,
    PyramidOCModule,
    PyramidSelfAttentionBlock2D,
    SelfAttentionBlock2D,
    attention_torch,
)

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
    "attention_torch",
]
