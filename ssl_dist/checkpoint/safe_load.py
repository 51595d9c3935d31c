"""Loading checkpoint files without unpickling arbitrary objects.

A checkpoint comes from storage that others may write to, so its `.pt` files are untrusted:
a pickle can run any code while it loads. torch's weights-only unpickler builds tensors,
containers and primitives only, plus the types named in an allow-list. DeepSpeed's loaders
(`engine.load_checkpoint`, `ds_to_universal`, `zero_to_fp32`) pass `weights_only=False`
themselves, so `weights_only()` turns on torch's own override for its duration
(TORCH_FORCE_WEIGHTS_ONLY_LOAD, which wins over an explicit `weights_only=False`) and adds
the few DeepSpeed types its files hold. Every checkpoint load runs inside it: resume,
resharding, evaluation and export, whatever meta.json says about the checkpoint.

What DeepSpeed 0.19's files hold beyond tensors (found by saving ZeRO 0-3 in fp32 and bf16,
with AdamW and SGD, and listing `torch.serialization.get_unsafe_globals_in_checkpoint`):
the ZeRO optimizer shards and the universal `optimizer_state.pt` hold a `ZeroStageEnum`
(an int enum), a `LossScaler` (attributes: numbers) and, for ZeRO 1-2, `fragment_address`
(a dataclass of two ints); model-state files and the universal per-parameter files hold
tensors and primitives only. None of these types runs code when it is built.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from typing import Iterator

import torch

from ssl_dist.checkpoint.layout import CheckpointError
from ssl_dist.environ import environment

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses every load while both are set


def deepspeed_types() -> list[type]:
    """The DeepSpeed types its checkpoint files hold (module docstring), imported on use:
    importing this package starts nothing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only(url: str) -> Iterator[None]:
    """Every `torch.load` of this process, DeepSpeed's included, loads weights only while
    inside (the allow-list: `deepspeed_types`). A file that holds anything else raises
    CheckpointError naming `url` (the checkpoint being read), and nothing of it is built.
    Any process; it changes process-wide state (an environment variable, torch's allow-list)
    and puts both back on the way out."""
    # Only the types not yet allowed: leaving, torch removes what this added, and a nested
    # use (restore around DeepSpeed's load) must not take the outer one's list away.
    added = [t for t in deepspeed_types() if t not in torch.serialization.get_safe_globals()]
    try:
        with environment({FORCE: "1", FORCE_NOT: None}), torch.serialization.safe_globals(added):
            yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(refusal(url, err)) from None


def refusal(url: str, err: Exception) -> str:
    """The one message of a checkpoint file that holds more than weights. Only what torch
    refused is quoted from its error (which goes on to suggest weights_only=False)."""
    text = str(err)
    found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+|[^\n.]+)", text)
    if found:
        detail = f"unsupported {found.group(1)}"
    else:
        detail = (text.strip().splitlines() or [type(err).__name__])[0][:120]
    return (f"{url} holds objects that loading would have to unpickle ({detail}); refusing to unpickle them: "
            f"load only checkpoints written by ssl-dist, or delete this one")
