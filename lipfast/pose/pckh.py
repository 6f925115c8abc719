"""PCKh, MPII's pose metric (../shared/SPEC.md section 10, "PCKh"), accumulated
on the device and all-reducible across ranks; and the head-size rules.

A joint counts when it is visible; it is correct when
``||pred - gt|| / head_size <= threshold``; per joint PCKh = 100 * correct /
visible. The table (MPII's evaluation, as in deep-high-resolution-net.pytorch's
``lib/dataset/mpii.py``): Head = joint 9, Shoulder ... Ankle = the mean of the
left/right pair's PCKh, Mean = the joints' PCKh weighted by their visible counts
over the joints not in PCKH_MEAN_EXCLUDES (pelvis, thorax), i.e. total correct /
total visible over the included joints.

Choices where the reference divides by zero or has no rule (documented, checked
by the tests):

- a joint with no visible instance has PCKh NaN (0 / 0, as numpy gives), and so
  has a group containing it (the group is the plain mean of its members); Mean is
  NaN only when no included joint is visible;
- a visible joint whose head size is not positive and finite, or whose ground
  truth is not finite, is not counted (neither visible nor correct) and is counted
  in ``skipped`` instead, per joint;
- a non-finite prediction of a counted joint is wrong (its distance is not
  <= threshold).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .joints import HEAD_TOP, LIP_JOINTS, PCKH_GROUPS, PCKH_MEAN_EXCLUDES, UPPER_NECK

__all__ = ["PCKh", "head_size_mpii", "head_size_lip", "MPII_HEAD_FACTOR", "LIP_HEAD_FACTOR"]

MPII_HEAD_FACTOR = 0.6   # MPII: head size = 0.6 x the head box's diagonal (SC_BIAS)
LIP_HEAD_FACTOR = 0.5    # unconfirmed LIP rule: 0.5 x |upper_neck - head_top| (see head_size_lip)


def head_size_mpii(head_boxes: torch.Tensor) -> torch.Tensor:
    """MPII's head size: 0.6 x the diagonal of the annotated head box.

    ``head_boxes``: B x 4 (x1, y1, x2, y2) -> B float64 (``0.6 * ||(x2 - x1, y2 - y1)||``).
    """
    if not isinstance(head_boxes, torch.Tensor):
        raise TypeError(f"head_size_mpii: head_boxes must be a B x 4 tensor, got "
                        f"{type(head_boxes).__name__}")
    if head_boxes.dim() != 2 or head_boxes.shape[1] != 4:
        raise ValueError(f"head_size_mpii: head_boxes must be B x 4 (x1, y1, x2, y2), got shape "
                         f"{tuple(head_boxes.shape)}")
    hb = head_boxes.to(torch.float64)
    return MPII_HEAD_FACTOR * torch.linalg.vector_norm(hb[:, 2:] - hb[:, :2], dim=1)


def head_size_lip(joints: torch.Tensor, factor: float = LIP_HEAD_FACTOR,
                  upper_neck: int = UPPER_NECK, head_top: int = HEAD_TOP) -> torch.Tensor:
    """A head size for LIP from the ground-truth joints: ``factor *
    ||joints[:, upper_neck] - joints[:, head_top]||``.

    NOT CONFIRMED: LIP publishes no official pose evaluation script in the sources
    the SPEC could check; one public implementation uses 0.5 x the upper-neck to
    head-top distance, which is the default here. Pass ``factor`` (or your own head
    sizes to :meth:`PCKh.update`) for another convention, and say which one you
    report. A missing upper neck or head top (NaN) gives a NaN head size, and
    :class:`PCKh` then skips that person's joints.

    ``joints``: B x J x 2 (x, y) -> B float64.
    """
    if not isinstance(joints, torch.Tensor):
        raise TypeError(f"head_size_lip: joints must be a B x J x 2 tensor, got "
                        f"{type(joints).__name__}")
    if joints.dim() != 3 or joints.shape[2] != 2:
        raise ValueError(f"head_size_lip: joints must be B x J x 2, got shape "
                         f"{tuple(joints.shape)}")
    j = joints.shape[1]
    for name, k in (("upper_neck", upper_neck), ("head_top", head_top)):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < j:
            raise ValueError(f"head_size_lip: {name} must be a joint index in [0, {j}), got {k!r}")
    f = float(factor)
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"head_size_lip: factor must be positive and finite, got {factor!r}")
    jt = joints.to(torch.float64)
    return f * torch.linalg.vector_norm(jt[:, upper_neck] - jt[:, head_top], dim=1)


class PCKh:
    """PCKh accumulated on the device (per joint int64 counts of counted-visible,
    correct and skipped joints; ``update`` never syncs with the host), reducible
    across ranks with :meth:`sync`, resumable with ``state_dict``.

    Args:
        threshold: the normalised distance at or below which a joint is correct
            (0.5; MPII's "Mean@0.1" column uses 0.11 on MPII's grid).
        joint_names: one name per joint (LIP/MPII's 16 by default).
        device: where the counts start (CPU by default); they move to the device
            of each update's inputs (so they live where the predictions are).
        groups: the table's groups, (name, joint indices); each group's value is
            the mean of its joints' PCKh. Default PCKH_GROUPS for 16 joints, none
            for other joint counts.
        mean_excludes: joints left out of Mean (default PCKH_MEAN_EXCLUDES for 16
            joints, none otherwise).
    """

    def __init__(self, threshold: float = 0.5, joint_names: Sequence[str] = LIP_JOINTS,
                 device: Optional[torch.device | str] = None, groups=None, mean_excludes=None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"PCKh: threshold must be a number, got {threshold!r}")
        threshold = float(threshold)
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"PCKh: threshold must be positive and finite, got {threshold}")
        if isinstance(joint_names, str) or not isinstance(joint_names, Sequence):
            raise TypeError(f"PCKh: joint_names must be a sequence of names, got "
                            f"{type(joint_names).__name__}")
        names = [str(n) for n in joint_names]
        if not names:
            raise ValueError("PCKh: joint_names is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"PCKh: duplicate joint names in {names}")
        nj = len(names)
        default = nj == len(LIP_JOINTS)
        if groups is None:
            groups = PCKH_GROUPS if default else ()
        if mean_excludes is None:
            mean_excludes = PCKH_MEAN_EXCLUDES if default else ()
        self.groups = []
        for item in groups:
            try:
                gname, idx = item
                idx = tuple(int(i) for i in idx)
            except (TypeError, ValueError):
                raise TypeError(f"PCKh: groups must be (name, joint indices) pairs, got "
                                f"{item!r}") from None
            if not idx or any(not 0 <= i < nj for i in idx):
                raise ValueError(f"PCKh: group {gname!r} has joints {idx} outside [0, {nj})")
            self.groups.append((str(gname), idx))
        ex = tuple(int(i) for i in mean_excludes)
        if any(not 0 <= i < nj for i in ex):
            raise ValueError(f"PCKh: mean_excludes {ex} outside [0, {nj})")
        self.mean_excludes = ex
        self.threshold = threshold
        self.joint_names = names
        self.num_joints = nj
        self._device = torch.device(device) if device is not None else None
        self.reset()

    # ------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Zeroes the counts (and allows update after a sync)."""
        dev = self._device if self._device is not None else torch.device("cpu")
        self.counts = torch.zeros((3, self.num_joints), dtype=torch.int64, device=dev)
        self.synced = False

    @property
    def visible(self) -> torch.Tensor:
        """Per joint: visible joints counted (J int64, on the device)."""
        return self.counts[0]

    @property
    def correct(self) -> torch.Tensor:
        """Per joint: counted joints within the threshold."""
        return self.counts[1]

    @property
    def skipped(self) -> torch.Tensor:
        """Per joint: visible joints not counted (head size not positive and finite,
        or non-finite ground truth)."""
        return self.counts[2]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, visible: torch.Tensor,
               head_size: torch.Tensor) -> None:
        """Adds a batch: ``pred``, ``gt`` B x J x 2 (x, y, same units as the head
        size), ``visible`` B x J (bool, or numbers: > 0 is visible, NaN is not),
        ``head_size`` B (e.g. :func:`head_size_mpii`). All on one device; no host
        sync (the distances are computed in float64)."""
        if self.synced:
            raise RuntimeError("PCKh.update after sync(): the counts already hold every rank's "
                               "joints; call reset() to start a new evaluation")
        for name, t in (("pred", pred), ("gt", gt), ("visible", visible),
                        ("head_size", head_size)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PCKh.update: {name} must be a tensor, got {type(t).__name__}")
        nj = self.num_joints
        if pred.dim() != 3 or pred.shape[1:] != (nj, 2):
            raise ValueError(f"PCKh.update: pred must be B x {nj} x 2, got shape "
                             f"{tuple(pred.shape)}")
        b = pred.shape[0]
        if tuple(gt.shape) != (b, nj, 2):
            raise ValueError(f"PCKh.update: gt must be B x {nj} x 2 = {(b, nj, 2)}, got shape "
                             f"{tuple(gt.shape)}")
        if tuple(visible.shape) != (b, nj):
            raise ValueError(f"PCKh.update: visible must be B x {nj} = {(b, nj)}, got shape "
                             f"{tuple(visible.shape)}")
        if tuple(head_size.shape) != (b,):
            raise ValueError(f"PCKh.update: head_size must have shape ({b},), got "
                             f"{tuple(head_size.shape)}")
        for name, t in (("pred", pred), ("gt", gt), ("head_size", head_size)):
            if t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"PCKh.update: {name} must be real numbers, got {t.dtype}")
        if visible.is_complex():
            raise TypeError(f"PCKh.update: visible must be bool or real, got {visible.dtype}")
        dev = pred.device
        for name, t in (("gt", gt), ("visible", visible), ("head_size", head_size)):
            if t.device != dev:
                raise ValueError(f"PCKh.update: pred on {dev}, {name} on {t.device}")
        if self.counts.device != dev:
            self.counts = self.counts.to(dev)
        vis = visible if visible.dtype == torch.bool else visible > 0
        g = gt.to(torch.float64)
        hs = head_size.to(torch.float64)
        ok_h = torch.isfinite(hs) & (hs > 0)
        counted = vis & torch.isfinite(g).all(-1) & ok_h[:, None]
        dist = torch.linalg.vector_norm(pred.to(torch.float64) - g, dim=-1)
        norm = dist / torch.where(ok_h, hs, torch.ones_like(hs))[:, None]
        good = counted & (norm <= self.threshold)
        self.counts += torch.stack([counted.sum(0), good.sum(0), (vis & ~counted).sum(0)])

    def sync(self, group=None) -> "PCKh":
        """All-reduce (sum) of the counts over ``group`` (default: WORLD); a no-op
        without an initialised process group or when already synced. Collective:
        every rank of the group must call it. After it, update() raises until
        reset()."""
        import torch.distributed as dist

        if self.synced or not (dist.is_available() and dist.is_initialized()):
            return self
        buf = self.counts.clone()
        if dist.get_backend(group) == "nccl" and buf.device.type != "cuda":
            buf = buf.cuda()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        self.counts = buf.to(self.counts.device)
        self.synced = True
        return self

    # ------------------------------------------------------------ results
    def compute(self) -> dict:
        """The results (one host sync): ``{"per_joint": {name: PCKh}, "table":
        {group: value, ..., "Mean": value}, "visible": [...], "correct": [...],
        "skipped": [...], "threshold": t}``; PCKh values in percent, NaN where
        nothing was visible."""
        vis, cor, skp = (r.tolist() for r in self.counts.cpu())
        per = [100.0 * c / v if v > 0 else math.nan for c, v in zip(cor, vis)]
        table = {}
        for gname, idx in self.groups:
            table[gname] = sum(per[i] for i in idx) / len(idx)
        inc = [i for i in range(self.num_joints) if i not in self.mean_excludes]
        tv = sum(vis[i] for i in inc)
        table["Mean"] = 100.0 * sum(cor[i] for i in inc) / tv if tv > 0 else math.nan
        return {"per_joint": dict(zip(self.joint_names, per)), "table": table,
                "visible": vis, "correct": cor, "skipped": skp, "threshold": self.threshold}

    def format_table(self, digits: int = 1) -> str:
        """The grouped table (one header line, one value line, as MPII prints it)
        followed by the per-joint values and counts."""
        r = self.compute()
        t = r["table"]
        width = max(8, digits + 5)
        names = list(t)
        lines = [" ".join(f"{n:>{width}}" for n in names),
                 " ".join(f"{t[n]:>{width}.{digits}f}" for n in names), ""]
        jw = max(10, max(len(n) for n in self.joint_names))
        lines.append(f"{'joint':<{jw}}  {'PCKh':>7}  {'visible':>8}  {'skipped':>8}")
        for name, v, nv, ns in zip(self.joint_names, r["per_joint"].values(), r["visible"],
                                   r["skipped"]):
            lines.append(f"{name:<{jw}}  {v:7.{digits}f}  {nv:8d}  {ns:8d}")
        lines.append(f"(PCKh@{self.threshold:g})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()

    def __repr__(self) -> str:
        return (f"PCKh(threshold={self.threshold:g}, num_joints={self.num_joints}, "
                f"device={self.counts.device})")

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"counts": self.counts.detach().cpu().clone(), "threshold": self.threshold,
                "joint_names": list(self.joint_names), "synced": self.synced}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output; refuses another joint count, other
        joint names or another threshold (ValueError)."""
        if not isinstance(state, dict) or "counts" not in state:
            raise ValueError("PCKh.load_state_dict: not a PCKh state (no 'counts')")
        c = state["counts"]
        nj = self.num_joints
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int64 or tuple(c.shape) != (3, nj):
            raise ValueError(f"PCKh.load_state_dict: counts must be an int64 3 x {nj} tensor "
                             f"(this metric has {nj} joints), got "
                             f"{getattr(c, 'dtype', type(c))} {tuple(getattr(c, 'shape', ()))}")
        th = state.get("threshold")
        if not isinstance(th, (int, float)) or float(th) != self.threshold:
            raise ValueError(f"PCKh.load_state_dict: state has threshold {th!r}, metric "
                             f"{self.threshold}")
        names = state.get("joint_names")
        if names is not None and list(names) != self.joint_names:
            raise ValueError(f"PCKh.load_state_dict: state has joints {list(names)}, metric "
                             f"{self.joint_names}")
        if bool((c < 0).any()) or bool((c[1] > c[0]).any()):
            raise ValueError("PCKh.load_state_dict: invalid counts (negative, or more correct "
                             "than visible)")
        self.counts = c.to(self.counts.device).clone()
        self.synced = bool(state.get("synced", False))
