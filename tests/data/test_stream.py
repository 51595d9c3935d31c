"""The data stream over the real S3 protocol (moto server on 127.0.0.1) with real CIFAR JPEGs.

Exactly-once over 1-3 ranks x 0-2 loader workers on shards of uneven size, resume into
another layout, determinism, the equal-batch rule, tensor batches and user errors. Faults
(truncated, corrupt, deleted shards, unreachable endpoint) are in test_faults.py, the fast
parser the reader uses in test_reader.py, the decoder in tests/test_decode.py and the pure
plan math in test_plan.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar import cifar_slice
from PIL import Image

from ssl_dist import data, shards, storage

SPS = 23  # samples per shard of the cifar_local shards (conftest.py): 8 shards of 23 and one of 16


# ------------------------------------------------------------------ helpers


def all_keys(manifest_folder: Path) -> set[str]:
    return {p.parent.name + "/" + p.stem for p in (manifest_folder.parent / "src").glob("*/*.jpg")}


def run_epoch(url: str, world: int, workers: int, batch_size: int, **kw) -> tuple[list[list[dict]], list]:
    """Every rank's batches of one epoch (batch dicts without images) and the loaders."""
    loaders = [data.make_loader(url, rank=r, world_size=world, batch_size=batch_size, num_workers=workers,
                                transform=kw.pop("transform", keys_only), **kw) for r in range(world)]
    return [[light(b) for b in loader] for loader in loaders], loaders


def keys_only(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "cls": sample["cls"]}


def light(batch: dict) -> dict:
    return {"keys": list(batch["__key__"]), "valid": batch["__valid__"].tolist(), "n": batch["__batch__"]}


def delivered(per_rank: list[list[dict]]) -> list[str]:
    return [k for batches in per_rank for b in batches for k, v in zip(b["keys"], b["valid"]) if v]


# ------------------------------------------------------------------ exactly once


@pytest.mark.parametrize("world, workers", list(itertools.product([1, 2, 3], [0, 1, 2])))
def test_exactly_once_over_ranks_and_workers(cifar_s3, cifar_local, world, workers):
    folder, manifest = cifar_local
    assert [s["num_samples"] for s in manifest["shards"]] == [SPS] * 8 + [16]
    per_rank, loaders = run_epoch(cifar_s3, world, workers, batch_size=7, shuffle_window=60)
    keys = delivered(per_rank)
    assert len(keys) == len(set(keys)), "a sample was delivered twice"
    dropped = loaders[0].stats()["dropped_remainder"]
    assert dropped == 200 % (7 * world) and dropped < 7 * world
    assert set(keys) <= all_keys(folder) and len(keys) == 200 - dropped
    assert len({len(b) for b in per_rank}) == 1, "ranks got different numbers of batches"
    assert all(len(b["keys"]) == 7 and all(b["valid"]) for batches in per_rank for b in batches)
    assert [b["n"] for b in per_rank[0]] == list(range(len(per_rank[0])))
    stats = [loader.stats() for loader in loaders]
    assert sum(s["samples"] for s in stats) == 0  # the epoch is over: counters are the next epoch's
    assert all(s["epoch"] == 1 and s["skipped_samples"] == 0 for s in stats)


def test_one_shard_feeds_more_readers_than_it_has_shards(tmp_path):
    src = cifar_slice(tmp_path / "src", 3)  # 30 samples in ONE shard, read by 3 ranks x 2 loader workers
    shards.make_shards(str(src), str(tmp_path / "one"), workers=1)
    per_rank, _ = run_epoch(str(tmp_path / "one"), 3, 2, batch_size=2, shuffle_window=12)
    keys = delivered(per_rank)
    assert len(keys) == len(set(keys)) == 30 and len({len(b) for b in per_rank}) == 1


# ------------------------------------------------------------------ resume


def take(loader, k: int) -> list[dict]:
    """The first k batches; then the iterator (and its loader workers, with prefetched batches) is dropped."""
    iterator = iter(loader)
    out = [light(next(iterator)) for _ in range(k)]
    iterator.close()
    return out


