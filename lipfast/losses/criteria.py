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

Bad input raises ValueError/TypeError naming the criterion: ``preds`` / ``target``
not of the structure above (e.g. a plain tensor, ``[labels]`` without edges),
parsing predictions (and ``soft_preds``) whose channel count is not
``SCHPCriterion``'s ``num_classes`` (checked in every cycle), edge predictions
(and ``soft_edges``) without 2 channels, non-integer labels, ``cycle_n < 0``,
negative or non-finite ``lambda_*`` / ``dsn_weight`` / class weights. Errors of a
loss term carry its name after the criterion's (``SCHPCriterion: edge_loss:
edge labels must be 0, 1 or ignore_index=255, found 3``). No host sync: label
values are checked by the ops (on CUDA with ``torch._assert_async``).

Means over no pixels (every label 255; an edge batch without edge pixels,
whose class weights are then 0) are 0 here, where upstream gives NaN (0 / 0),
the convention of lipfast's fused ``upsample_cross_entropy``; the Lovász term
is 0 there too (SPEC).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .edge import edge_loss, edge_weights, mean_ce, upsample_ce_or_eager
from .upsample_ce import check_ignore_index, class_weight_buffer

_CE2P_PREDS = "[[parsing, fusion], [edge]] (CE2P/SCHP's output)"


