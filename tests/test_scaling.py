"""The scaling model's closed forms against what the code itself does: the S3 reads of an
epoch counted from data/plan.py's pure layout, the loss's gathered shapes and memory from
the loss run in this process, the manifest from shards.make."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memory import HAS_PEAK_RSS

from ssl_dist import scaling
from ssl_dist.data.plan import Layout, Plan, runs_of, worker_slice


def shard_counts(w: scaling.Workload) -> np.ndarray:
    """Shards of shard_samples on average, each within 20% of it (as images of varied size
    make them): a shard's end then rarely falls exactly on the start of a reader's stretch."""
    rng = np.random.default_rng(0)
    counts = rng.integers(int(0.8 * w.shard_samples), int(1.2 * w.shard_samples) + 1, size=w.total_samples
                          // w.shard_samples)
    counts[-1] += w.total_samples - counts.sum()
    return counts


def counted_reads(w: scaling.Workload, workers: int) -> dict:
    """The ranged GETs (one per run of consecutive samples that a loader worker reads in a
    window) and sidecar GETs (one per loader worker and shard it meets) of one epoch, as the
    stream makes them: every (window, rank, loader worker) slice of data/plan.py."""
    counts = shard_counts(w)
    order = np.arange(len(counts))
    starts = np.concatenate([[0], np.cumsum(counts)])
    loaders = max(1, w.loader_workers)
    layout = Layout(world_size=workers, num_workers=loaders, batch_size=w.batch_size,
                    window_batches=scaling.window_batches(w, workers))
    plan = Plan(epoch=0, total=w.total_samples)
    windows = -(-plan.num_batches(layout) // layout.window_batches)
    data_gets, met = 0, set()
    for window in range(windows):
        for rank in range(workers):
            for worker in range(loaders):
                _, indices = worker_slice(plan, layout, window, rank, worker)
                runs = runs_of(plan.at(indices), order, starts)
                data_gets += len(runs)
                met.update((rank, worker, shard) for shard, _, _ in runs)
    return {"data_gets": data_gets, "sidecar_gets": len(met)}


@pytest.mark.parametrize("workers,batch,loaders,window,shard", [
    (1, 256, 1, 4096, 5000), (2, 64, 2, 4096, 5000), (4, 32, 2, 4096, 1000), (4, 16, 1, 256, 500),
    (3, 100, 4, 30000, 2000), (8, 64, 2, 512, 10000)])
def test_reads_per_epoch_match_the_plans_reads(workers, batch, loaders, window, shard):
    w = scaling.Workload(method="simclr", params=1, embed_dim=8, batch_size=batch, loader_workers=loaders,
                         shuffle_window=window, shard_samples=shard, total_samples=20 * shard)
    model, counted = scaling.reads_per_epoch(w, workers), counted_reads(w, workers)
    assert model["data_gets"] == pytest.approx(counted["data_gets"], rel=0.05)
    assert model["sidecar_gets"] == pytest.approx(counted["sidecar_gets"], rel=0.05)


def test_a_bigger_shuffle_window_brings_the_requests_under_the_limit():
    w = scaling.Workload(method="clip", params=1, embed_dim=512, batch_size=64, loader_workers=8,
                         shard_samples=10000, sample_bytes=40000, total_samples=400_000_000)
    rate = 1024 * 2500  # samples/s of 1,024 GPUs
    window = scaling.shuffle_window_for(w, 1024, rate, get_limit=5500)
    assert scaling.s3_rates(dataclasses.replace(w, shuffle_window=window), 1024, rate)["get_per_s"] <= 5500
    assert scaling.s3_rates(dataclasses.replace(w, shuffle_window=window // 2), 1024, rate)["get_per_s"] > 5500


MEASURE_PEAKS = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from memory import peak_rss, reset_peak_rss
from ssl_dist import loss
n, d = {n}, {d}
torch.manual_seed(0)
a, b = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
valid, scale = torch.ones(n, dtype=torch.bool), torch.tensor([2.0])
runs = {{"simclr": lambda c: loss.nt_xent(a, b, 0.2, chunk_size=c, valid=valid),
        "clip": lambda c: loss.clip_loss(a, b, scale, chunk_size=c, valid=valid),
        "siglip": lambda c: loss.siglip_loss(a, b, scale, torch.tensor([-1.0]), chunk_size=c)}}
peaks = {{}}
for method, run in runs.items():
    for chunk in (None, 256):
        for _ in range(2):  # the first call warms the allocator up
            base = reset_peak_rss()
            out = run(chunk)
            peak = peak_rss() - base
            del out
        peaks[f"{{method}}-{{chunk}}"] = peak
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not HAS_PEAK_RSS, reason="needs Linux /proc")
def test_loss_memory_is_the_peak_the_loss_holds():
    # In a fresh process: a long test session's heap (what earlier tests left resident) made
    # the peak of one loss call count buffers that were not alive at the same time.
    import subprocess
    import sys
    from pathlib import Path

    n, d = 2048, 128  # large enough that the loss's buffers, not the allocator, set the peak
    code = MEASURE_PEAKS.format(tests=str(Path(__file__).parent), n=n, d=d)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    for key, peak in peaks.items():
        method, chunk = key.split("-")
        w = scaling.Workload(method=method, params=1, embed_dim=d, batch_size=n,
                             chunk_size=None if chunk == "None" else int(chunk), device="cpu")
        predicted = scaling.loss_memory_bytes(w, 1)
        # what the model leaves out (temporaries of the normalisation, small vectors): at most
        # four (n, D) fp32 tensors' worth
        assert 0.9 * predicted <= peak <= 1.1 * predicted + 4 * n * d * 4, (key, peak / 2**20, predicted / 2**20)


def test_manifest_entry_size_is_what_shards_make_writes(tmp_path):
    from cifar import cifar_slice

    from ssl_dist.shards import make_shards

    folder = cifar_slice(tmp_path / "src", per_class=20, split="test")
    make_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=20, workers=1)
    manifest = json.loads((tmp_path / "shards" / "index.json").read_text())
    per_shard = len(json.dumps(manifest["shards"])) / len(manifest["shards"])
    assert per_shard == pytest.approx(scaling.MANIFEST_BYTES_PER_SHARD, rel=0.25), per_shard
    sidecar = (tmp_path / "shards" / manifest["shards"][0]["index"]).stat().st_size
    assert sidecar == scaling.dataset_index_bytes(scaling.Workload(
        method="simclr", params=1, embed_dim=1, batch_size=1, shard_samples=20))["sidecar"]


# ---- restart ---------------------------------------------------------------------------------


def test_steps_lost_is_what_a_resume_from_the_newest_registered_checkpoint_redoes():
    # Failures at uniformly random moments of a long run; a checkpoint of step k counts from
    # step k + upload (its asynchronous upload registered), and a restart goes back to the
    # newest counted one, as checkpoint/resume.py's find_resume does with Ray Train's handed one.
    rng = np.random.default_rng(0)
    for every, upload in [(50, 0), (50, 7), (200, 30), (10, 3)]:
        failed_at = rng.uniform(every + upload, 100 * every, size=20_000)
        newest = np.floor((failed_at - upload) / every) * every
        assert np.mean(failed_at - newest) == pytest.approx(scaling.steps_lost(every, upload), rel=0.02)


def test_checkpoint_interval_minimises_the_time_lost_to_checkpoints_and_failures():
    held, step, mtbf = 2.0, 0.1, 8 * 3600.0

    def lost_fraction(interval: int) -> float:  # held per interval, and half an interval per failure
        return held / (interval * step + held) + interval * step / 2 / mtbf

    best = scaling.checkpoint_interval_for(held, step, mtbf)
    for other in (best // 2, best * 2, best - 50, best + 50):
        assert lost_fraction(best) <= lost_fraction(other)


def test_restart_reads_every_ranks_share_and_rank_0_hashes_the_whole_checkpoint():
    w = scaling.Workload(method="clip", params=150_000_000, embed_dim=512, batch_size=64, precision_bytes=2)
    ckpt = scaling.checkpoint_bytes(w, 8)
    reads = scaling.restore_read_bytes(w, 8)
    weights = w.params * 2
    assert reads["choose"] == ckpt["total"]
    assert reads["per_rank"] == ckpt["per_rank_max"]
    assert reads["total"] == ckpt["total"] + 8 * weights + (ckpt["total"] - weights)  # the state once, weights 8x
    stage3 = scaling.restore_read_bytes(dataclasses.replace(w, zero_stage=3), 8)
    assert stage3["total"] == 2 * scaling.checkpoint_bytes(dataclasses.replace(w, zero_stage=3), 8)["total"]
    resharded = scaling.restore_read_bytes(w, 8, resharded_nodes=2)
    assert resharded["total"] == 3 * ckpt["total"]

    fast = scaling.restart_seconds(w, 8, detect_s=1, start_s=2, engine_s=3, seek_s=4, rank_mb_per_s=1000,
                                   store_mb_per_s=1e9, step_s=0.5, lost_steps=10)
    assert fast["total"] == pytest.approx(sum(v for k, v in fast.items() if k != "total"))
    assert fast["download"] == pytest.approx(ckpt["per_rank_max"] / 1e9)
    assert fast["redo"] == 5.0
    # a store slower than the ranks together bounds the download instead
    slow = scaling.restart_seconds(w, 8, detect_s=1, start_s=2, engine_s=3, seek_s=4, rank_mb_per_s=1000,
                                   store_mb_per_s=100, step_s=0.5, lost_steps=10)
    assert slow["download"] == pytest.approx((reads["total"] - reads["choose"]) / 100e6)
