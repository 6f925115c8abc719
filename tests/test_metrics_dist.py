"""Multi-process test of ParsingMetrics.reduce on CPU with the gloo backend.

Each test spawns its ranks (``torch.multiprocessing``, 'spawn') in one process
group rendezvousing through a FileStore in ``tmp_path``; gloo is pinned to the
loopback interface. Every rank builds the same global evaluation set (same
seeds), takes an unequal share of its images -- one rank takes none -- updates
a ParsingMetrics with them (logits with fused resize, and integer
predictions), reduces, and checks, in the same process, that the reduced
matrix, image count and metrics equal one ParsingMetrics fed the whole set in
one process, and that the numpy bincount of the whole set agrees. A second
reduce() must be a no-op, update() after reduce() must raise, and a fresh
reduce() after reset() must work again (all ranks take part).

Failures: an exception in a rank is re-raised in the parent by
torch.multiprocessing (which kills the other ranks); each rank writes a report
the parent requires; a hang fails after the process-group timeout or the join
deadline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_harness import spawn

pytestmark = pytest.mark.slow

C = 7
# images per rank (one rank without any image)
SIZES = {2: (3, 0), 3: (2, 0, 5)}


def _dataset(n: int):
    """n images: (logits at 1/2 resolution, labels), odd sizes, some ignored pixels."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        x = torch.randn(1, C, 6, 5, generator=g)
        y = torch.randint(0, C, (1, 11, 9), generator=g)
        y[torch.rand(1, 11, 9, generator=g) < 0.2] = 255
        out.append((x, y.to(torch.uint8)))
    return out


def _np_total(data):
    cm = np.zeros((C, C), dtype=np.int64)
    for x, y in data:
        pred = F.interpolate(x, y.shape[1:], mode="bilinear", align_corners=True).argmax(1)
        for p, lab in ((pred, y), (y.long().clamp(max=C - 1), y)):
            lab = lab.long().numpy().ravel()
            p = p.numpy().ravel()
            keep = lab != 255
            cm += np.bincount(lab[keep] * C + p[keep], minlength=C * C).reshape(C, C)
    return torch.from_numpy(cm)


def _feed(metrics, items):
    for x, y in items:
        metrics.update(x, y)  # logits, fused resize
        metrics.update(y.long().clamp(max=C - 1), y)  # integer predictions


def _scenario(rank: int, world: int) -> list[str]:
    from lipfast.metrics import ParsingMetrics

    sizes = SIZES[world]
    data = _dataset(sum(sizes))
    start = sum(sizes[:rank])
    mine = data[start:start + sizes[rank]]
    done = []

    single = ParsingMetrics(C, class_names=None)
    _feed(single, data)
    ref = single.compute()
    assert torch.equal(ref["confusion_matrix"], _np_total(data)), "single process vs numpy"

    m = ParsingMetrics(C, class_names=None)
    _feed(m, mine)
    assert m.num_images == 2 * len(mine)
    m.reduce()
    got = m.compute()
    assert torch.equal(got["confusion_matrix"], ref["confusion_matrix"]), (
        f"rank {rank}: reduced matrix differs from the single-process one")
    assert got["num_images"] == ref["num_images"] == 2 * sum(sizes)
    for k in ("pixel_acc", "mean_acc", "miou"):
        assert got[k] == ref[k], (rank, k, got[k], ref[k])
    assert torch.equal(got["iou"], ref["iou"])
    done.append(f"reduce sizes={sizes}")

    m.reduce()  # already reduced: no-op, no collective
    assert torch.equal(m.compute()["confusion_matrix"], ref["confusion_matrix"])
    with pytest.raises(RuntimeError, match="reset"):
        m.update(*data[0])
    done.append("second reduce no-op, update after reduce raises")

    # after reset(): only the last rank has counts, restored from a state_dict
    # of the whole set (a resumed evaluation); the others contribute zeros
    m.reset()
    if rank == world - 1:
        m.load_state_dict(single.state_dict())
    m.reduce()
    assert torch.equal(m.compute()["confusion_matrix"], ref["confusion_matrix"])
    assert m.num_images == ref["num_images"]
    done.append("reduce after reset and load_state_dict")
    return done


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_equals_single_process(tmp_path, world):
    for report in spawn(_scenario, world, tmp_path, "reduce"):
        assert len(report["checks"]) == 3, report
