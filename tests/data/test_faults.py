"""Bad data and broken storage under the data stream, over the S3 protocol (moto on 127.0.0.1).

A corrupt JPEG, a shard truncated after it was indexed, a shard and a sidecar deleted from the
bucket, an endpoint that is unreachable from the start or goes away mid-epoch, a store that
throttles (503 SlowDown, from a proxy in front of moto) for a few seconds or past the read
deadline: the stream skips what the issue says it skips (the same samples in every layout and
across a resume), waits out what is no bad data, keeps every batch full on every rank, counts
exactly, and stops with a clear error where it must.
"""

from __future__ import annotations

import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from cifar import cifar_slice
from services import free_port, start_moto
from throttle_proxy import ThrottleProxy

from ssl_dist import data, shards, storage
from ssl_dist.data.retry import RetryPolicy

PER_CLASS, SPS = 20, 23  # 200 real JPEGs in 8 shards of 23 and one of 16
BATCH = 10  # with 1 or 2 ranks, 200 samples leave no remainder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict, dict[str, int]]:
    """Local shards of a CIFAR slice, their manifest and key -> shard number."""
    root = tmp_path_factory.mktemp("faults")
    src = cifar_slice(root / "src", PER_CLASS)
    manifest = shards.make_shards(str(src), str(root / "shards"), samples_per_shard=SPS, workers=2)
    where = {}
    for number, entry in enumerate(manifest["shards"]):
        for key, _ in shards.group_samples(shards.parse_members((root / "shards" / entry["url"]).read_bytes())):
            where[key] = number
    return root / "shards", manifest, where


def publish(folder: Path, url: str) -> None:
    fs, root = storage.filesystem(url, storage.storage_options(url))
    for path in sorted(folder.iterdir(), key=lambda p: p.name == "index.json"):  # manifest last
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def copy_of(made, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(made[0], out)
    return out


def epoch(url: str, world: int, workers: int, **kw) -> tuple[list[list[dict]], list]:
    loaders = [data.make_loader(url, rank=r, world_size=world, batch_size=BATCH, num_workers=workers,
                                transform=keys_only, **kw) for r in range(world)]
    return [[light(b) for b in loader] for loader in loaders], loaders


def keys_only(sample: dict) -> dict:
    return {"__key__": sample["__key__"]}


def light(batch: dict) -> dict:
    return {"keys": list(batch["__key__"]), "valid": batch["__valid__"].tolist()}


def valid_keys(per_rank) -> list[str]:
    return [k for batches in per_rank for b in batches for k, v in zip(b["keys"], b["valid"]) if v]


def check_full_batches(per_rank) -> None:
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(b["keys"]) == BATCH == len(b["valid"]) for batches in per_rank for b in batches)


def total(loaders, name: str) -> int:
    return sum(loader.stats()[name] for loader in loaders)


# ------------------------------------------------------------------ bad samples


def test_corrupt_jpeg_is_skipped_in_every_layout_and_across_resume(made, tmp_path, bucket):
    folder = copy_of(made, tmp_path)
    with tarfile.open(folder / "shard-000002.tar") as tar:
        victim = [m for m in tar if m.name.endswith(".jpg")][4]
    with open(folder / "shard-000002.tar", "r+b") as f:
        f.seek(victim.offset_data)
        f.write(b"this is no JPEG!" * 4)
    url = f"s3://{bucket}/corrupt"
    publish(folder, url)
    victim_key = victim.name[:-len(".jpg")]
    everything = set(made[2])

    for world, workers in ((1, 0), (2, 1)):
        per_rank, loaders = epoch(url, world, workers)
        check_full_batches(per_rank)
        keys = valid_keys(per_rank)
        assert len(keys) == len(set(keys)) and set(keys) == everything - {victim_key}
        assert total(loaders, "skipped_samples") == 1 and total(loaders, "skipped_shards") == 0
        slot = [(b, i) for batches in per_rank for b in batches for i, v in enumerate(b["valid"]) if not v]
        assert len(slot) == 1
        batch, i = slot[0]
        assert batch["keys"][i] in [k for k, v in zip(batch["keys"], batch["valid"]) if v]  # a copy from its batch

    # stop after 3 batches on 2 ranks, finish on 1: the count stays exact
    old = [data.make_loader(url, rank=r, world_size=2, batch_size=BATCH, num_workers=1, transform=keys_only)
           for r in range(2)]
    first = []
    for loader in old:
        iterator = iter(loader)
        first.append([light(next(iterator)) for _ in range(3)])
        iterator.close()
    new = data.make_loader(url, rank=0, world_size=1, batch_size=BATCH, transform=keys_only)
    new.load_state_dict([loader.state_dict() for loader in old])
    rest = [[light(b) for b in new]]
    keys = valid_keys(first) + valid_keys(rest)
    assert len(keys) == len(set(keys)) == 199
    assert new.stats()["skipped_samples"] == 1


