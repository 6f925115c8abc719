"""lipfast.pose.PCKh and the head-size rules against the numpy reference
(tests/pose_decode_reference.py: MPII's evaluation, per joint and the grouped
table): random data over several updates, invisible and skipped joints (bad head
sizes, non-finite ground truth), NaN predictions, all-invisible joints (NaN, no
division by zero), the table text, state_dict round trips through
torch.save / torch.load(weights_only=True), mismatched states, bad inputs, and a
2-process gloo all-reduce (tests/dist_harness.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pose_decode_reference as ref
from lipfast.pose import (LIP_JOINTS, PCKH_GROUPS, PCKH_MEAN_EXCLUDES, PCKh, head_size_lip,
                          head_size_mpii)

J = len(LIP_JOINTS)


def _data(n: int, seed: int, dtype=torch.float32):
    """n people: gt in a 200 px frame, predictions near it (about half within the
    threshold), ~20 % invisible joints, a few bad head sizes / NaN gt / NaN preds."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, J, 2, generator=g, dtype=torch.float64) * 200
    hs = torch.rand(n, generator=g, dtype=torch.float64) * 20 + 5
    pred = gt + torch.randn(n, J, 2, generator=g, dtype=torch.float64) * hs[:, None, None] * 0.4
    vis = torch.rand(n, J, generator=g) > 0.2
    if n > 3:
        hs[1] = 0.0
        hs[2] = float("nan")
        gt[3, 4] = float("nan")
        pred[0, 5] = float("nan")
    return pred.to(dtype), gt.to(dtype), vis, hs


def _ref(pred, gt, vis, hs, thr=0.5):
    return ref.pckh(pred.double().numpy(), gt.double().numpy(), vis.numpy(), hs.numpy(), thr,
                    PCKH_GROUPS, PCKH_MEAN_EXCLUDES)


def _assert_matches(m: PCKh, want):
    per, table, vis, cor, skp = want
    r = m.compute()
    assert r["visible"] == vis.tolist() and r["correct"] == cor.tolist()
    assert r["skipped"] == skp.tolist()
    np.testing.assert_allclose(list(r["per_joint"].values()), per, rtol=1e-12, equal_nan=True)
    assert list(r["per_joint"]) == list(LIP_JOINTS)
    assert list(r["table"]) == [g for g, _ in PCKH_GROUPS] + ["Mean"]
    np.testing.assert_allclose([r["table"][k] for k in table], list(table.values()), rtol=1e-12,
                               equal_nan=True)


@pytest.mark.parametrize("thr", [0.5, 0.11])
def test_pckh_vs_reference_over_updates(thr):
    pred, gt, vis, hs = _data(37, 1)
    m = PCKh(threshold=thr)
    for lo, hi in ((0, 10), (10, 11), (11, 11), (11, 37)):
        m.update(pred[lo:hi], gt[lo:hi], vis[lo:hi], hs[lo:hi])
    want = _ref(pred, gt, vis, hs, thr)
    _assert_matches(m, want)
    assert want[4].sum() > 0 and 0 < want[3].sum() < want[2].sum()  # the data covers the cases
    # Mean = total correct / total visible over the included joints
    inc = [i for i in range(J) if i not in PCKH_MEAN_EXCLUDES]
    assert m.compute()["table"]["Mean"] == pytest.approx(
        100 * want[3][inc].sum() / want[2][inc].sum(), rel=1e-12)


def test_pckh_numeric_visible_and_dtypes():
    pred, gt, vis, hs = _data(12, 2)
    a, b = PCKh(), PCKh()
    a.update(pred, gt, vis, hs)
    v = vis.double()
    fill = torch.tensor([0.0, -1.0, float("nan")], dtype=torch.float64).repeat(100)
    v[~vis] = fill[: int((~vis).sum())]  # 0, negative, NaN: not visible
    b.update(pred.double(), gt.half().double(), v * 2, hs.float())
    _assert_matches(b, _ref(pred.double(), gt.half().double(), vis, hs.float().double()))
    assert a.compute()["visible"] == b.compute()["visible"]


