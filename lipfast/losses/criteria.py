"""Drop-in training criteria of SCHP, CE2P and OCNet (SPEC section 3).

Every prediction is upsampled (bilinear, align_corners=True) to the label size
once per head. Cross-entropies go through lipfast's fused
``upsample_cross_entropy`` (no full-resolution logits stored) when the head is
needed at full resolution for nothing else, else through ``F.cross_entropy`` on
the one upsampled tensor. Lovász-Softmax is ``lipfast.losses.lovasz_softmax``
(imported lazily). Edge weights are device tensors (no host sync).

- :class:`SCHPCriterion` (SCHP ``CriterionAll``): ``forward(preds, target,
  cycle_n=None)`` with ``preds = [[parsing, fusion], [edge]]`` (B x C x h x w,
  B x 2 x h x w) and ``target = [labels, edges]`` or ``[labels, edges,
  soft_preds, soft_edges]`` (the SCHP teacher's fusion and edge logits, at
  1/4 resolution or any size, or None). Per parsing head p, u = up(p):
  ``0.5 * lambda_1 * (Lovasz(softmax(u)) + CE(u))``; per edge head:
  ``lambda_2 * edge_loss``; plus ``lambda_3 * consistency``.
  With soft targets (SCHP's cycles >= 1) the CE of each parsing head becomes
  ``KL(u, t)`` with ``t = (1 - a) * up(soft_preds) + a * onehot(labels)``,
  a = 1 / (cycle_n + 1), and the edge CE becomes ``KL(up(edge), t_e)`` with
  ``t_e = (1 - a) * up(soft_edges) + a * onehot(edges)``; KL(u, t) =
  ``F.kl_div(log_softmax(u), softmax(t))`` averaged over all C elements of the
  pixels whose *parsing* label is != 255 (SCHP masks the edge KL by the
  parsing labels too; one-hot of an ignored label is class 0, as SCHP's
  ``to_one_hot``). The Lovász term stays. Each soft target is used only when
  present (SCHP tests ``target[2] is None`` and ``target[3] is None``);
  ``cycle_n`` is then required.

  Differences from upstream, deliberate: SCHP's ``to_one_hot`` overwrites the
  255s of the label tensor with 0 *in place*, so upstream, from the first KL
  term on, ignored pixels count as background (in later KL masks, in the second
  head's Lovász and in the consistency term); lipfast follows the SPEC (255 is
  ignored everywhere) and never modifies its inputs. The consistency term
  (SCHP ``ConsistencyLoss``: smooth-L1 between generated and predicted edges
  restricted to pixels where *both* are 1) is identically 0 upstream (or NaN
  when that set is empty) and carries no gradient; lipfast adds an exact 0
  without computing it.

- :class:`CE2PCriterion` (CE2P ``CriterionAll``): ``forward(preds, target)``,
  ``preds = [[parsing, fusion], [edge]]``, ``target = [labels, edges]``:
  sum of CE(up(p)) over parsing heads plus edge_loss over edge heads.

- :class:`OCNetCriterion` (OCNet ``CriterionDSN``): ``forward(preds, target)``,
  ``preds = [main, dsn]``: ``CE(up(main)) + dsn_weight * CE(up(dsn))`` with
  optional class ``weight``.

Means over no pixels (every label 255; an edge batch without edge pixels,
whose class weights are then 0) are 0 here, where upstream gives NaN (0 / 0),
the convention of lipfast's fused ``upsample_cross_entropy``; the Lovász term
is 0 there too (SPEC).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .edge import edge_loss, edge_weights, mean_ce, upsample_ce_or_eager


def _up(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _as_list(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def _long(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.long()


def _lovasz():
    try:
        from .lovasz import lovasz_softmax
    except ImportError as err:  # pragma: no cover - until lovasz.py lands
        raise NotImplementedError(
            "SCHPCriterion needs lipfast.losses.lovasz_softmax, which is not available") from err
    return lovasz_softmax


def _onehot(labels: torch.Tensor, num_classes: int, ignore_index: int, dtype) -> torch.Tensor:
    """B x C x H x W one-hot; ignored pixels -> class 0 (SCHP's to_one_hot),
    without modifying ``labels``."""
    lab = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).long()
    oh = torch.zeros((lab.shape[0], num_classes) + tuple(lab.shape[1:]), dtype=dtype,
                     device=lab.device)
    return oh.scatter_(1, lab.unsqueeze(1), 1)


def soft_kl(u: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
            ignore_index: int = 255) -> torch.Tensor:
    """SCHP's KLDivergenceLoss (T = 1): mean of F.kl_div(log_softmax(u), softmax(t))
    elements over the pixels with labels != ignore (C elements per pixel); 0 if none."""
    valid = (labels != ignore_index).unsqueeze(1)
    kl = F.kl_div(F.log_softmax(u, dim=1), F.softmax(t, dim=1), reduction="none")
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    count = (valid.sum() * u.shape[1]).to(kl.dtype)
    return kl.sum() / torch.where(count > 0, count, torch.ones_like(count))


class SCHPCriterion(nn.Module):
    """SCHP's ``CriterionAll`` (see the module docstring)."""

    def __init__(self, lambda_1: float = 1, lambda_2: float = 1, lambda_3: float = 0.1,
                 num_classes: int = 20, ignore_index: int = 255):
        super().__init__()
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.lambda_3 = lambda_3
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, preds, target, cycle_n=None):
        labels, edges = target[0], target[1]
        soft_preds = target[2] if len(target) > 2 else None
        soft_edges = target[3] if len(target) > 3 else None
        if (soft_preds is not None or soft_edges is not None) and cycle_n is None:
            raise ValueError("SCHPCriterion: soft targets need cycle_n (the self-correction cycle)")
        size = tuple(labels.shape[-2:])
        lab = _long(labels)
        alpha = None if cycle_n is None else 1.0 / (cycle_n + 1.0)
        lovasz = _lovasz()
        ign = self.ignore_index

        loss = 0
        for p in _as_list(preds[0]):
            if soft_preds is None:
                u = _up(p, size)  # the one upsample of this head, shared by both terms
                term = lovasz(u, lab, classes="present", per_image=False, ignore_index=ign,
                              from_logits=True) + mean_ce(u, lab, ignore_index=ign)
            else:
                u = _up(p, size)
                t = (1.0 - alpha) * _up(soft_preds, size) + alpha * _onehot(
                    lab, self.num_classes, ign, u.dtype)
                term = lovasz(u, lab, classes="present", per_image=False, ignore_index=ign,
                              from_logits=True) + soft_kl(u, t, lab, ign)
            loss = loss + 0.5 * self.lambda_1 * term

        for e in _as_list(preds[1]):
            if soft_edges is None:
                term = edge_loss(e, edges, ignore_index=ign)
            else:
                ue = _up(e, size)
                te = (1.0 - alpha) * _up(soft_edges, size) + alpha * _onehot(
                    _long(edges), 2, ign, ue.dtype)
                term = soft_kl(ue, te, lab, ign)
            loss = loss + self.lambda_2 * term

        # Consistency term: identically zero upstream, no gradient (module docstring).
        return loss + self.lambda_3 * 0.0


