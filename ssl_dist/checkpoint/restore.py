"""Loading a checkpoint into a running engine and loader, on any number of workers.

Restoring on the world size that wrote the checkpoint downloads only what a rank needs
(its own ZeRO shard, not everyone's). On another world size, one rank per node downloads
the whole checkpoint and converts it with DeepSpeed's universal checkpoint
(`ds_to_universal`), which every rank of that node then loads (`load_universal`): that is
the resharding. The stream state is resharded by `Loader.load_state_dict`.

Every file is loaded without unpickling objects (`safe_load.weights_only`), and only the
files of the checkpoint's part lists are downloaded: each name checked to stay inside the
folder, each file checked against its rank's sha256 once downloaded (inspect checked them
in storage when the checkpoint was chosen; this catches a change since).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from ssl_dist import collective, storage
from ssl_dist.checkpoint import safe_load
from ssl_dist.checkpoint.layout import (META, TAG, CheckpointError, CheckpointInfo, TrainState, check_name,
                                        file_sha256, rng_file, stream_file)


def restore(info: CheckpointInfo, *, engine, loader, rank: int, world_size: int, local_rank: int = 0,
            options: dict | None = None, group=None) -> tuple[TrainState, dict]:
    """Load a complete checkpoint (`inspect`ed) into this rank's engine and loader. Every rank
    calls it (it is collective); a file that holds more than weights, or that changed since
    it was inspected, is a CheckpointError on every rank. Returns (state, timings in
    seconds: download, convert, load)."""
    fs, path = storage.filesystem(info.url, options)
    reshard = info.world_size != world_size and engine.zero_optimization_stage() > 0
    token = collective.broadcast(uuid.uuid4().hex if rank == 0 else None, group)
    with tempfile.TemporaryDirectory(prefix="ssl-dist-restore-") as own, safe_load.weights_only(info.url):
        # Small files every rank reads: the stream state of every old rank, its own RNG state.
        small = [META, *[stream_file(r) for r in range(info.world_size)]]
        if rank < info.world_size and rng_file(rank) in info.parts[rank]:
            small.append(rng_file(rank))
        if reshard:
            timings = _load_resharded(info, engine, fs, path, small, own, token=token, world_size=world_size,
                                      local_rank=local_rank, group=group)
        else:
            timings = _load_own_shard(info, engine, fs, path, small, own, rank=rank, group=group)
        own = Path(own)
        meta = json.loads((own / META).read_text())
        loader.load_state_dict([json.loads((own / stream_file(r)).read_text()) for r in range(info.world_size)])
        if (own / rng_file(rank)).exists():
            set_rng_state(torch.load(own / rng_file(rank), weights_only=True))
    return TrainState(step=meta["step"], samples_seen=meta["samples_seen"]), timings


def _load_own_shard(info: CheckpointInfo, engine, fs, path: str, small: list[str], own: str, *, rank: int,
                    group) -> dict:
    """Same world size: this rank downloads its own ZeRO shard (and the small files) and loads.
    A refusal on any rank stops every rank (none is left waiting in a later collective)."""
    timings = {"download_s": 0.0, "convert_s": 0.0, "load_s": 0.0}
    failure = None
    try:
        started = time.monotonic()
        download(fs, path, small + _deepspeed_files_for(info, rank), own, digests=info.sha256)
        timings["download_s"] = time.monotonic() - started
        started = time.monotonic()
        with safe_load.weights_only(info.url):
            load_path, _ = engine.load_checkpoint(own, tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {info.url}/{TAG}")
        timings["load_s"] = time.monotonic() - started
    except CheckpointError as err:
        failure = err
    if not collective.all_ok(failure is None, group):
        raise failure or CheckpointError(f"restoring {info.url} failed on another rank (its log says why)")
    return timings


def _load_resharded(info: CheckpointInfo, engine, fs, path: str, small: list[str], own: str, *, token: str,
                    world_size: int, local_rank: int, group) -> dict:
    """Another world size: one rank per node downloads everything and converts it into a
    universal checkpoint in a folder the node's ranks share (named by rank 0's `token`);
    then every rank loads its share. A failure on any rank stops every rank."""
    timings = {"download_s": 0.0, "convert_s": 0.0, "load_s": 0.0}
    started = time.monotonic()
    shared = Path(tempfile.gettempdir()) / f"ssl-dist-universal-{token}"
    failure = None
    try:
        download(fs, path, small, own, digests=info.sha256)
        if local_rank == 0:
            everything = sorted({f for part in info.parts for f in part if f.startswith(TAG + "/")})
            download(fs, path, everything, str(shared / "raw"), digests=info.sha256)
            timings["download_s"] = time.monotonic() - started
            started = time.monotonic()
            to_universal(shared / "raw" / TAG, shared / "universal" / TAG, url=info.url)
            timings["convert_s"] = time.monotonic() - started
    except Exception as err:  # noqa: BLE001 (every rank must learn of it, or the others wait forever)
        failure = err
    finally:
        if local_rank == 0:
            shutil.rmtree(shared / "raw", ignore_errors=True)
    if not collective.all_ok(failure is None, group):
        if local_rank == 0:
            shutil.rmtree(shared, ignore_errors=True)
        if isinstance(failure, CheckpointError):  # refused (unpickling, a digest): its own message
            raise failure
        if failure is not None:
            raise CheckpointError(f"converting {info.url} (written by {info.world_size} workers) for "
                                  f"{world_size} workers failed: {failure}") from failure
        raise CheckpointError(f"converting {info.url} for {world_size} workers failed on another node")
    started = time.monotonic()
    try:
        load_universal(engine, shared / "universal", url=info.url)
    finally:
        dist.barrier(group=group)  # the node's ranks have all read the shared folder
        if local_rank == 0:
            shutil.rmtree(shared, ignore_errors=True)
    timings["load_s"] = time.monotonic() - started
    return timings


def _deepspeed_files_for(info: CheckpointInfo, rank: int) -> list[str]:
    """The DeepSpeed files rank `rank` reads when the world size is unchanged: its own ZeRO
    shards and the shared model states (not the other ranks' optimizer shards)."""
    mine = re.compile(rf"(?:^|_)zero_pp_rank_{rank}_")
    anyone = re.compile(r"(?:^|_)zero_pp_rank_\d+_")
    files = set()
    for part in info.parts:
        for rel in part:
            if not rel.startswith(TAG + "/"):
                continue
            base = rel.rsplit("/", 1)[-1]
            if mine.search(base) or not anyone.search(base):
                files.add(rel)
    return sorted(files)


def download(fs, path: str, files: list[str], local: str, digests: dict[str, str] | None = None) -> None:
    """Fetch `files` (relative to the checkpoint folder `path`) into the local folder `local`;
    CheckpointError for a name that would land outside `local`, or a file whose bytes do not
    hash to its entry of `digests` (nothing of a refused name is written)."""
    root = Path(local)
    for rel in files:
        check_name(path, rel, "its part list")
    for rel in files:
        Path(root, rel).parent.mkdir(parents=True, exist_ok=True)
    with storage.translate_errors(path):
        fs.get([f"{path}/{rel}" for rel in files], [str(Path(root, rel)) for rel in files])
    disk = fsspec.filesystem("file")
    for rel in files:
        expected = (digests or {}).get(rel)
        if expected is not None and file_sha256(disk, str(Path(root, rel))) != expected:
            raise CheckpointError(f"{path}/{rel} does not match the sha256 its rank wrote (it changed after the "
                                  f"checkpoint was checked): restore again, or from an earlier checkpoint")


def to_universal(source: str | Path, target: str | Path, *, url: str | None = None) -> None:
    """Convert a DeepSpeed ZeRO checkpoint tag folder into a universal checkpoint folder.

    `--inject_missing_state`: DeepSpeed only writes the universal-checkpoint info for models
    that declare it (Megatron); a plain torch module needs it added. One process, no pool:
    this runs inside a Ray worker. Its files are read with weights only; a refusal names
    `url` (the checkpoint's, default `source`).
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), safe_load.weights_only(url or str(source)):
        ds_to_universal(args)  # (its progress bars and prints per parameter go nowhere)


def load_universal(engine, directory: str | Path, *, url: str | None = None) -> None:
    """Load the universal checkpoint `directory/<TAG>` into `engine`, whatever its world size.

    `load_universal` is a DeepSpeed config flag that only its load path reads, so it is
    switched on around this one load (the engine was built before we knew). DeepSpeed
    restores parameters and optimizer state from the universal files but not the module's
    buffers (BatchNorm statistics): those come from rank 0's model states. Every file is
    read with weights only; a refusal names `url` (the checkpoint's, default `directory`).
    """
    directory = Path(directory)
    config = engine._config  # noqa: SLF001 (DeepSpeed has no public setter for this flag)
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with safe_load.weights_only(url or str(directory)):
            load_path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no universal checkpoint in {directory}")
            states = sorted((directory / TAG).glob("*mp_rank_00_model_states.pt"))
            rank0 = [p for p in states
                     if p.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
            module_state = torch.load((rank0 or states)[0], map_location="cpu", weights_only=True)["module"]
    finally:
        config.load_universal_checkpoint = previous
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in module_state:
                buffer.copy_(module_state[name])
    _load_frozen_parameters(engine, directory / TAG, module_state)


@torch.no_grad()
def _load_frozen_parameters(engine, folder: Path, module_state: dict) -> None:
    """The module's frozen parameters (a method's momentum encoder), which DeepSpeed's universal
    checkpoint leaves out (it holds the optimizer's parameters only): whole in rank 0's model
    states under ZeRO 0-2; under ZeRO-3 one partition per old rank in each one's model states
    (`frozen_param_fragments`), joined here and cut again into this rank's partition."""
    frozen = {name: p for name, p in engine.module.named_parameters() if not p.requires_grad}
    if not frozen:
        return
    shards = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                    key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    fragments = [torch.load(f, map_location="cpu", weights_only=True).get("frozen_param_fragments") or {}
                 for f in shards]
    for name, param in frozen.items():
        if not hasattr(param, "ds_tensor"):  # ZeRO 0-2: whole on every rank
            param.data.copy_(module_state[name])
            continue
        whole = torch.cat([f[name].flatten() for f in fragments])[: param.ds_numel]
        size = param.ds_tensor.numel()
        start = dist.get_rank(param.ds_process_group) * size
        part = torch.zeros(size, dtype=whole.dtype)
        part[: max(0, min(size, whole.numel() - start))] = whole[start : start + size]
        param.ds_tensor.copy_(part)
        if param.data.numel():  # kept whole on every rank too (a small, persistent one)
            param.data.copy_(whole.view(param.ds_shape))


def set_rng_state(state: dict) -> None:
    """Put back the RNG states that `save.rng_state` recorded (tensors and ints only)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