@pytest.mark.parametrize("before, after", [((2, 2), (3, 1)), ((3, 1), (1, 2)), ((2, 0), (2, 0))])
def test_resume_into_another_layout_is_exactly_once(cifar_s3, before, after):
    (w0, n0), (w1, n1) = before, after
    old = [data.make_loader(cifar_s3, rank=r, world_size=w0, batch_size=5, num_workers=n0, shuffle_window=40,
                            transform=keys_only) for r in range(w0)]
    first = [take(loader, 3) for loader in old]  # odd: the next batch belongs to another loader worker
    states = [loader.state_dict() for loader in old]
    assert all(s["batches"] == 3 for s in states)

    new = [data.make_loader(cifar_s3, rank=r, world_size=w1, batch_size=5, num_workers=n1, shuffle_window=40,
                            transform=keys_only) for r in range(w1)]
    for loader in new:
        loader.load_state_dict(states)
    dropped = new[0].stats()["dropped_remainder"]
    rest = [[light(b) for b in loader] for loader in new]
    keys = delivered(first) + delivered(rest)
    assert len(keys) == len(set(keys)) == 200 - dropped and dropped < 5 * w1
    assert len({len(b) for b in rest}) == 1
    # then the next epoch, complete and exactly once
    assert all(loader.epoch == 1 for loader in new)
    nxt = [[light(b) for b in loader] for loader in new]
    keys = delivered(nxt)
    assert len(keys) == len(set(keys)) == 200 - 200 % (5 * w1)

    if before == after:  # the same layout continues with exactly the batches of an uninterrupted run
        straight = [[light(b) for b in data.make_loader(cifar_s3, rank=r, world_size=w0, batch_size=5,
                                                        num_workers=n0, shuffle_window=40, transform=keys_only)]
                    for r in range(w0)]
        assert [f + r for f, r in zip(first, rest)] == straight


def test_resume_reads_from_inside_the_shard(cifar_s3, monkeypatch):
    loader = data.make_loader(cifar_s3, rank=0, world_size=1, batch_size=10, shuffle_window=50,
                              transform=keys_only)
    take(loader, 7)
    state = loader.state_dict()
    reads = []
    original = data.ShardSet.read_samples

    def spy(self, shard, first, stop):
        reads.append((shard, first, stop))
        return original(self, shard, first, stop)

    monkeypatch.setattr(data.ShardSet, "read_samples", spy)
    again = data.make_loader(cifar_s3, rank=0, world_size=1, batch_size=10, shuffle_window=50, transform=keys_only)
    again.load_state_dict([state])
    next(iter(again))
    # Only what the rest of the epoch needs is read: the current window (plan positions 50-99,
    # 30 of them still to come; small gaps are read through) and the prefetched next one
    # (100-149), each from where it starts inside its shards; never window 0 or a shard's start
    # before the resume point.
    order, starts = again.shards.order(0, 0)
    slot_of = {int(shard): slot for slot, shard in enumerate(order)}
    positions = [int(starts[slot_of[shard]]) + i for shard, first, stop in reads for i in range(first, stop)]
    assert min(positions) >= 50 and max(positions) < 150 and len(reads) <= 8
    assert any(first > 0 for _, first, _ in reads)


# ------------------------------------------------------------------ determinism


def test_order_is_a_function_of_seed_and_epoch(cifar_local):
    def order(seed, epoch=0, world=1, workers=0):  # storage plays no part here: local shards
        loader = data.make_loader(str(cifar_local[0]), rank=0, world_size=world, batch_size=8, num_workers=workers,
                                  seed=seed, epoch=epoch, shuffle_window=64, transform=keys_only)
        return [k for b in loader for k in b["__key__"]]

    base = order(0)
    assert base == order(0)
    assert order(0, workers=2) == order(0, workers=2)
    assert base != order(1) and sorted(base) == sorted(order(1))
    assert base != order(0, epoch=1)
    assert base != sorted(base)  # samples are shuffled, not read in shard order