class CE2PCriterion(nn.Module):
    """CE2P's ``CriterionAll``: CE(up(parsing)) + CE(up(fusion)) + edge loss."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, preds, target):
        labels, edges = _long(target[0]), target[1]
        loss = 0
        for p in _as_list(preds[0]):
            loss = loss + upsample_ce_or_eager(p, labels, ignore_index=self.ignore_index)
        for e in _as_list(preds[1]):
            loss = loss + edge_loss(e, edges, ignore_index=self.ignore_index)
        return loss


class OCNetCriterion(nn.Module):
    """OCNet's ``CriterionDSN``: CE(up(main)) + dsn_weight * CE(up(dsn))."""

    def __init__(self, ignore_index: int = 255, weight=None, dsn_weight: float = 0.4):
        super().__init__()
        self.ignore_index = ignore_index
        self.dsn_weight = dsn_weight
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, preds, target):
        if isinstance(target, (list, tuple)):
            target = target[0]
        labels = _long(target)
        main, dsn = preds[0], preds[1]
        w = self.weight
        if w is not None:
            w = w.to(device=main.device, dtype=main.dtype if main.dtype == torch.float64
                     else torch.float32)
        loss = upsample_ce_or_eager(main, labels, weight=w, ignore_index=self.ignore_index)
        return loss + self.dsn_weight * upsample_ce_or_eager(dsn, labels, weight=w,
                                                             ignore_index=self.ignore_index)


__all__ = ["SCHPCriterion", "CE2PCriterion", "OCNetCriterion", "soft_kl", "edge_weights"]
