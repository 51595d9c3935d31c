"""Export a checkpoint's encoder: consolidated fp32 weights (safetensors) + its architecture (JSON).

The weights are those of a plain torchvision model, `torchvision.models.get_model(arch,
num_classes=feature_dim)`, whose `fc` is the identity matrix, so that the model's output is
the encoder's feature vector and `load_state_dict` is strict; replace `model.fc` for a
classifier. A CIFAR-stem encoder (`cifar_stem`: 3x3 first convolution, no max-pool) needs
those two modules swapped before loading, which the JSON says. Loading needs neither
DeepSpeed, Ray nor ssl_dist (see the README):

    spec = json.load(open("OUT/encoder.json"))
    model = torchvision.models.get_model(spec["arch"], num_classes=spec["feature_dim"]).eval()
    model.load_state_dict(safetensors.torch.load_file("OUT/encoder.safetensors"))

The fp32 weights are consolidated from the ZeRO shards with DeepSpeed's own `zero_to_fp32`
(through `evaluate.load_checkpoint_model`), whatever the number of workers that wrote them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ssl_dist import storage

WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"
FORMAT = "ssl_dist.encoder/1"


class ExportError(RuntimeError):
    """A user-facing export problem (no checkpoint there, incomplete checkpoint)."""


def resolve_checkpoint(url: str, options: dict | None = None):
    """The complete checkpoint at `url`, or the newest complete one if `url` is a run folder."""
    from ssl_dist import checkpoint

    name = url.rstrip("/").rsplit("/", 1)[-1]
    if checkpoint.name_key(name) is None:
        info = checkpoint.newest_complete(url, options)
        if info is None:
            raise ExportError(f"{url} is neither a checkpoint folder nor a run folder holding a complete one: "
                              f"pass …/checkpoint-NNNNNNNN")
        return info
    try:
        return checkpoint.inspect(url, options)
    except checkpoint.IncompleteCheckpoint as err:
        raise ExportError(f"cannot export an incomplete checkpoint: {err}; export an earlier one of the run") from None


def encoder_state(model) -> dict[str, torch.Tensor]:
    """The encoder's fp32 tensors under torchvision's names, with an identity `fc`."""
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.encoder.state_dict().items()}
    width = model.feature_dim
    state["fc.weight"] = torch.eye(width, dtype=torch.float32)
    state["fc.bias"] = torch.zeros(width, dtype=torch.float32)
    return state


def export_encoder(checkpoint_url: str, out_url: str, storage_options: dict | None = None) -> dict:
    """Write `encoder.safetensors` and `encoder.json` for the checkpoint at `checkpoint_url`
    into the folder `out_url`. Returns the JSON written."""
    import torchvision
    from safetensors.torch import save_file

    from ssl_dist.augment import MEAN, STD
    from ssl_dist.evaluate import load_checkpoint_model

    options = storage_options if storage_options is not None else storage.storage_options(checkpoint_url)
    info = resolve_checkpoint(checkpoint_url, options)
    model, cfg = load_checkpoint_model(info.url, options)
    spec = {
        "format": FORMAT,
        "arch": cfg.model.arch,
        "feature_dim": model.feature_dim,
        "cifar_stem": cfg.model.cifar_stem,
        "fc": "identity: the model's output is the encoder's feature vector; replace model.fc for a classifier",
        "stem_note": ("cifar_stem: before loading, set model.conv1 = Conv2d(3, 64, 3, 1, 1, bias=False) and "
                      "model.maxpool = Identity()") if cfg.model.cifar_stem else None,
        "image_size": cfg.data.image_size,
        "normalize": {"mean": list(MEAN), "std": list(STD)},
        "checkpoint": info.url,
        "step": info.step,
        "torchvision": torchvision.__version__,
    }
    out_options = storage.storage_options(out_url) if storage_options is None else storage_options
    fs, path = storage.filesystem(out_url, out_options)
    with tempfile.TemporaryDirectory(prefix="ssl-dist-export-") as tmp:
        save_file(encoder_state(model), str(Path(tmp) / WEIGHTS), metadata={"format": FORMAT, "arch": spec["arch"]})
        (Path(tmp) / SPEC).write_text(json.dumps(spec, indent=1))
        with storage.translate_errors(out_url):
            fs.makedirs(path, exist_ok=True)
            for name in (WEIGHTS, SPEC):
                fs.put_file(str(Path(tmp) / name), f"{path}/{name}")
    return spec


def load_encoder(folder: str) -> torch.nn.Module:
    """The exported encoder of a local `folder` as a plain torchvision model in eval mode
    (what the README's snippet does, as a function)."""
    import torchvision
    from safetensors.torch import load_file

    spec = json.loads((Path(folder) / SPEC).read_text())
    model = torchvision.models.get_model(spec["arch"], num_classes=spec["feature_dim"])
    if spec["cifar_stem"]:
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model.eval()
