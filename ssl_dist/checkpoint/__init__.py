"""Checkpoints: DeepSpeed shards + every rank's stream state + step + RNG + resolved config.

Layout of one checkpoint folder (the merge of every rank's local folder, done by Ray Train
when it persists the checkpoint into `storage_path/<run>/checkpoint-<step>`):

    deepspeed/             engine.save_checkpoint(..., tag="deepspeed"): model and ZeRO shards
    latest, zero_to_*.py   written by DeepSpeed on rank 0
    stream-rank00000.json  one per rank: Loader.state_dict()
    rng-rank00000.pt       one per rank: torch / numpy / python RNG states
    meta.json              rank 0: step, samples seen, world size, global batch, ZeRO stage, resolved
                           config, the driver's attempt id
    parts/rank00000.json   one per rank, written last: every file that rank wrote, its size and sha256

A checkpoint is *complete* when meta.json is there, the part list of each of its
`world_size` ranks is there, every name a part lists lies inside the folder, and every file
is in storage with the listed size and sha256. A missing rank (its upload never finished),
a truncated file or a flipped bit makes it incomplete;
`find_resume` then falls back to the newest complete checkpoint before it, and says so.
It restores on another number of workers (universal checkpoint; see restore.py).

    layout.py   names, CheckpointInfo, completeness (inspect), listing, moving aside, deleting
    resume.py   where a (re)started run continues, and the batch decision (decide_batch)
    save.py     what each rank saves, and when (Checkpointer)
    restore.py  loading into an engine and loader, resharding on another world size
    safe_load.py  every load of DeepSpeed's files without unpickling (weights_only + an allow-list)
    weights.py  the fp32 weights of a checkpoint, for evaluation and export

`checkpoint.save` and `checkpoint.restore` are the functions (as before the split); their
modules are reached with `from ssl_dist.checkpoint.save import ...`.

Importing this package starts nothing: Ray and DeepSpeed are imported inside the functions
that use them.
"""

from ssl_dist.checkpoint.layout import (FORMAT, META, NAME_RE, PARTS, RUN_ARTEFACTS, SET_ASIDE, TAG,
                                        CheckpointError, CheckpointInfo, Cleared, IncompleteCheckpoint, TrainState,
                                        checkpoint_name, clear_run, inspect, is_checkpoint_dir, list_checkpoints,
                                        move_run_aside, name_key, newest_complete, part_file, rng_file, run_entries,
                                        set_aside, stream_file)
from ssl_dist.checkpoint.restore import load_universal, restore, set_rng_state, to_universal
from ssl_dist.checkpoint.resume import (BatchPlan, Resume, agree_on_resume, check_compatible, decide_batch,
                                        find_resume, worker_batch)
from ssl_dist.checkpoint.save import (LOCAL_PREFIX, Checkpointer, remove_orphaned_local_folders, rng_state, save,
                                      save_and_report)
from ssl_dist.checkpoint.weights import fp32_state_dict
# Until train.py uses them from their own modules: decisions shared by ranks, run-folder records.
from ssl_dist.collective import rank0_says
from ssl_dist.records import AttemptLog, KeyLog, read_keys

__all__ = [
    "FORMAT", "META", "NAME_RE", "PARTS", "TAG", "LOCAL_PREFIX",
    "CheckpointError", "IncompleteCheckpoint", "CheckpointInfo", "TrainState",
    "checkpoint_name", "clear_run", "inspect", "is_checkpoint_dir", "list_checkpoints", "name_key",
    "newest_complete", "part_file", "rng_file", "stream_file",
    "RUN_ARTEFACTS", "SET_ASIDE", "Cleared", "move_run_aside", "run_entries", "set_aside",
    "BatchPlan", "Resume", "agree_on_resume", "check_compatible", "decide_batch", "find_resume", "worker_batch",
    "Checkpointer", "remove_orphaned_local_folders", "rng_state", "save", "save_and_report",
    "load_universal", "restore", "set_rng_state", "to_universal",
    "fp32_state_dict",
    "rank0_says", "AttemptLog", "KeyLog", "read_keys",
]