def test_truncated_shard_loses_only_the_samples_cut_off(made, tmp_path, bucket):
    folder = copy_of(made, tmp_path)
    entry = made[1]["shards"][3]
    offsets = shards.read_offsets(str(folder), entry).astype(np.int64)
    cut = int(offsets[14]) + 700  # inside sample 14: it and the 8 after it are gone
    path = folder / entry["url"]
    path.write_bytes(path.read_bytes()[:cut])
    url = f"s3://{bucket}/truncated"
    publish(folder, url)
    originals = shards.group_samples(shards.parse_members((made[0] / entry["url"]).read_bytes()))
    lost_keys = {key for k, (key, _) in enumerate(originals) if k >= 14}
    assert len(lost_keys) == 9

    for world, workers in ((2, 1), (1, 0)):
        per_rank, loaders = epoch(url, world, workers, max_skip_fraction=0.1)
        check_full_batches(per_rank)
        assert set(valid_keys(per_rank)) == set(made[2]) - lost_keys
        assert total(loaders, "skipped_samples") == 9 and total(loaders, "skipped_shards") == 0


# ------------------------------------------------------------------ unreadable shards


def test_deleted_shard_and_sidecar_are_skipped_and_counted(made, tmp_path, bucket):
    url = f"s3://{bucket}/deleted"
    publish(made[0], url)
    fs, root = storage.filesystem(url, storage.storage_options(url))
    fs.rm_file(f"{root}/shard-000005.tar")  # after the manifest was written
    fs.rm_file(f"{root}/shard-000007.idx")
    gone = {key for key, shard in made[2].items() if shard in (5, 7)}
    fast = {"read_retries": 1, "retry_backoff": 0.01, "shuffle_window": 40}

    per_rank, loaders = epoch(url, 2, 1, max_skip_fraction=0.3, **fast)
    check_full_batches(per_rank)
    assert set(valid_keys(per_rank)) == set(made[2]) - gone
    assert total(loaders, "skipped_samples") == 46 and total(loaders, "skipped_shards") == 2
    bad_batches = [b for batches in per_rank for b in batches if not any(b["valid"])]
    assert bad_batches  # windows of 40 over 2 ranks: whole batches come from a lost shard ...
    for b in bad_batches:  # ... and are filled with copies of one readable sample
        assert len(set(b["keys"])) == 1 and made[2][b["keys"][0]] not in (5, 7)

    # the same counts after a resume into another layout
    old = [data.make_loader(url, rank=r, world_size=2, batch_size=BATCH, num_workers=0, transform=keys_only,
                            max_skip_fraction=0.3, **fast) for r in range(2)]
    first = []
    for loader in old:
        iterator = iter(loader)
        first.append([light(next(iterator)) for _ in range(5)])
        iterator.close()
    new = [data.make_loader(url, rank=r, world_size=1, batch_size=BATCH, num_workers=2, transform=keys_only,
                            max_skip_fraction=0.3, **fast) for r in range(1)]
    new[0].load_state_dict([loader.state_dict() for loader in old])
    rest = [[light(b) for b in new[0]]]
    keys = valid_keys(first) + valid_keys(rest)
    assert len(keys) == len(set(keys)) and set(keys) == set(made[2]) - gone
    assert total(new, "skipped_samples") == 46 and total(new, "skipped_shards") == 2

    # past the allowed fraction the run stops and names the shards
    with pytest.raises(data.DataError) as stop:
        epoch(url, 2, 0, max_skip_fraction=0.05, **fast)
    message = str(stop.value)
    assert "too much bad data" in message and "max_skip_fraction=0.05" in message
    assert "shard-000005.tar" in message or "shard-000007.tar" in message
    assert "missing" in message and "ssl-dist shards check" in message


# ------------------------------------------------------------------ an unreachable store


def unreachable_options(endpoint: str) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


