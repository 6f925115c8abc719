"""Losses of the human-parsing family (SPEC section 3): the user-facing functions
and modules. The ops they call (``upsample_ce``, ``generate_edge``,
``lovasz_softmax_loss``) are registered in :mod:`lipfast.ops`."""

from .criteria import CE2PCriterion, OCNetCriterion, SCHPCriterion
from .edge import edge_loss, generate_edge
from .lovasz import LovaszSoftmax, lovasz_softmax
from .upsample_ce import UpsampleCrossEntropy, upsample_cross_entropy
