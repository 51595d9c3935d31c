"""A deterministic error on one rank ends the whole run, at once, with its message, and Ray Train
does not retry it: real Ray (the session's local cluster), 2 DeepSpeed workers, shards in the
moto S3 server.

The error is one a restart cannot fix: rank 1's share of the data turns bad from its third
batch on (rank 0's share is good), past data.max_skip_fraction. Ray Train's FailureConfig would
restart the workers run.max_failures times to fail the same way; the run must instead end
after one attempt, within seconds of the failure, well before the collective timeout that
would otherwise end rank 0's wait for rank 1.
"""

from __future__ import annotations

import tarfile
import time

import pytest
from runs import start

from ssl_dist import config, data, metrics, storage

RUN = ["data.batch_size=16", "data.loader_workers=1", "data.image_size=32", "model.cifar_stem=false",
       "model.proj_hidden_dim=128", "model.proj_dim=32", "train.log_every=1", "train.max_steps=12",
       "run.num_workers=2", "run.cpus_per_worker=1", "run.max_failures=2"]
GOOD_BATCHES = 2  # rank 1's first two batches are good: the first steps are done, and recorded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def keys_only(sample: dict) -> dict:
    return {"__key__": sample["__key__"]}


def rank1_bad_from_batch(cifar_shards_s3, local) -> str:
    """A copy of the training shards in which every JPEG of rank 1's epoch-0 batches from
    GOOD_BATCHES on is overwritten in place (same sizes: the manifest and sidecars stay
    true); returns its URL."""
    source, target = cifar_shards_s3["train"], f"s3://{cifar_shards_s3['bucket']}/bad-rank1"
    fs, root = storage.filesystem(source)
    local.mkdir()
    for name in fs.ls(root, detail=False):
        (local / name.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(name))
    cfg = config.load(None, RUN)
    loader = data.make_loader(str(local), rank=1, world_size=2, batch_size=cfg.data.batch_size,
                              num_workers=cfg.data.loader_workers, seed=cfg.data.seed,
                              shuffle_window=cfg.data.shuffle_window, transform=keys_only, lookahead=False)
    batches = [list(batch["__key__"]) for batch in loader]
    bad = {key for batch in batches[GOOD_BATCHES:] for key in batch}
    assert bad and not bad & {key for batch in batches[:GOOD_BATCHES] for key in batch}
    for shard in sorted(local.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [m for m in tar if m.name.endswith(".jpg") and m.name[:-len(".jpg")] in bad]
        with open(shard, "r+b") as f:
            for member in members:
                f.seek(member.offset_data)
                f.write(b"this is no JPEG!" * 4)
    out_fs, out_root = storage.filesystem(target)
    for path in sorted(local.iterdir(), key=lambda p: p.name == "index.json"):  # the manifest last
        out_fs.pipe_file(f"{out_root}/{path.name}", path.read_bytes())
    return target


def test_bad_data_on_one_rank_ends_the_run_at_once_without_retries(cifar_shards_s3, ray_address, tmp_path):
    shards = rank1_bad_from_batch(cifar_shards_s3, tmp_path / "shards")
    url = f"s3://{cifar_shards_s3['bucket']}/fatal/bad-data"
    driver = start(["pretrain", f"data.train_url={shards}", f"run.storage_path=s3://{cifar_shards_s3['bucket']}/fatal",
                    "run.name=bad-data", *RUN, "run.collective_timeout_s=300"], ray_address)
    deadline = time.monotonic() + 600
    while f"step {GOOD_BATCHES}/12" not in driver.output:
        assert driver.poll() is None, driver.output[-4000:]
        assert time.monotonic() < deadline, "no step done in 10 minutes"
        time.sleep(0.2)
    failed_at = time.monotonic()
    returncode = driver.wait(timeout=600)
    ended_in = time.monotonic() - failed_at
    output = driver.output

    assert returncode == 2, output[-4000:]
    message = next(line for line in output.splitlines() if line.startswith("ssl-dist: error:"))
    assert "too much bad data" in message and "rank 1 skipped" in message and "max_skip_fraction" in message
    # one attempt: Ray Train did not restart the workers to fail the same way twice more
    attempts = [[int(row["step"]) for row in rows] for rows in metrics.read_history(url)]
    assert attempts == [list(range(1, GOOD_BATCHES + 1))], attempts
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    assert len(fs.ls(f"{path}/attempts", detail=False)) == 1  # records.AttemptLog: one start of the group
    # rank 0 did not wait out the 300 s collective timeout for rank 1
    assert ended_in < 60, f"the run ended {ended_in:.0f} s after the failure"
    fs.rm(path, recursive=True)  # moto keeps objects in memory
