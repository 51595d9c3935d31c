"""The scaling model (`ssl_dist.scaling`) against runs here at W = 1, 2, 4, then its figures
for 1,024 GPUs (docs/scaling.md explains both).

    python benchmarks/scaling.py [--workers 1,2,4] [--only reads,loss,engine,restart,scale]

Measured, each next to the model's figure:
- S3: the requests of one epoch of a CIFAR slice read by W ranks' real Loaders (loader
  workers included) from moto's S3 server, counted by moto's request recorder: ranged GETs
  of shards, GETs of sidecars, bytes.
- The loss: W gloo ranks run NT-Xent, CLIP and SigLIP (forward, whose gradient work is done
  there, and backward); bytes each rank receives for the loss (the gathered rows and their
  gradients, or the ring's blocks), and each rank's peak resident memory during the loss.
- The engine: W gloo ranks run DeepSpeed ZeRO-2 and ZeRO-3 steps of the CPU ResNet of
  cifar10.yaml; DeepSpeed's own comms logger gives the bytes of its collectives per step,
  and `save_checkpoint` the bytes each rank writes.
- Restart: `ssl-dist pretrain` on W Ray workers with one worker SIGKILLed after the first
  registered checkpoint: the bytes the restart reads from the checkpoint (moto's recorder),
  its phases (the attempt records), and the time until the run is back at the step it had
  reached, next to the model fed with the first W's fixed terms; then that checkpoint
  resumed on 1 worker (resharded).
Bytes and counts do not depend on speed: these run on a quarter of a core each as well as
on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CONFIG = ROOT / "jobs" / "configs" / "cifar10.yaml"

from ssl_dist import scaling  # noqa: E402  (after the tests folder is on the path)

# ---- S3: one epoch read by W ranks, counted by moto ---------------------------------------------

READ = dict(batch_size=16, loader_workers=2, shuffle_window=256, shard_samples=250, per_class=200)


def recorded_requests(recording: Path):
    """The requests in moto's recording: JSON objects one after the other (under concurrent
    uploads the server's writes do not always end in a newline, so not read line by line)."""
    text, decoder, at = recording.read_text(), json.JSONDecoder(), 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return
        entry, at = decoder.raw_decode(text, at)
        yield entry


def measure_reads(workers: int, bucket_url: str, recording: Path, endpoint: str) -> dict:
    """Requests of one epoch of `bucket_url` read by `workers` ranks' Loaders (one after the other)."""
    import requests

    from ssl_dist.data import Loader

    requests.post(f"{endpoint}/moto-api/recorder/reset-recording").raise_for_status()
    requests.post(f"{endpoint}/moto-api/recorder/start-recording").raise_for_status()
    for rank in range(workers):
        loader = Loader(bucket_url, rank=rank, world_size=workers, batch_size=READ["batch_size"],
                        num_workers=READ["loader_workers"], shuffle_window=READ["shuffle_window"], lookahead=False)
        for _ in loader:
            pass
    requests.post(f"{endpoint}/moto-api/recorder/stop-recording").raise_for_status()
    found = {"data_gets": 0, "sidecar_gets": 0, "data_bytes": 0, "other": {}}
    for entry in recorded_requests(recording):
        path = entry["url"].split("?", 1)[0]
        if entry["method"] == "GET" and path.endswith(".tar"):
            found["data_gets"] += 1
            lo, hi = entry["headers"].get("Range", "bytes=0-0").removeprefix("bytes=").split("-")
            found["data_bytes"] += int(hi) - int(lo) + 1
        elif entry["method"] == "GET" and path.endswith(".idx"):
            found["sidecar_gets"] += 1
        else:  # the manifest, listings, HEADs: by method and the kind of object
            kind = "index.json" if path.endswith("index.json") else path.rsplit(".", 1)[-1] if "." in \
                path.rsplit("/", 1)[-1] else "folder"
            found["other"][f"{entry['method']} {kind}"] = found["other"].get(f"{entry['method']} {kind}", 0) + 1
    return found


