"""Export a checkpoint's encoder: consolidated fp32 weights (safetensors) + its architecture (JSON).

The weights are those of a plain torchvision model, `torchvision.models.get_model(arch,
num_classes=feature_dim)`, whose `fc` is the identity matrix, so that the model's output is
the encoder's feature vector and `load_state_dict` is strict; replace `model.fc` for a
classifier. A CIFAR-stem encoder (`cifar_stem`: 3x3 first convolution, no max-pool) needs
those two modules swapped before loading, which the JSON says; one of another `width` than
torchvision's 64 is built by `ssl_dist.model.build_encoder` (torchvision's modules, other
channel counts). Loading needs neither DeepSpeed nor Ray (see the README):

    spec = json.load(open("OUT/encoder.json"))
    model = torchvision.models.get_model(spec["arch"], num_classes=spec["feature_dim"]).eval()
    model.load_state_dict(safetensors.torch.load_file("OUT/encoder.safetensors"))

The fp32 weights come from `checkpoint.weights` (through `evaluate.load_checkpoint_model`,
which builds the model), consolidated from the ZeRO shards with DeepSpeed's own
`zero_to_fp32` where needed, whatever the number of workers that wrote them. The
checkpoint is checked first (complete, every file's digest matching), and nothing of it is
unpickled.

A timm encoder (model.arch=timm/<name>) is exported as timm's own model with no
classifier, and its spec (format ssl_dist.timm/1) names what rebuilds it with timm alone:

    spec = json.load(open("OUT/encoder.json"))
    model = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **spec["arch_kwargs"]).eval()
    model.load_state_dict(safetensors.torch.load_file("OUT/encoder.safetensors"))

An image-text checkpoint (method.name=clip or siglip) is exported by `export_clip`: both
towers as open_clip itself loads them, plus the image tower as encoder.safetensors + .json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from ssl_dist import storage

WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"
FORMAT = "ssl_dist.encoder/1"
TIMM_FORMAT = "ssl_dist.timm/1"  # a timm encoder: rebuilt by timm.create_model, not torchvision
# Every file name an export writes (this module's and export_clip's): what replacing an export removes.
OWNED = {WEIGHTS, SPEC, "open_clip_model.safetensors", "open_clip_config.json"}


class ExportError(RuntimeError):
    """A user-facing export problem (no checkpoint there, incomplete checkpoint)."""


def resolve_checkpoint(url: str, options: dict | None = None, say=None):
    """The complete checkpoint at `url` (every file's digest matching: `checkpoint.inspect`),
    or the newest complete one if `url` is a run folder. What a user should know of it
    (checked by size only) goes to `say` (default: stderr)."""
    from ssl_dist import checkpoint

    name = url.rstrip("/").rsplit("/", 1)[-1]
    if checkpoint.name_key(name) is None:
        info = checkpoint.newest_complete(url, options)
        if info is None:
            raise ExportError(f"{url} is neither a checkpoint folder nor a run folder holding a complete one: "
                              f"pass …/checkpoint-NNNNNNNN")
    else:
        try:
            info = checkpoint.inspect(url, options)
        except checkpoint.IncompleteCheckpoint as err:
            raise ExportError(f"cannot export an incomplete checkpoint: {err}; export an earlier one of the "
                              f"run") from None
    for note in info.notes:
        (say or (lambda line: print(f"ssl-dist: {line}", file=sys.stderr)))(note)
    return info


def encoder_state(model) -> dict[str, torch.Tensor]:
    """The encoder's fp32 tensors under torchvision's names, with an identity `fc`; a timm
    encoder's under timm's names as they are (timm's model with num_classes=0 has no
    classifier to fill: its output already is the feature vector)."""
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.encoder.state_dict().items()}
    if _is_timm(model.encoder):
        return state
    width = model.feature_dim
    state["fc.weight"] = torch.eye(width, dtype=torch.float32)
    state["fc.bias"] = torch.zeros(width, dtype=torch.float32)
    return state


def export_encoder(checkpoint_url: str, out_url: str, storage_options: dict | None = None) -> dict:
    """Write `encoder.safetensors` and `encoder.json` for the checkpoint at `checkpoint_url`
    into the folder `out_url`; for an image-text checkpoint (method.name=clip or siglip) also
    both towers as open_clip loads them (`export_clip`). Returns the JSON written (encoder.json).
    Called by `ssl-dist export`."""
    import torchvision
    from safetensors.torch import save_file

    from ssl_dist.augment import MEAN, STD
    from ssl_dist.evaluate import load_checkpoint_model

    options = storage_options if storage_options is not None else storage.storage_options(checkpoint_url)
    info = resolve_checkpoint(checkpoint_url, options)
    model, cfg = load_checkpoint_model(info, options)  # (checked once, by resolve_checkpoint)
    if callable(getattr(model, "encode_text", None)):  # an image-text model (CLIP, SigLIP): both towers
        from ssl_dist import export_clip

        return export_clip.export_image_text(model, cfg, info, out_url, storage_options)
    if _is_timm(model.encoder):
        spec = {**_timm_spec(cfg.model, model), "image_size": cfg.data.image_size,
                "normalize": {"mean": list(MEAN), "std": list(STD)}, "checkpoint": info.url, "step": info.step}
    else:
        spec = {
            "format": FORMAT,
            "arch": cfg.model.arch,
            "feature_dim": model.feature_dim,
            "cifar_stem": cfg.model.cifar_stem,
            "stem_stride": cfg.model.stem_stride,
            "width": cfg.model.width,
            "fc": "identity: the model's output is the encoder's feature vector; replace model.fc for a classifier",
            "stem_note": _stem_note(cfg.model),
            "image_size": cfg.data.image_size,
            "normalize": {"mean": list(MEAN), "std": list(STD)},
            "checkpoint": info.url,
            "step": info.step,
            "torchvision": torchvision.__version__,
        }
    with tempfile.TemporaryDirectory(prefix="ssl-dist-export-") as tmp:
        save_file(encoder_state(model), str(Path(tmp) / WEIGHTS),
                  metadata={"format": spec["format"], "arch": spec["arch"]})
        (Path(tmp) / SPEC).write_text(json.dumps(spec, indent=1))
        put_files(tmp, out_url, storage_options)
    return spec


def put_files(tmp: str, out_url: str, storage_options: dict | None = None) -> None:
    """Upload every file of the local folder `tmp` into the folder `out_url`, the spec last,
    and remove the files of `OWNED` that this export did not write: exporting into a folder
    that holds an earlier export replaces it, never leaves a mix of two (a SimCLR export over
    a CLIP one would otherwise leave open_clip's files of the other checkpoint behind).
    Called by `export_encoder` and `export_clip.export_image_text`."""
    options = storage.storage_options(out_url) if storage_options is None else storage_options
    fs, path = storage.filesystem(out_url, options)
    names = sorted(p.name for p in Path(tmp).iterdir())
    names.sort(key=lambda name: name == SPEC)  # a reader that finds the spec finds the weights beside it
    with storage.translate_errors(out_url):
        fs.makedirs(path, exist_ok=True)
        for name in names:
            fs.put_file(str(Path(tmp) / name), f"{path}/{name}")
        for name in OWNED - set(names):
            if fs.exists(f"{path}/{name}"):
                fs.rm(f"{path}/{name}")


def load_encoder(folder: str) -> torch.nn.Module:
    """The exported encoder of a local `folder` as a torchvision ResNet in eval mode (what the
    README's snippet does, as a function, for any width and stem), or as the timm model it
    was (format ssl_dist.timm/1)."""
    from safetensors.torch import load_file

    from ssl_dist.model import build_encoder, build_timm_encoder

    spec = json.loads((Path(folder) / SPEC).read_text())
    if spec.get("format") == TIMM_FORMAT:
        model, _ = build_timm_encoder(spec["timm_name"], spec["arch_kwargs"])
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        return model.eval()
    model, feature_dim = build_encoder(spec["arch"], cifar_stem=spec["cifar_stem"],
                                       stem_stride=spec.get("stem_stride", 1), width=spec.get("width", 64))
    model.fc = torch.nn.Linear(feature_dim, feature_dim)  # the identity matrix, as exported
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model.eval()


def _is_timm(encoder: torch.nn.Module) -> bool:
    """Whether `encoder` is a timm model (model.arch=timm/<name>), not a torchvision one."""
    return type(encoder).__module__.startswith("timm.")


def _timm_spec(model_cfg, model) -> dict:
    """What rebuilds a timm encoder with timm alone: its name, the kwargs it was built with and
    no classifier. The ResNet options (cifar_stem, stem_stride, width) are not its own."""
    import timm

    from ssl_dist.model import TIMM_PREFIX

    name = model_cfg.arch.removeprefix(TIMM_PREFIX)
    return {
        "format": TIMM_FORMAT,
        "arch": model_cfg.arch,
        "timm_name": name,
        "arch_kwargs": dict(model_cfg.arch_kwargs),
        "num_classes": 0,
        "feature_dim": model.feature_dim,
        "load": "model = timm.create_model(spec['timm_name'], pretrained=False, num_classes=0, **spec['arch_kwargs']); "
                "model.load_state_dict(safetensors.torch.load_file('encoder.safetensors')): its output is the "
                "encoder's feature vector; model.reset_classifier(n) adds a classifier",
        "timm": timm.__version__,
    }


def _stem_note(model_cfg) -> str | None:
    """What a plain torchvision model needs changed before it can load the weights."""
    if model_cfg.width != 64:
        return (f"width {model_cfg.width}: not torchvision's 64; build the encoder with ssl_dist.model.build_encoder("
                f"{model_cfg.arch!r}, cifar_stem={model_cfg.cifar_stem}, stem_stride={model_cfg.stem_stride}, "
                f"width={model_cfg.width}) and set its fc = Linear(feature_dim, feature_dim)")
    if model_cfg.cifar_stem:
        return (f"cifar_stem: before loading, set model.conv1 = Conv2d(3, 64, 3, {model_cfg.stem_stride}, 1, "
                f"bias=False) and model.maxpool = Identity()")
    return None
