"""lipfast.data.multi: MultiSourceDataset's epoch composition (lengths, weighted
counts, whole passes + a subset without replacement, determinism per (seed,
epoch), set_epoch), parse_source's accepted and rejected forms, build_source."""

from __future__ import annotations

import collections

import pytest
import torch

from lipfast.data import (CIHPPersonCrops, LIPDataset, MultiSourceDataset, SourceSpec,
                          build_source, collate, parse_source)
from lipfast.data.synthetic import make_synthetic


class Toy(torch.utils.data.Dataset):
    """n samples; records set_epoch; items name (tag, index, repeat, epoch)."""

    def __init__(self, n, tag, crop_size=(9, 9), num_classes=20, source="lip"):
        self.n, self.tag, self.crop_size, self.num_classes = n, tag, crop_size, num_classes
        self.source, self.root, self.split = source, f"/data/{tag}", "train"
        self.epoch = 0
        self.channel_order = "BGR"

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e

    def item(self, j, repeat=0):
        return torch.zeros(1), torch.zeros(1), {"tag": self.tag, "index": j, "repeat": repeat,
                                                "epoch": self.epoch, "source": self.source}

    def __getitem__(self, j):
        return self.item(j)


def positions(ds):
    return [ds.locate(i) for i in range(len(ds))]


def ref_counts(lengths, weights):
    """SPEC of the brief: round(N w_s len_s / sum w_t len_t), fixed to sum to N."""
    n = sum(lengths)
    mass = [w * l for w, l in zip(weights, lengths)]
    return [n * m / sum(mass) for m in mass]


# ----------------------------------------------------------------- composition

def test_unweighted_every_sample_once():
    a, b, c = Toy(5, "a"), Toy(3, "b", source="cihp"), Toy(4, "c")
    ds = MultiSourceDataset([a, b, c])
    assert len(ds) == 12
    assert ds.names == ["lip1", "cihp", "lip2"]
    assert ds.counts() == {"lip1": 5, "cihp": 3, "lip2": 4}
    assert sorted((s, j) for s, j, _ in positions(ds)) == \
        [(0, j) for j in range(5)] + [(1, j) for j in range(3)] + [(2, j) for j in range(4)]
    _, _, meta = ds[6]
    assert meta["source"] == "cihp" and meta["tag"] == "b" and meta["index"] == 1
    ds.set_epoch(3)
    assert len(ds) == 12 and ds.counts()["lip1"] == 5
    # equal weights are the same as none
    same = MultiSourceDataset([a, b, c], weights=[2.0, 2.0, 2.0])
    same.set_epoch(3)
    assert positions(same) == positions(ds)


@pytest.mark.parametrize("lengths,weights", [([10, 7, 3], [1, 2, 0.5]),
                                             ([1, 1, 1], [1, 1, 2]),
                                             ([6, 50], [5, 1]),
                                             ([4, 9, 2, 13], [0.3, 3, 7, 1])])
def test_weighted_counts_and_composition(lengths, weights):
    toys = [Toy(n, str(k)) for k, n in enumerate(lengths)]
    ds = MultiSourceDataset(toys, weights=weights, seed=5, names=[f"s{k}" for k in
                                                                   range(len(toys))])
    assert len(ds) == sum(lengths)
    counts = list(ds.counts().values())
    assert sum(counts) == sum(lengths)
    quotas = ref_counts(lengths, weights)
    for n, q in zip(counts, quotas):
        assert abs(n - q) < 1  # rounded (and at most one step off to fix the sum)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        per = collections.defaultdict(list)
        for s, j, r in positions(ds):
            per[s].append((j, r))
        for s, n in enumerate(lengths):
            seen = collections.Counter(j for j, _ in per[s])
            full, extra = divmod(counts[s], n)
            # whole passes, then a subset without replacement
            assert len(per[s]) == counts[s]
            assert all(full <= seen[j] <= full + 1 for j in range(n))
            assert sum(seen[j] == full + 1 for j in range(n)) == extra
            # each showing of a sample has its own repeat number (its own augmentation)
            for j in range(n):
                reps = sorted(r for jj, r in per[s] if jj == j)
                assert reps == list(range(len(reps)))