def _up(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _long(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.long()


# ----------------------------------------------------------------- argument checks
def _described(x) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _nonneg(value, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return value


def _heads(x, what: str, owner: str) -> list:
    """A head group of ``preds`` (one tensor or a list of them) as a list of 4-D tensors."""
    items = [x] if isinstance(x, torch.Tensor) else x
    if not isinstance(items, (list, tuple)) or len(items) == 0 or not all(
            isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{owner}: preds must be {_CE2P_PREDS}; its {what} entry must be a "
                        f"tensor or a non-empty list of tensors, got {_described(x)}")
    for i, t in enumerate(items):
        if t.dim() != 4:
            raise ValueError(f"{owner}: {what} prediction {i} must be B x C x h x w, got shape "
                             f"{tuple(t.shape)}")
    return list(items)


def _ce2p_preds(preds, owner: str) -> tuple[list, list]:
    """(parsing heads, edge heads) of ``[[parsing, fusion], [edge]]``."""
    if not isinstance(preds, (list, tuple)):
        raise TypeError(f"{owner}: preds must be {_CE2P_PREDS}, got {_described(preds)}")
    if len(preds) != 2:
        raise ValueError(f"{owner}: preds must be {_CE2P_PREDS}, got {_described(preds)}")
    parsing, edge = _heads(preds[0], "parsing", owner), _heads(preds[1], "edge", owner)
    for i, e in enumerate(edge):
        if e.shape[1] != 2:
            raise ValueError(f"{owner}: edge prediction {i} has {e.shape[1]} channels, "
                             "expected 2")
    return parsing, edge


def _labels(t, name: str, owner: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a B x H x W integer tensor, got "
                        f"{type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be an integer tensor, got {t.dtype}")
    return t


def _target(target, owner: str, lengths: tuple, expect: str) -> list:
    if not isinstance(target, (list, tuple)):
        raise TypeError(f"{owner}: target must be {expect}, got {_described(target)}")
    if len(target) not in lengths:
        raise ValueError(f"{owner}: target must be {expect}, got {_described(target)}")
    return list(target)


@contextlib.contextmanager
def _named(owner: str):
    """Prefixes the ValueError/TypeError of a loss term with the criterion's name, so
    that the message names what the user called (e.g. ``SCHPCriterion: edge_loss:
    ...``)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError) or str(err).startswith(owner):
            raise
        raise type(err)(f"{owner}: {err}") from err


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
        owner = "SCHPCriterion"
        self.lambda_1 = _nonneg(lambda_1, "lambda_1", owner)
        self.lambda_2 = _nonneg(lambda_2, "lambda_2", owner)
        self.lambda_3 = _nonneg(lambda_3, "lambda_3", owner)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{owner}: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = check_ignore_index(ignore_index, owner)

    def _check(self, preds, target, cycle_n):
        owner = "SCHPCriterion"
        parsing, edge = _ce2p_preds(preds, owner)
        for i, p in enumerate(parsing):
            if p.shape[1] != self.num_classes:
                raise ValueError(f"{owner}: parsing prediction {i} has {p.shape[1]} channels "
                                 f"but num_classes={self.num_classes}")
        target = _target(target, owner, (2, 3, 4),
                         "[labels, edges] or [labels, edges, soft_preds, soft_edges]")
        labels = _labels(target[0], "labels", owner)
        edges = _labels(target[1], "edges", owner)
        soft_preds = target[2] if len(target) > 2 else None
        soft_edges = target[3] if len(target) > 3 else None
        for t, name, c in ((soft_preds, "soft_preds", self.num_classes), (soft_edges,
                                                                           "soft_edges", 2)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{owner}: {name} must be a B x C x h x w tensor or None, got "
                                f"{_described(t)}")
            if t.dim() != 4:
                raise ValueError(f"{owner}: {name} must be B x C x h x w, got shape "
                                 f"{tuple(t.shape)}")
            if t.shape[1] != c:
                raise ValueError(f"{owner}: {name} has {t.shape[1]} channels"
                                 + (f" but num_classes={c}" if name == "soft_preds"
                                    else ", expected 2"))
        if cycle_n is not None and (isinstance(cycle_n, bool) or not isinstance(
                cycle_n, numbers.Integral) or cycle_n < 0):
            raise ValueError(f"{owner}: cycle_n must be an int >= 0, got {cycle_n!r}")
        if (soft_preds is not None or soft_edges is not None) and cycle_n is None:
            raise ValueError("SCHPCriterion: soft targets need cycle_n (the self-correction cycle)")
        return parsing, edge, labels, edges, soft_preds, soft_edges

    def forward(self, preds, target, cycle_n=None):
        parsing, edge, labels, edges, soft_preds, soft_edges = self._check(preds, target,
                                                                           cycle_n)
        with _named("SCHPCriterion"):
            return self._loss(parsing, edge, labels, edges, soft_preds, soft_edges, cycle_n)

    def _loss(self, parsing, edge, labels, edges, soft_preds, soft_edges, cycle_n):
        size = tuple(labels.shape[-2:])
        lab = _long(labels)
        alpha = None if cycle_n is None else 1.0 / (cycle_n + 1.0)
        lovasz = _lovasz()
        ign = self.ignore_index

        loss = 0
        for p in parsing:
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

        for e in edge:
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
        self.ignore_index = check_ignore_index(ignore_index, "CE2PCriterion")

    def forward(self, preds, target):
        owner = "CE2PCriterion"
        parsing, edge = _ce2p_preds(preds, owner)
        target = _target(target, owner, (2,), "[labels, edges]")
        labels = _long(_labels(target[0], "labels", owner))
        edges = _labels(target[1], "edges", owner)
        with _named(owner):
            loss = 0
            for p in parsing:
                loss = loss + upsample_ce_or_eager(p, labels, ignore_index=self.ignore_index)
            for e in edge:
                loss = loss + edge_loss(e, edges, ignore_index=self.ignore_index)
            return loss


class OCNetCriterion(nn.Module):
    """OCNet's ``CriterionDSN``: CE(up(main)) + dsn_weight * CE(up(dsn))."""

    def __init__(self, ignore_index: int = 255, weight=None, dsn_weight: float = 0.4):
        super().__init__()
        owner = "OCNetCriterion"
        self.ignore_index = check_ignore_index(ignore_index, owner)
        self.dsn_weight = _nonneg(dsn_weight, "dsn_weight", owner)
        weight = class_weight_buffer(weight, owner)
        if weight is not None:
            weight = weight.to(torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, preds, target):
        owner = "OCNetCriterion"
        expect = "[main, dsn] (two logit tensors)"
        if not isinstance(preds, (list, tuple)):
            raise TypeError(f"{owner}: preds must be {expect}, got {_described(preds)}")
        if len(preds) != 2 or not all(isinstance(t, torch.Tensor) for t in preds):
            raise ValueError(f"{owner}: preds must be {expect}, got {_described(preds)}")
        if isinstance(target, (list, tuple)):
            if len(target) == 0:
                raise ValueError(f"{owner}: target must be labels or [labels, ...], got an "
                                 "empty list")
            target = target[0]
        labels = _long(_labels(target, "labels", owner))
        main, dsn = preds[0], preds[1]
        w = self.weight
        if w is not None:
            w = w.to(device=main.device, dtype=main.dtype if main.dtype == torch.float64
                     else torch.float32)
        with _named(owner):
            loss = upsample_ce_or_eager(main, labels, weight=w, ignore_index=self.ignore_index)
            return loss + self.dsn_weight * upsample_ce_or_eager(
                dsn, labels, weight=w, ignore_index=self.ignore_index)


__all__ = ["SCHPCriterion", "CE2PCriterion", "OCNetCriterion", "soft_kl", "edge_weights"]
