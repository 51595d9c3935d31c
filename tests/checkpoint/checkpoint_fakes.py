"""Fake checkpoint folders for the checkpoint tests: the real layout, tiny files (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

from ssl_dist import checkpoint


def fake_checkpoint(root: Path, step: int, world: int = 2, *, suffix: str = "", config: dict | None = None) -> str:
    """A checkpoint folder with the real layout (tiny files) as `save` writes it."""
    folder = root / (checkpoint.checkpoint_name(step) + suffix)
    for rank in range(world):
        files = {f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": b"o" * (10 + rank),
                 checkpoint.stream_file(rank): b"{}"}
        if rank == 0:
            meta = {"format": checkpoint.FORMAT, "step": step, "samples_seen": 32 * step, "world_size": world,
                    "global_batch": 32, "target_global_batch": 32, "zero_stage": 1, "config": config or {}}
            files["deepspeed/mp_rank_00_model_states.pt"] = b"m" * 20
            files[checkpoint.META] = json.dumps(meta).encode()
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        part = {"rank": rank, "step": step, "files": {rel: len(data) for rel, data in files.items()}}
        (folder / checkpoint.part_file(rank)).parent.mkdir(exist_ok=True)
        (folder / checkpoint.part_file(rank)).write_text(json.dumps(part))
    return str(folder)