def test_all_invisible_joints_are_nan():
    pred, gt, vis, hs = _data(8, 3)
    vis[:, 9] = False  # Head: nothing visible
    vis[:, 12] = False  # one shoulder
    m = PCKh()
    m.update(pred, gt, vis, hs)
    r = m.compute()
    assert math.isnan(r["per_joint"]["head_top"]) and math.isnan(r["table"]["Head"])
    assert math.isnan(r["table"]["Shoulder"]) and not math.isnan(r["table"]["Elbow"])
    assert not math.isnan(r["table"]["Mean"])
    _assert_matches(m, _ref(pred, gt, vis, hs))
    empty = PCKh()
    r = empty.compute()
    assert all(math.isnan(v) for v in r["per_joint"].values()) and math.isnan(r["table"]["Mean"])
    assert "nan" in empty.format_table()


def test_format_table():
    pred, gt, vis, hs = _data(20, 4)
    m = PCKh()
    m.update(pred, gt, vis, hs)
    text = m.format_table()
    r = m.compute()
    for name in [g for g, _ in PCKH_GROUPS] + ["Mean"] + list(LIP_JOINTS):
        assert name in text
    assert f"{r['table']['Mean']:.1f}" in text and "PCKh@0.5" in text
    assert str(m) == text


def test_state_dict_round_trip(tmp_path):
    pred, gt, vis, hs = _data(30, 5)
    m = PCKh()
    m.update(pred[:15], gt[:15], vis[:15], hs[:15])
    path = tmp_path / "pckh.pt"
    torch.save(m.state_dict(), path)
    r = PCKh()
    r.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    r.update(pred[15:], gt[15:], vis[15:], hs[15:])
    _assert_matches(r, _ref(pred, gt, vis, hs))
    st = m.state_dict()
    with pytest.raises(ValueError, match="threshold"):
        PCKh(threshold=0.3).load_state_dict(st)
    with pytest.raises(ValueError, match="joints"):
        PCKh(joint_names=[str(i) for i in range(5)]).load_state_dict(st)
    with pytest.raises(ValueError, match="joints"):
        PCKh(joint_names=[f"j{i}" for i in range(J)]).load_state_dict(st)
    bad = dict(st, counts=st["counts"].clone())
    bad["counts"][1, 0] = bad["counts"][0, 0] + 1
    with pytest.raises(ValueError, match="invalid counts"):
        PCKh().load_state_dict(bad)
    with pytest.raises(ValueError, match="not a PCKh state"):
        PCKh().load_state_dict({"matrix": 1})
    with pytest.raises(ValueError, match="int64"):
        PCKh().load_state_dict(dict(st, counts=st["counts"].double()))
    m.reset()
    assert m.compute()["visible"] == [0] * J


