"""lipfast's nn.Module wrappers: thin modules over the ops in :mod:`lipfast.ops`."""

from .abn import ABN, InPlaceABN, InPlaceABNSync

__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync"]
