"""The fp32 weights of a checkpoint's engine module, for evaluation and export.

Any process, no Ray and no engine: the checkpoint is checked first (complete, every file's
digest matching: `inspect`), then the files it needs are downloaded to a temp dir (each
checked again against its digest) and the weights are read from rank 0's model file, or
consolidated from the ZeRO shards with DeepSpeed's own `zero_to_fp32`, whatever the number
of workers that wrote them. Both read with weights only (`safe_load`): nothing is unpickled,
whatever meta.json says about the checkpoint.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from ssl_dist import config as config_lib
from ssl_dist import storage
from ssl_dist.checkpoint import safe_load
from ssl_dist.checkpoint.layout import META, TAG, CheckpointError, CheckpointInfo, inspect
from ssl_dist.checkpoint.restore import download

MODEL = f"{TAG}/mp_rank_00_model_states.pt"  # rank 0's model file (ZeRO 0-2: the whole module)
ZERO3_MODEL = f"{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIMIZER_SHARD = re.compile(rf"^{TAG}/(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")


def fp32_state_dict(checkpoint: str | CheckpointInfo, options: dict | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                             config_lib.Config]:
    """(fp32 state dict of the engine's module, the checkpoint's config) of a checkpoint:
    the URL of its folder, checked here (`inspect`), or the CheckpointInfo of one already
    checked. `options`: fsspec options, None for those of the environment. CheckpointError
    when the folder is no checkpoint, is incomplete (IncompleteCheckpoint), or a file holds
    other objects than tensors and DeepSpeed's few records."""
    url = checkpoint.url if isinstance(checkpoint, CheckpointInfo) else checkpoint
    options = options if options is not None else storage.storage_options(url)
    fs, path = storage.filesystem(url, options)
    if isinstance(checkpoint, CheckpointInfo):
        info = checkpoint
    else:
        with storage.translate_errors(url):
            if not fs.exists(f"{path}/{META}"):
                raise CheckpointError(f"{url} is not a checkpoint (no {META}): pass a checkpoint-NNNNNNNN "
                                      f"folder of a run")
        info = inspect(url, options)
    cfg = config_lib.from_dict(info.meta["config"])
    listed = sorted({rel for part in info.parts for rel in part if rel.startswith(TAG + "/")})
    # ZeRO-3 partitions the module itself; bf16 runs keep their fp32 masters in the optimizer
    # shards: both need DeepSpeed's consolidation. Which files there are says which stage
    # wrote them; meta.json only says the precision (either way nothing is unpickled).
    consolidate = ZERO3_MODEL in listed or (cfg.train.precision != "fp32" and any(map(OPTIMIZER_SHARD.match, listed)))
    if not consolidate and MODEL not in listed:
        raise CheckpointError(f"{url} has no {MODEL} (rank 0's model file): pass a checkpoint-NNNNNNNN folder of a run")
    with tempfile.TemporaryDirectory(prefix="ssl-dist-eval-") as tmp, safe_load.weights_only(url):
        download(fs, path, listed if consolidate else [MODEL], tmp, digests=info.sha256)
        if not consolidate:
            return torch.load(Path(tmp) / MODEL, map_location="cpu", weights_only=True)["module"], cfg
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=TAG), cfg