def test_head_sizes():
    g = torch.Generator().manual_seed(6)
    boxes = torch.rand(7, 4, generator=g, dtype=torch.float64) * 50
    want = 0.6 * np.linalg.norm(boxes[:, 2:].numpy() - boxes[:, :2].numpy(), axis=1)
    np.testing.assert_allclose(head_size_mpii(boxes).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(head_size_mpii(boxes.float()).numpy(), want, rtol=1e-6)
    joints = torch.rand(7, J, 2, generator=g, dtype=torch.float64) * 100
    d = np.linalg.norm(joints[:, 8].numpy() - joints[:, 9].numpy(), axis=1)
    np.testing.assert_allclose(head_size_lip(joints).numpy(), 0.5 * d, rtol=1e-12)
    np.testing.assert_allclose(head_size_lip(joints, factor=1.0).numpy(), d, rtol=1e-12)
    joints[0, 9] = float("nan")
    assert math.isnan(head_size_lip(joints)[0])
    for fn, err in [(lambda: head_size_mpii(boxes[:, :3]), ValueError),
                    (lambda: head_size_mpii(boxes.numpy()), TypeError),
                    (lambda: head_size_lip(joints[:, :, :1]), ValueError),
                    (lambda: head_size_lip(joints, factor=0), ValueError),
                    (lambda: head_size_lip(joints, head_top=16), ValueError),
                    (lambda: head_size_lip([1, 2]), TypeError)]:
        with pytest.raises(err):
            fn()


def test_bad_inputs_and_no_sync_without_group():
    pred, gt, vis, hs = _data(4, 7)
    m = PCKh()
    cases = [
        ((pred[:, :5], gt, vis, hs), ValueError, "pred"),
        ((pred, gt[:3], vis, hs), ValueError, "gt"),
        ((pred, gt, vis[:, :3], hs), ValueError, "visible"),
        ((pred, gt, vis, hs[:, None]), ValueError, "head_size"),
        ((pred, gt.numpy(), vis, hs), TypeError, "gt"),
        ((pred.bool(), gt, vis, hs), TypeError, "pred"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            m.update(*args)
    assert m.compute()["visible"] == [0] * J  # nothing was added by the failed calls
    for kw, err in [({"threshold": 0}, ValueError), ({"threshold": float("nan")}, ValueError),
                    ({"threshold": "a"}, TypeError), ({"joint_names": []}, ValueError),
                    ({"joint_names": ["a", "a"]}, ValueError),
                    ({"joint_names": "abc"}, TypeError),
                    ({"groups": [("x", (20,))]}, ValueError),
                    ({"mean_excludes": (17,)}, ValueError)]:
        with pytest.raises(err):
            PCKh(**kw)
    before = [t.clone() for t in (pred, gt, vis, hs)]
    m.update(pred, gt, vis, hs)
    assert all(torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all()
               for a, b in zip(before, (pred, gt, vis, hs)))
    assert m.sync() is m and not m.synced  # no process group: a no-op
    m.update(pred, gt, vis, hs)
    # other joint counts: no default groups
    k = PCKh(joint_names=["a", "b", "c"])
    k.update(pred[:, :3], gt[:, :3], vis[:, :3], hs)
    assert list(k.compute()["table"]) == ["Mean"]


# ---------------------------------------------------------------- 2 ranks, gloo

SIZES = (5, 0)  # people per rank (rank 1 has none)


def _scenario(rank: int, world: int) -> list[str]:
    from lipfast.pose import PCKh as Metric

    pred, gt, vis, hs = _data(sum(SIZES), 11)
    lo = sum(SIZES[:rank])
    hi = lo + SIZES[rank]
    m = Metric()
    m.update(pred[lo:hi], gt[lo:hi], vis[lo:hi], hs[lo:hi])
    m.sync()
    single = Metric()
    single.update(pred, gt, vis, hs)
    assert m.synced and torch.equal(m.counts, single.counts), (m.counts, single.counts)
    per, table, v, c, s = ref.pckh(pred.double().numpy(), gt.double().numpy(), vis.numpy(),
                                   hs.numpy(), 0.5, PCKH_GROUPS, PCKH_MEAN_EXCLUDES)
    assert m.compute()["visible"] == v.tolist() and m.compute()["correct"] == c.tolist()
    m.sync()  # a second sync is a no-op
    assert torch.equal(m.counts, single.counts)
    try:
        m.update(pred, gt, vis, hs)
        raise AssertionError("update after sync did not raise")
    except RuntimeError:
        pass
    m.reset()
    m.update(pred[:1], gt[:1], vis[:1], hs[:1])
    m.sync()
    one = Metric()
    one.update(pred[:1], gt[:1], vis[:1], hs[:1])
    assert torch.equal(m.counts, one.counts * world)
    return ["sync", "resync", "update-after-sync", "reset"]


@pytest.mark.slow
def test_pckh_sync_two_ranks(tmp_path):
    from dist_harness import spawn

    reports = spawn(_scenario, 2, tmp_path, "pckh")
    assert all(r["checks"] == ["sync", "resync", "update-after-sync", "reset"] for r in reports)
