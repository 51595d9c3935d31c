"""The fp32 weights of a checkpoint's engine module, for evaluation and export.

Any process, no Ray and no engine: the checkpoint folder is downloaded to a temp dir and
the weights are read from rank 0's model file, or consolidated from the ZeRO shards with
DeepSpeed's own `zero_to_fp32`, whatever the number of workers that wrote them.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import torch

from ssl_dist import config as config_lib
from ssl_dist import storage
from ssl_dist.checkpoint.layout import META, TAG, CheckpointError


def fp32_state_dict(checkpoint_url: str, options: dict | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                config_lib.Config]:
    """(fp32 state dict of the engine's module, the checkpoint's config) of the checkpoint
    folder at `checkpoint_url`. `options`: fsspec options, None for those of the environment.
    CheckpointError when the folder is no checkpoint or its model file holds other objects
    than tensors."""
    options = options if options is not None else storage.storage_options(checkpoint_url)
    fs, path = storage.filesystem(checkpoint_url, options)
    with storage.translate_errors(checkpoint_url):
        if not fs.exists(f"{path}/{META}"):
            raise CheckpointError(f"{checkpoint_url} is not a checkpoint (no {META}): pass a checkpoint-NNNNNNNN "
                                  f"folder of a run")
        with tempfile.TemporaryDirectory(prefix="ssl-dist-eval-") as tmp:
            fs.get(f"{path}/", tmp + "/", recursive=True)
            meta = json.loads((Path(tmp) / META).read_text())
            cfg = config_lib.from_dict(meta["config"])
            if cfg.train.zero_stage == 0 or (cfg.train.zero_stage < 3 and cfg.train.precision == "fp32"):
                return _whole_module(checkpoint_url, Path(tmp)), cfg
            # ZeRO-3 partitions, or bf16 runs whose fp32 masters are in the optimizer shards:
            # DeepSpeed's own consolidation, which must unpickle its optimizer files (they hold
            # DeepSpeed objects, e.g. its LossScaler); only load checkpoints you wrote.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=TAG), cfg


def _whole_module(checkpoint_url: str, folder: Path) -> dict[str, torch.Tensor]:
    """The module's weights are whole (and, but for stage 0 in bf16, the fp32 masters
    themselves) in rank 0's model file: tensors only, so loaded without unpickling objects."""
    try:
        return torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=True)["module"]
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{checkpoint_url}: its model file holds objects other than tensors "
                              f"({str(err).splitlines()[-1][:200]}); refusing to unpickle it") from None