def reads_table(worker_counts: list[int]) -> list[str]:
    import boto3
    from cifar import cifar_slice
    from services import start_moto

    from ssl_dist.shards import make_shards

    with tempfile.TemporaryDirectory(prefix="scaling-s3-") as tmp:
        recording = Path(tmp) / "recording.jsonl"
        proc, endpoint = start_moto({"MOTO_RECORDER_FILEPATH": str(recording)})
        try:
            os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            folder = cifar_slice(Path(tmp) / "src", per_class=READ["per_class"], split="train")
            make_shards(str(folder), "s3://bench/slice", samples_per_shard=READ["shard_samples"], workers=2)
            manifest = json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(
                Bucket="bench", Key="slice/index.json")["Body"].read())
            shards = manifest["shards"]
            total = sum(s["num_samples"] for s in shards)
            w = scaling.Workload(method="simclr", params=1, embed_dim=1, batch_size=READ["batch_size"],
                                 loader_workers=READ["loader_workers"], shuffle_window=READ["shuffle_window"],
                                 shard_samples=READ["shard_samples"], total_samples=total,
                                 sample_bytes=round(sum(s["size"] for s in shards) / total))
            rows = [f"S3, one epoch of {total} CIFAR images in {len(shards)} shards of {READ['shard_samples']} "
                    f"({w.sample_bytes} B a sample; manifest entry {len(json.dumps(shards)) / len(shards):.0f} B), "
                    f"batch {READ['batch_size']} a rank, {READ['loader_workers']} loader workers, shuffle window "
                    f"{READ['shuffle_window']}", "",
                    "| W | shard GETs (model / moto) | sidecar GETs | shard MB | other requests |",
                    "|---|---|---|---|---|"]
            for workers in worker_counts:
                got = measure_reads(workers, "s3://bench/slice", recording, endpoint)
                model = scaling.reads_per_epoch(w, workers)
                rows.append(f"| {workers} | {model['data_gets']:.0f} / {got['data_gets']} | "
                            f"{model['sidecar_gets']:.0f} / {got['sidecar_gets']} | "
                            f"{model['data_bytes'] / 1e6:.2f} / {got['data_bytes'] / 1e6:.2f} | "
                            f"{', '.join(f'{k} {v}' for k, v in sorted(got['other'].items()))} |")
        finally:
            proc.terminate()
    return rows


# ---- the loss and the engine: W gloo ranks ---------------------------------------------------

LOSS = dict(batch_size=1024, embed_dim=128, chunk_size=256)