def test_weighted_example_values():
    ds = MultiSourceDataset([Toy(10, "a"), Toy(7, "b"), Toy(3, "c")], weights=[1, 2, 0.5])
    # N = 20, mass 10 : 14 : 1.5 -> 7.84, 10.98, 1.18 -> 8, 11, 1
    assert list(ds.counts().values()) == [8, 11, 1]
    lines = ds.describe()
    assert len(lines) == 3
    assert lines[1] == "lip2: root /data/b, split train, 11 samples per epoch (of 7), weight 2"
    assert "weight -" in MultiSourceDataset([Toy(2, "a")]).describe()[0]


def test_deterministic_per_seed_and_epoch():
    def make(seed):
        return MultiSourceDataset([Toy(20, "a"), Toy(30, "b")], weights=[1, 0.4], seed=seed)

    a, b = make(1), make(1)
    for e in (0, 4):
        a.set_epoch(e)
        b.set_epoch(e)
        assert positions(a) == positions(b)
    a.set_epoch(0)
    first = positions(a)
    a.set_epoch(1)
    assert positions(a) != first  # another subset of the down-weighted source
    a.set_epoch(0)
    assert positions(a) == first  # back to epoch 0: the same mapping
    c = make(2)
    assert positions(c) != first


def test_set_epoch_propagates():
    toys = [Toy(3, "a"), Toy(2, "b")]
    ds = MultiSourceDataset(toys)
    ds.set_epoch(7)
    assert ds.epoch == 7 and [t.epoch for t in toys] == [7, 7]
    assert ds[0][2]["epoch"] == 7


def test_one_source_and_checks():
    ds = MultiSourceDataset([Toy(4, "a")], weights=[3.0])
    assert len(ds) == 4 and ds.counts() == {"lip": 4}
    assert [ds[i][2]["index"] for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="crop_size"):
        MultiSourceDataset([Toy(2, "a"), Toy(2, "b", crop_size=(9, 8))])
    with pytest.raises(ValueError, match="num_classes"):
        MultiSourceDataset([Toy(2, "a"), Toy(2, "b", num_classes=7)])
    with pytest.raises(ValueError, match="weights"):
        MultiSourceDataset([Toy(2, "a"), Toy(2, "b")], weights=[1])
    for bad in ([1, 0], [1, -2], [1, float("nan")], [1, True]):
        with pytest.raises(ValueError, match="positive"):
            MultiSourceDataset([Toy(2, "a"), Toy(2, "b")], weights=bad)
    with pytest.raises(ValueError, match="distinct names"):
        MultiSourceDataset([Toy(2, "a"), Toy(2, "b")], names=["x", "x"])
    with pytest.raises(ValueError, match="no source"):
        MultiSourceDataset([])
    with pytest.raises(ValueError, match="empty"):
        MultiSourceDataset([Toy(0, "a")])


# ----------------------------------------------------------------- real sources

@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    lip = tmp_path_factory.mktemp("lip")
    make_synthetic(lip, 4, size=40, seed=1, val=2)
    cihp = tmp_path_factory.mktemp("cihp")
    make_synthetic(cihp, 3, size=48, seed=1, val=1, layout="cihp")
    return lip, cihp


def test_lip_and_cihp_together(roots):
    lip_root, cihp_root = roots
    specs = [parse_source(str(lip_root)), parse_source(f"cihp:{cihp_root}:train:2")]
    sources = [build_source(s, crop_size=25, seed=3) for s in specs]
    assert isinstance(sources[0], LIPDataset) and isinstance(sources[1], CIHPPersonCrops)
    ds = MultiSourceDataset(sources, weights=[s.weight for s in specs], seed=3)
    n_lip, n_cihp = len(sources[0]), len(sources[1])
    assert len(ds) == n_lip + n_cihp
    assert sum(ds.counts().values()) == len(ds) and ds.counts()["cihp"] > n_cihp
    names = collections.Counter(ds[i][2]["source"] for i in range(len(ds)))
    assert names == collections.Counter(ds.counts())
    # a sample shown twice in the epoch gets two different augmentations
    pos = positions(ds)
    twice = [i for i, (s, j, r) in enumerate(pos) if r == 1]
    assert twice
    s, j, _ = pos[twice[0]]
    first = pos.index((s, j, 0))
    a, b = ds[first], ds[twice[0]]
    assert a[2]["id"] == b[2]["id"] and not torch.equal(a[0], b[0])
    # set_epoch reaches the real sources; loader workers see the pickled epoch
    ds.set_epoch(2)
    assert sources[0].epoch == sources[1].epoch == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=1,
                                         collate_fn=collate)
    images, labels, metas = next(iter(loader))
    assert images.shape == (len(ds), 3, 25, 25) and labels.shape == (len(ds), 25, 25)
    for i in (0, len(ds) - 1):
        assert torch.equal(images[i], ds[i][0]) and metas[i]["source"] == ds[i][2]["source"]