def test_next_epoch_starts_its_workers_early_and_delivers_the_same_batches(cifar_local):
    def three_epochs(lookahead):
        loader = data.Loader(str(cifar_local[0]), rank=0, world_size=1, batch_size=8, num_workers=2,
                             shuffle_window=64, transform=keys_only, lookahead=lookahead)
        epochs, started_early = [], []
        for _ in range(3):
            keys = []
            for batch in loader:
                keys.append(list(batch["__key__"]))
                if len(loader) == 0:  # this epoch's last batch: the next one's workers run already
                    started_early.append(loader._ahead is not None)
            epochs.append(keys)
        return epochs, started_early

    early, started = three_epochs(True)
    assert started == [True, True, True]
    late, started = three_epochs(False)
    assert started == [False, False, False]
    assert early == late  # the same batches, epoch after epoch
    assert early[0] != early[1]  # (and each epoch has its own order)


def test_augmentation_is_the_same_in_every_layout(cifar_s3):
    from ssl_dist.augment import TwoViews

    def views(world, workers):
        out = {}
        for rank in range(world):
            loader = data.make_loader(cifar_s3, rank=rank, world_size=world, batch_size=10, num_workers=workers,
                                      transform=TwoViews(16), seed=3)
            for b in itertools.islice(loader, 3):
                assert b["view1"].shape == (10, 3, 16, 16)
                out.update({k: (v1, v2) for k, v1, v2 in zip(b["__key__"], b["view1"], b["view2"])})
        return out

    one, many = views(1, 0), views(2, 1)
    common = set(one) & set(many)
    assert common
    for key in common:
        assert torch.equal(one[key][0], many[key][0]) and torch.equal(one[key][1], many[key][1])
    state = torch.get_rng_state()
    next(iter(data.make_loader(cifar_s3, rank=0, world_size=1, batch_size=4, transform=TwoViews(16))))
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is left alone


# ------------------------------------------------------------------ tensors and user errors


def test_tensor_batches_and_user_errors(cifar_s3, cifar_local, tmp_path):
    loader = data.make_loader(cifar_s3, rank=0, world_size=2, batch_size=16, num_workers=1, image_format="tensor")
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous() and batch["cls"].shape == (16,) and batch["__valid__"].all()
    assert "image_bytes" not in batch  # the encoded bytes stay in the loader worker
    # Through 2 loader workers (the shared-slot handover, JPEGs decoded in place) each sample as
    # in-process, its image PIL's pixels of its file; batches held while the workers run on are intact.
    folder, _ = cifar_local
    per_layout = []
    for workers in (0, 2):
        batches = list(data.make_loader(cifar_s3, rank=0, world_size=1, batch_size=9, num_workers=workers,
                                        image_format="tensor", prefetch_factor=1))
        assert len(batches) == 200 // 9 and all(b["__valid__"].all() for b in batches)
        per_layout.append({key: (image, label) for b in batches
                           for key, image, label in zip(b["__key__"], b["image"], b["cls"].tolist())})
    assert per_layout[0].keys() == per_layout[1].keys() and len(per_layout[0]) == 200 // 9 * 9
    for key, (image, label) in per_layout[1].items():
        pixels = np.asarray(Image.open(folder.parent / "src" / f"{key}.jpg").convert("RGB"))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels), key
        assert torch.equal(image, per_layout[0][key][0]) and label == per_layout[0][key][1], key

    with pytest.raises(data.DataError, match=r"no index.json at .*nowhere: make shards with `ssl-dist shards make"):
        data.make_loader(str(tmp_path / "nowhere"), rank=0, world_size=1, batch_size=4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.json").write_text('{"format": "ssl_dist.shards/1", "shards": [], "num_samples": 0}')
    with pytest.raises(data.DataError, match="lists no samples"):
        data.make_loader(str(tmp_path / "empty"), rank=0, world_size=1, batch_size=4)
    with pytest.raises(data.DataError, match=r"has 200 samples, fewer than one global batch \(64 x 4 ranks = 256\)"):
        data.make_loader(cifar_s3, rank=0, world_size=4, batch_size=64)
    with pytest.raises(data.DataError, match="image_format"):
        data.make_loader(cifar_s3, rank=0, world_size=1, batch_size=4, image_format="jpeg")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x'"):
        data.make_loader("s3://no-such-bucket-x/d", rank=0, world_size=1, batch_size=4)