def rank_main(rank: int, workers: int, port: int, what: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(workers), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", rank=rank, world_size=workers)
    torch.set_num_threads(1)
    result = loss_on_rank(rank) if what == "loss" else engine_on_rank(rank, workers, int(what[len("zero"):]), out)
    Path(out, f"{what}-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def loss_on_rank(rank: int) -> dict:
    """{method: {"received": bytes this rank received for the loss, "peak": its peak RSS growth}}."""
    from memory import peak_rss, reset_peak_rss

    import importlib

    from ssl_dist import loss

    # the modules, not the functions of the same names that ssl_dist.loss exports
    gather_module, sigmoid = (importlib.import_module(f"ssl_dist.loss.{m}") for m in ("gather", "sigmoid"))

    received = [0]
    real_gather, real_shift = gather_module.gather, sigmoid._shift_right

    def counted_gather(x, group=None):  # the real gather; its output and its gradient are counted
        out = real_gather(x, group)
        received[0] += out.numel() * out.element_size()
        if out.requires_grad:
            out.register_hook(lambda g: received.__setitem__(0, received[0] + g.numel() * g.element_size()))
        return out

    def counted_shift(t, group, tag=0):
        received[0] += t.numel() * t.element_size()
        return real_shift(t, group, tag)

    gather_module.gather, sigmoid._shift_right = counted_gather, counted_shift
    n, d, chunk = LOSS["batch_size"], LOSS["embed_dim"], LOSS["chunk_size"]
    torch.manual_seed(rank)
    a, b = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    valid, scale = torch.ones(n, dtype=torch.bool), torch.tensor([2.0], requires_grad=True)
    runs = {"simclr": lambda: loss.nt_xent(a, b, 0.2, chunk_size=chunk, valid=valid),
            "clip": lambda: loss.clip_loss(a, b, scale, chunk_size=chunk, valid=valid),
            "siglip": lambda: loss.siglip_loss(a, b, scale, torch.tensor([-1.0], requires_grad=True),
                                               chunk_size=chunk)}
    found = {}
    for method, run in runs.items():
        for _ in range(2):  # the first call warms the allocator up
            received[0] = 0
            base = reset_peak_rss()
            out = run()
            peak = peak_rss() - base
            out.backward()
            del out
        found[method] = {"received": received[0], "peak": peak}
    return found


def engine_on_rank(rank: int, workers: int, stage: int, out: str) -> dict:
    """Bytes of DeepSpeed's collectives in one step (after a first one) and bytes this rank saves."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    from ssl_dist import config
    from ssl_dist.engine import build_optimizer, deepspeed_config
    from ssl_dist.model import build_model

    cfg = config.load(CONFIG, [f"train.zero_stage={stage}", "data.batch_size=8"])
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    ds = {**deepspeed_config(cfg, workers), "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, partitioned=True),
                                      config=ds)
    images = torch.randn(8, 3, 32, 32)
    for step in range(2):
        if step == 1:
            ds_comm.comms_logger.comms_dict.clear()
        loss = engine(images).pow(2).mean()
        engine.backward(loss)
        engine.step()
    # the logger records an all-gather's input and a reduce-scatter's input: as buffers, the
    # former is W times that (its output), the latter as logged
    step_bytes = {}
    for op, sizes in ds_comm.comms_logger.comms_dict.items():
        per_call = workers if op.startswith("all_gather") else 1
        step_bytes[op] = sum(size * per_call * record[0] for size, record in sizes.items())
    folder = Path(out, f"ckpt-zero{stage}-w{workers}")
    engine.save_checkpoint(str(folder), tag="t")
    torch.distributed.barrier()
    # DeepSpeed's names: zero_pp_rank_R_mp_rank_00_{optim,model}_states.pt of rank R, and at
    # ZeRO-1/2 rank 0's mp_rank_00_model_states.pt (the whole weights)
    mine = [f for f in (folder / "t").iterdir()
            if f.name.startswith(f"zero_pp_rank_{rank}_") or (rank == 0 and f.name == "mp_rank_00_model_states.pt")]
    saved = sum(f.stat().st_size for f in mine)
    return {"step_bytes": step_bytes, "saved": saved, "params": params}


def spawn(workers: int, what: str, out: str) -> list[dict]:
    from services import free_port

    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(workers, free_port(), what, out), nprocs=workers, join=True)
    return [json.loads(Path(out, f"{what}-rank{r}.json").read_text()) for r in range(workers)]


def loss_table(worker_counts: list[int]) -> list[str]:
    n, d, chunk = LOSS["batch_size"], LOSS["embed_dim"], LOSS["chunk_size"]
    rows = [f"The loss, n = {n} samples a rank, D = {d}, chunk {chunk}: MB received per step and peak MB, rank 0",
            "", "| method | W | received (model / measured) | peak memory (model / measured) |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="scaling-loss-") as tmp:
        measured = {workers: spawn(workers, "loss", tmp)[0] for workers in worker_counts}
    for method in ("simclr", "clip", "siglip"):
        w = scaling.Workload(method=method, params=1, embed_dim=d, batch_size=n, chunk_size=chunk)
        for workers in worker_counts:
            got, sent = measured[workers][method], scaling.gathered_bytes(w, workers)
            model_received = sent["forward"] + sent["backward"]
            if workers == 1:  # the gather of one rank returns its input: nothing is received
                got = {**got, "received": 0}
            rows.append(f"| {method} | {workers} | {model_received / 1e6:.2f} / {got['received'] / 1e6:.2f} | "
                        f"{scaling.loss_memory_bytes(w, workers) / 1e6:.1f} / {got['peak'] / 1e6:.1f} |")
    return rows


def engine_table(worker_counts: list[int]) -> list[str]:
    rows = ["DeepSpeed, the CPU ResNet of cifar10.yaml (fp32, AdamW): MB of collectives per step and MB saved, "
            "rank 0", "", "| ZeRO | W | collectives (model / DeepSpeed's log) | saved by rank 0 (model / files) |",
            "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="scaling-engine-") as tmp:
        for stage in (2, 3):
            for workers in [w for w in worker_counts if w > 1]:
                got = spawn(workers, f"zero{stage}", tmp)[0]
                w = scaling.Workload(method="simclr", params=got["params"], embed_dim=128, batch_size=8,
                                     zero_stage=stage)
                model = sum(scaling.reduced_bytes(w, workers).values())
                logged = sum(got["step_bytes"].values())
                ops = ", ".join(f"{op} {b / 1e6:.1f}" for op, b in sorted(got["step_bytes"].items()))
                rows.append(f"| {stage} | {workers} | {model / 1e6:.1f} / {logged / 1e6:.1f} ({ops}) | "
                            f"{scaling.checkpoint_bytes(w, workers)['per_rank_max'] / 1e6:.1f} / "
                            f"{got['saved'] / 1e6:.1f} |")
    return rows



# ---- restart: a worker killed after the first registered checkpoint, at W workers ----------------

RESTART = dict(batch_size=16, checkpoint_every=5, steps=16, per_class=40)


def pretrain_recorded(workers: int, name: str, address: str, recording: Path, endpoint: str, *extra: str,
                      kill: bool = False, resume: bool = False) -> dict:
    """One `ssl-dist pretrain` of cifar10.yaml's CPU ResNet on `workers` Ray workers (ZeRO-2,
    checkpoints into moto's S3); with `kill`, one worker SIGKILLed once Ray Train has
    registered the first checkpoint. Returns the attempt records, the metrics of every
    attempt, the kill's (or the start's) time, and the bytes GET from checkpoint folders, as
    moto's recorder saw them."""
    import signal

    import boto3
    import requests
    from runs import finish, start, train_workers, wait_for_registered

    from ssl_dist import metrics, storage

    url = f"s3://bench/runs/{name}"
    requests.post(f"{endpoint}/moto-api/recorder/reset-recording").raise_for_status()
    requests.post(f"{endpoint}/moto-api/recorder/start-recording").raise_for_status()
    t0 = time.time()
    driver = start(["pretrain", *(["--resume"] if resume else []), "--config", str(CONFIG), f"run.name={name}",
                    "data.train_url=s3://bench/train",
                    "run.storage_path=s3://bench/runs", f"run.num_workers={workers}", "run.cpus_per_worker=1",
                    f"data.batch_size={RESTART['batch_size']}", "train.log_every=1",
                    f"train.checkpoint_every={RESTART['checkpoint_every']}", f"train.max_steps={RESTART['steps']}",
                    "run.max_failures=1", "run.keep_checkpoints=100", *extra], address)
    if kill:
        wait_for_registered(url, driver)
        victim = max(train_workers(address), key=lambda p: p.create_time())
        t0 = time.time()
        os.kill(victim.pid, signal.SIGKILL)
    finish(driver)
    requests.post(f"{endpoint}/moto-api/recorder/stop-recording").raise_for_status()

    sizes = {o["Key"]: o["Size"] for page in boto3.client("s3", endpoint_url=endpoint).get_paginator(
        "list_objects_v2").paginate(Bucket="bench", Prefix=f"runs/{name}/") for o in page.get("Contents", [])}
    got = 0
    for entry in recorded_requests(recording):
        key = entry["url"].split("?", 1)[0].split("/bench/", 1)[-1]
        if entry["method"] != "GET" or "/checkpoint-" not in key:
            continue
        rng = entry["headers"].get("Range")
        if rng:
            lo, hi = rng.removeprefix("bytes=").split("-")
            got += min(int(hi), sizes.get(key, int(hi)) - 1) - int(lo) + 1
        else:  # a whole object (a key moved aside since has no size left here: counted as 0)
            got += sizes.get(key, 0)
    fs, path = storage.filesystem(f"{url}/attempts")
    fs.invalidate_cache()
    records = [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(path, detail=False))]
    return {"records": records, "history": metrics.read_history(url), "t0": t0, "gets_bytes": got}