def test_build_source_options(roots):
    lip_root, cihp_root = roots
    c = build_source(f"cihp:{cihp_root}:val", crop_size=21, train=False, others="keep",
                     class_map=None, channel_order="RGB", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert isinstance(c, CIHPPersonCrops) and c.others == "keep" and not c.train
    assert c.channel_order == "RGB" and c.split == "val"
    lip = build_source(SourceSpec("lip", str(lip_root), "val"), crop_size=21, others="keep")
    assert isinstance(lip, LIPDataset) and lip.split == "val"  # CIHP-only options ignored
    with pytest.raises(TypeError):
        build_source(3)
    with pytest.raises(ValueError, match="crop_size"):
        MultiSourceDataset([build_source(str(lip_root), crop_size=21),
                            build_source(f"cihp:{cihp_root}:train", crop_size=23)])


# ----------------------------------------------------------------- parse_source

@pytest.mark.parametrize("text,want", [
    ("/data/LIP", ("lip", "/data/LIP", "train", 1.0)),
    ("data/LIP", ("lip", "data/LIP", "train", 1.0)),
    ("/data/LIP:2.5", ("lip", "/data/LIP", "train", 2.5)),
    ("data:2", ("lip", "data", "train", 2.0)),
    ("C:\\data\\LIP", ("lip", "C:\\data\\LIP", "train", 1.0)),
    ("lip:/data/LIP:val", ("lip", "/data/LIP", "val", 1.0)),
    ("LIP:/data/LIP:train:0.5", ("lip", "/data/LIP", "train", 0.5)),
    ("lip:/data/LIP:trainval:3", ("lip", "/data/LIP", "trainval", 3.0)),
    ("cihp:/data/CIHP:train", ("cihp", "/data/CIHP", "train", 1.0)),
    ("cihp:/data/CIHP:val:1e-1", ("cihp", "/data/CIHP", "val", 0.1)),
    ("cihp:/mnt/a:b/CIHP:train:2", ("cihp", "/mnt/a:b/CIHP", "train", 2.0)),
    ("lip:/mnt/a:b:train", ("lip", "/mnt/a:b", "train", 1.0)),
    ("lip:C:\\LIP:val:4", ("lip", "C:\\LIP", "val", 4.0)),
])
def test_parse_source_accepted(text, want):
    spec = parse_source(text)
    assert (spec.kind, spec.root, spec.split, spec.weight) == want
    assert parse_source(str(spec)) == spec  # str() is a canonical text of the spec


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("atr:/data:train", "unknown kind 'atr'"),
    ("lip:/data", "expected lip:ROOT:SPLIT"),
    ("lip:", "expected lip:ROOT:SPLIT"),
    ("lip::train", "empty ROOT"),
    ("lip:/data:", "empty SPLIT"),
    ("lip:/data:train:", "empty WEIGHT"),
    ("lip:/data:train:0", "bad weight '0'"),
    ("lip:/data:train:-1", "bad weight"),
    ("lip:/data:train:nan", "bad weight"),
    ("cihp:/data:val:inf", "bad weight"),
    ("lip:/data:train:heavy", "bad weight 'heavy'"),
    ("lip:/data:train:val", "bad weight 'val'"),
    ("cihp:/data:test", "Testing has no labels"),
    ("cihp:/data:training", "CIHP split"),
    ("lip:/data:tr/ain", "bad SPLIT"),
    ("/data:0", "bad weight"),
])
def test_parse_source_rejected(text, match):
    with pytest.raises(ValueError, match=match):
        parse_source(text)


def test_source_spec_validation():
    assert SourceSpec("cihp", "/x", "val", 2).weight == 2
    with pytest.raises(ValueError, match="kind"):
        SourceSpec("atr", "/x")
    with pytest.raises(ValueError, match="weight"):
        SourceSpec("lip", "/x", "train", 0)
    with pytest.raises(ValueError, match="root"):
        SourceSpec("lip", "")
    with pytest.raises(ValueError, match="Testing"):
        SourceSpec("cihp", "/x", "test")
    with pytest.raises(TypeError):
        parse_source(None)