def test_unreachable_endpoint_from_the_start():
    options = unreachable_options(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot reach the object store .* check the endpoint") as stop:
        data.make_loader("s3://somewhere/shards", rank=0, world_size=1, batch_size=4, storage_options=options,
                         retry_backoff=0.05, read_deadline_s=3)
    assert time.monotonic() - started < 60
    assert options["client_kwargs"]["endpoint_url"] in str(stop.value) and "'somewhere'" in str(stop.value)
    assert "data.read_deadline_s=3 s" in str(stop.value)


def test_endpoint_lost_mid_epoch_stops_with_a_clear_error(made):
    import boto3

    proc, endpoint = start_moto()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lost")
        options = unreachable_options(endpoint)
        fs, _ = storage.filesystem("s3://lost/d", options)
        for path in sorted(made[0].iterdir(), key=lambda p: p.name == "index.json"):
            fs.pipe_file(f"lost/d/{path.name}", path.read_bytes())
        loader = data.make_loader("s3://lost/d", rank=0, world_size=1, batch_size=BATCH, num_workers=1,
                                  storage_options=options, transform=keys_only, shuffle_window=20, read_retries=1,
                                  retry_backoff=0.01, read_deadline_s=5)
        iterator = iter(loader)
        next(iterator)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot reach the object store"):
        for _ in iterator:
            pass
    assert time.monotonic() - started < 90
    assert loader.stats()["skipped_samples"] == 0  # an unreachable store is no bad data: nothing was skipped


# ------------------------------------------------------------------ a throttling store (503 SlowDown)


@pytest.fixture
def proxy(s3_endpoint):
    """A proxy in front of the session's moto server that answers 503 SlowDown to GETs when told."""
    with ThrottleProxy(s3_endpoint) as running:
        yield running


def through(proxy: ThrottleProxy, url: str) -> dict:
    return storage.storage_options(url, endpoint_url=proxy.endpoint)


def test_one_failed_get_is_one_attempt_below_the_retry_layer(cifar_shards_s3, proxy, monkeypatch):
    url = cifar_shards_s3["train"]
    # the clients the stream reads through send a failed GET once: neither botocore nor s3fs retries it
    fs, root = storage.filesystem(url, storage.single_attempt(url, through(proxy, url)))
    proxy.throttle(forever=True)
    with pytest.raises(OSError, match="reduce your request rate"):
        fs.cat_file(f"{root}/shard-000000.idx")
    assert proxy.count("GET") == 1

    # under the reader: as many GETs reach the store as the retry layer makes attempts
    proxy.throttle()
    shardset = data.ShardSet(url, through(proxy, url), policy=RetryPolicy(backoff_s=0.05, deadline_s=30))
    attempts = []
    reading = shardset.fs()
    monkeypatch.setattr(reading, "cat_file", lambda *a, **kw: attempts.append(a) or type(reading).cat_file(
        reading, *a, **kw))
    before = proxy.count("GET")
    proxy.throttle(requests=3)  # the next 3 GETs: 503 SlowDown
    samples = shardset.read_samples(1, 0, 5)
    assert all(not isinstance(s, data.Skip) for s in samples)
    assert len(attempts) == proxy.count("GET") - before == 2 + 3  # sidecar and shard, 3 of them answered 503
    assert proxy.count("GET", 503) == 1 + 3


def test_throttled_for_a_few_seconds_the_stream_waits_and_delivers_every_sample_once(cifar_shards_s3, proxy):
    url = cifar_shards_s3["train"]
    expected = {f"{p.parent.name}/{p.stem}" for p in cifar_shards_s3["train_src"].glob("*/*.jpg")}
    kw = {"storage_options": through(proxy, url), "transform": keys_only, "retry_backoff": 0.05,
          "read_deadline_s": 60, "num_workers": 1}
    proxy.throttle(seconds=2)  # at start: the manifest is waited for
    loaders = [data.make_loader(url, rank=r, world_size=2, batch_size=BATCH, **kw) for r in range(2)]
    assert proxy.count("GET", 503) > 0
    proxy.throttle(seconds=4)  # mid-stream: sidecars and shards
    started = time.monotonic()
    per_rank = [[light(b) for b in loader] for loader in loaders]
    check_full_batches(per_rank)
    keys = valid_keys(per_rank)
    assert len(keys) == len(set(keys)) == 200 and set(keys) == expected  # every sample, exactly once
    assert total(loaders, "skipped_samples") == 0 and total(loaders, "skipped_shards") == 0
    assert time.monotonic() - started >= 4  # nothing got through the 4 s of throttling ...
    assert proxy.count("GET", 503) > 10 and proxy.count("GET", 206) + proxy.count("GET", 200) >= 10  # ... then all did


def test_throttled_past_the_deadline_the_stream_stops_naming_the_store(cifar_shards_s3, proxy):
    url = cifar_shards_s3["train"]
    loader = data.make_loader(url, rank=0, world_size=1, batch_size=BATCH, num_workers=1, transform=keys_only,
                              storage_options=through(proxy, url), retry_backoff=0.05, read_deadline_s=3)
    proxy.throttle(forever=True)
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as stop:
        for _ in loader:
            pass
    assert 3 <= time.monotonic() - started < 60
    message = str(stop.value)
    assert f"the object store {proxy.endpoint}, bucket 'cifar-shards' kept throttling" in message
    assert "data.read_deadline_s=3 s" in message and "nothing was skipped as bad data" in message
    assert loader.stats()["skipped_samples"] == 0 and loader.stats()["skipped_shards"] == 0