def restart_phases(m: dict) -> dict:
    """The measured restart split as the model splits it (seconds), the steps redone, and the
    median step."""
    import statistics

    tl, restore = m["records"][-1]["timeline"], m["records"][-1]["restore"]
    first, second = m["history"][-2], m["history"][-1]
    step_s = statistics.median(float(b["time"]) - float(a["time"]) for a, b in zip(second, second[1:]))
    reached = int(first[-1]["step"])  # the last step the killed attempt logged
    resumed_from = int(second[0]["step"]) - 1
    # back where it was: the redone step that reaches the killed attempt's last one (none to
    # redo: the first batch is ready)
    back = next((float(r["time"]) for r in second if int(r["step"]) == reached), tl["first_step"] - step_s)
    return {"start": tl["start"] - m["t0"], "choose": tl["decided"] - tl["start"],
            "engine": tl["engine"] - tl["decided"], "restore": tl["restored"] - tl["engine"],
            "download": restore.get("download_s", 0.0),
            "seek": max(0.0, tl["first_step"] - tl["restored"] - step_s), "first_step": step_s,
            "redo_steps": reached - resumed_from, "step_s": step_s, "back": back - m["t0"]}


def restart_table(worker_counts: list[int]) -> list[str]:
    """Restart at each W, measured next to the model. The model's fixed terms (Ray's restart
    of the group, DeepSpeed's initialise, the stream's first window) and its read rate are
    taken from the first W's run; the other Ws are predictions."""
    import boto3
    from cifar import cifar_slice
    from services import start_moto, start_ray_head, stop_ray_node

    from ssl_dist.shards import make_shards

    with tempfile.TemporaryDirectory(prefix="scaling-restart-") as tmp:
        recording = Path(tmp) / "recording.jsonl"
        proc, endpoint = start_moto({"MOTO_RECORDER_FILEPATH": str(recording)})
        os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "RAY_AUTH_MODE": "disabled"})
        ray_temp = Path(tmp) / "ray"
        address = start_ray_head(ray_temp, num_cpus=max(worker_counts) + 1)
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            make_shards(str(cifar_slice(Path(tmp) / "src", per_class=RESTART["per_class"], split="train")),
                        "s3://bench/train", samples_per_shard=100, workers=2)
            measured = {workers: pretrain_recorded(workers, f"restart-w{workers}", address, recording, endpoint,
                                                   kill=True) for workers in worker_counts}
            # the 2-worker run's final checkpoint resumed by 1 worker: resharded (universal conversion)
            writer = 2 if 2 in worker_counts else worker_counts[-1]
            resharded = pretrain_recorded(1, f"restart-w{writer}", address, recording, endpoint,
                                          f"train.max_steps={RESTART['steps'] + 2}", resume=True)
        finally:
            stop_ray_node(str(ray_temp))
            proc.terminate()
    from ssl_dist import config
    from ssl_dist.model import build_model

    cfg = config.load(CONFIG, [])
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    work = scaling.Workload(method="simclr", params=params, embed_dim=cfg.model.proj_dim,
                            batch_size=RESTART["batch_size"], zero_stage=2)
    base = restart_phases(measured[worker_counts[0]])
    base_reads = scaling.restore_read_bytes(work, worker_counts[0])
    # one rank's restore rate, from the first run: what it hashed and restored (download and
    # DeepSpeed's load) in the time those took
    rate = (base_reads["choose"] + base_reads["per_rank"]) / 1e6 / (base["choose"] + base["restore"])
    rows = [f"Restart after a SIGKILLed worker, cifar10.yaml's CPU ResNet ({params / 1e6:.1f}M parameters, ZeRO-2, "
            f"AdamW), batch {RESTART['batch_size']} a rank, checkpoint every {RESTART['checkpoint_every']} steps "
            f"into moto's S3; W workers on 2 cores. Model: fixed terms and a read rate of {rate:.0f} MB/s from "
            f"W = {worker_counts[0]}", "",
            "| W | MB GET from checkpoints (model / moto) | Ray restart s | choose s | DeepSpeed init s | "
            "restore s | seek + first step s | steps redone | back where it was, s (model / measured) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for workers, m in measured.items():
        got = restart_phases(m)
        reads = scaling.restore_read_bytes(work, workers)
        model = scaling.restart_seconds(work, workers, detect_s=0.0, start_s=base["start"], engine_s=base["engine"],
                                        seek_s=base["seek"], rank_mb_per_s=rate, store_mb_per_s=float("inf"),
                                        step_s=got["step_s"], lost_steps=got["redo_steps"])
        rows.append(f"| {workers} | {reads['total'] / 1e6:.1f} / {m['gets_bytes'] / 1e6:.1f} | {got['start']:.1f} | "
                    f"{got['choose']:.1f} | {got['engine']:.1f} | {got['restore']:.1f} | "
                    f"{got['seek'] + got['first_step']:.1f} | {got['redo_steps']} | "
                    f"{model['total']:.1f} / {got['back']:.1f} |")
    tl, restore = resharded["records"][-1]["timeline"], resharded["records"][-1]["restore"]
    reads = scaling.restore_read_bytes(work, writer, resharded_nodes=1, job_start=True)
    rows += ["", f"The {writer}-worker run's final checkpoint resumed on 1 worker (`--resume`, resharded), "
                 f"seconds from the job's start:", "",
             "| MB GET from checkpoints (model / moto) | to the worker loop | choose | DeepSpeed init | download | "
             "universal conversion | DeepSpeed load | first step |", "|---|---|---|---|---|---|---|---|",
             f"| {reads['total'] / 1e6:.1f} / {resharded['gets_bytes'] / 1e6:.1f} | "
             f"{tl['start'] - resharded['t0']:.1f} | "
             f"{tl['decided'] - tl['start']:.1f} | {tl['engine'] - tl['decided']:.1f} | "
             f"{restore.get('download_s', 0):.1f} | {restore.get('convert_s', 0):.1f} | "
             f"{restore.get('load_s', 0):.1f} | "
             f"{tl['first_step'] - tl['restored']:.1f} |"]
    return rows

# ---- 1,024 GPUs ------------------------------------------------------------------------------

# The two workloads of docs/scaling.md. Rates per GPU are assumptions (stated in the table),
# not measurements: no 1,024-GPU run was made. Links are one 400 Gb/s NIC per GPU.
AT_SCALE = {
    # the images of the same 400M pairs (img2dataset at 256 px: about 40 KB a sample)
    "SimCLR ViT-B/16, 400M images": (scaling.Workload(
        method="simclr", params=87_800_000, embed_dim=128, batch_size=64, zero_stage=2, precision_bytes=2,
        loader_workers=8, shard_samples=10_000, sample_bytes=40_000, total_samples=400_000_000), 1_000),
    "CLIP ViT-B/32, 400M pairs": (scaling.Workload(
        method="clip", params=151_300_000, embed_dim=512, batch_size=64, zero_stage=2, precision_bytes=2,
        loader_workers=8, shard_samples=10_000, sample_bytes=40_000, total_samples=400_000_000), 3_000),
}
NIC_GB_PER_S = 50.0  # 400 Gb/s
S3_GET_LIMIT = 5_500  # GET/s per prefix
RANK_MB_PER_S, STORE_MB_PER_S, LOCAL_WRITE_MB_PER_S = 1_000, 100_000, 2_000  # a rank to S3, S3 in all, NVMe
GPUS_PER_NODE = 8
# Restart after a lost node at that size, assumed (not measured here): Ray's health check of a
# silent node (5 missed checks 3 s apart, each up to 10 s: 15 to 65 s), a new node from the
# autoscaler when the run waits for a full group, Ray Train starting 1,024 workers and their
# process group, DeepSpeed's initialise, the stream's first window.
DETECT_S, NEW_NODE_S, START_S, ENGINE_S, SEEK_S = 30.0, 300.0, 60.0, 30.0, 5.0
# The universal conversion (ds_to_universal, one process a node), MB of checkpoint a second:
# measured by this script's restart part on this machine (the reshard row), assumed the same
# per byte at scale (2026-12-02: the 48 MB checkpoint of the CPU ResNet in 0.4 s)
CONVERT_MB_PER_S = 120.0
# Meta's Llama 3 run: 419 unexpected interruptions in 54 days on 16,384 GPUs
GPU_MTBF_S = 54 * 86_400 * 16_384 / 419


def at_scale_table(workers: int = 1024) -> list[str]:
    rows = [f"W = {workers} GPUs, global batch {64 * workers}, bf16, ZeRO-2, 8 loader workers a GPU, "
            f"{NIC_GB_PER_S:.0f} GB/s a GPU; samples/s per GPU assumed as given", "",
            "| | " + " | ".join(AT_SCALE) + " |", "|---|" + "---|" * len(AT_SCALE)]
    cells: dict[str, list[str]] = {}

    def add(name: str, value: str) -> None:
        cells.setdefault(name, []).append(value)

    for w, per_gpu in AT_SCALE.values():
        rate = per_gpu * workers
        step_s = w.batch_size / per_gpu
        gathered = sum(scaling.gathered_bytes(w, workers).values())
        reduced = sum(scaling.reduced_bytes(w, workers).values())
        s3 = scaling.s3_rates(w, workers, rate)
        window = scaling.shuffle_window_for(w, workers, rate, S3_GET_LIMIT)
        fixed = scaling.s3_rates(dataclasses.replace(w, shuffle_window=window), workers, rate)
        index = scaling.dataset_index_bytes(w)
        ckpt = scaling.checkpoint_bytes(w, workers)
        add("samples/s per GPU (assumed); step", f"{per_gpu:,}; {1e3 * step_s:.0f} ms")
        add("loss memory per rank (chunk: none)", f"{scaling.loss_memory_bytes(w, workers) / 1e6:,.0f} MB")
        add("loss: gathered + its gradient per step per rank",
            f"{gathered / 1e6:,.0f} MB = {1e3 * gathered / (NIC_GB_PER_S * 1e9):.1f} ms of link")
        add("gradients + parameters per step per rank (ZeRO-2 buffers)",
            f"{reduced / 1e6:,.0f} MB = {1e3 * reduced / (NIC_GB_PER_S * 1e9):.1f} ms of link")
        add("S3 at data.shuffle_window=4096, one prefix", f"{s3['get_per_s']:,.0f} GET/s, {s3['mb_per_s']:,.0f} MB/s")
        add(f"S3: shuffle_window for <= {S3_GET_LIMIT:,} GET/s a prefix",
            f"{window:,} ({window // (w.batch_size * workers)} global batches): {fixed['get_per_s']:,.0f} GET/s")
        add("manifest; one sidecar; manifest read at start (once a rank, as measured above)",
            f"{index['manifest'] / 1e6:.1f} MB; {index['sidecar'] / 1e3:.0f} KB; "
            f"{workers:,} GETs, {index['manifest'] * workers / 1e9:.1f} GB")
        add("checkpoint: total; rank 0 writes", f"{ckpt['total'] / 1e9:.2f} GB; {ckpt['per_rank_max'] / 1e9:.2f} GB")
        add("checkpoint upload (1 GB/s a rank, 100 GB/s the store)",
            f"{scaling.checkpoint_seconds(w, workers, RANK_MB_PER_S, STORE_MB_PER_S):.1f} s")
        held = ckpt["per_rank_max"] / (LOCAL_WRITE_MB_PER_S * 1e6)  # the loop waits for the local write
        upload_steps = scaling.checkpoint_seconds(w, workers, RANK_MB_PER_S, STORE_MB_PER_S) / step_s
        add("checkpoint_every = 50 (the default): loop held per checkpoint, share of the time",
            f"{held:.2f} s every {50 * step_s:.1f} s: {100 * held / (held + 50 * step_s):.0f}%")
        mtbf = GPU_MTBF_S / workers
        every = scaling.checkpoint_interval_for(held, step_s, mtbf)
        add(f"checkpoint_every for a job MTBF of {mtbf / 3600:.0f} h (Young): steps; share lost",
            f"{every:,} ({every * step_s / 60:.0f} min); "
            f"{100 * (held / (held + every * step_s) + every * step_s / 2 / mtbf):.2f}%")
        lost = scaling.steps_lost(every, upload_steps)
        wait = scaling.restart_seconds(w, workers, detect_s=DETECT_S, start_s=NEW_NODE_S + START_S,
                                       engine_s=ENGINE_S, seek_s=SEEK_S, rank_mb_per_s=RANK_MB_PER_S,
                                       store_mb_per_s=STORE_MB_PER_S, step_s=step_s, lost_steps=lost)
        add("restart after a lost node, waiting for a new node (detect, new node + start, choose, "
            "initialise, download, seek, redo)", f"{wait['total']:.0f} s (" + ", ".join(
                f"{wait[k]:.0f}" for k in ("detect", "start", "choose", "engine", "download", "seek", "redo")) + ")")
        if CONVERT_MB_PER_S:
            nodes = workers // GPUS_PER_NODE - 1
            elastic = scaling.restart_seconds(
                w, workers - GPUS_PER_NODE, detect_s=DETECT_S, start_s=START_S, engine_s=ENGINE_S, seek_s=SEEK_S,
                rank_mb_per_s=RANK_MB_PER_S, store_mb_per_s=STORE_MB_PER_S, step_s=step_s, lost_steps=lost,
                convert_s=ckpt["total"] / (CONVERT_MB_PER_S * 1e6), resharded_nodes=nodes)
            add(f"elastic restart on {workers - GPUS_PER_NODE:,} GPUs (run.min_workers; resharded: {nodes} nodes "
                f"read the whole checkpoint and convert it at {CONVERT_MB_PER_S:.0f} MB/s)",
                f"{elastic['total']:.0f} s (download {elastic['download']:.0f}, convert {elastic['convert']:.0f})")
    for name, values in cells.items():
        rows.append(f"| {name} | " + " | ".join(values) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="W of the measured runs")
    parser.add_argument("--only", default="reads,loss,engine,restart,scale", help="which parts")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    started = time.monotonic()
    for part in args.only.split(","):
        table = {"reads": reads_table, "loss": loss_table, "engine": engine_table, "restart": restart_table,
                 "scale": lambda _: at_scale_table()}[part](worker_counts)
        print("\n".join(["", *table]), flush=True)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
