"""Export an image-text checkpoint (method.name=clip or siglip): both towers as open_clip loads them.

Four files go into the output folder:

- `open_clip_model.safetensors`: the whole open_clip CLIP (or CustomTextCLIP) state dict in
  fp32 under open_clip's own key names, `logit_scale` (and SigLIP's `logit_bias`) included
  in open_clip's shape, so that open_clip's strict load takes it;
- `open_clip_config.json`: {"model_cfg", "preprocess_cfg"}, the layout open_clip reads from a
  local folder or the HF hub. `model_cfg` is the checkpoint's (a built-in name's or the
  user's JSON file's) with the image tower at `data.image_size`, as it trained;
  `preprocess_cfg` is ssl-dist's evaluation view (resize the shorter side, centre crop,
  bilinear, open_clip's mean and std);
- `encoder.safetensors` + `encoder.json`: the image tower alone (`model.visual`'s state dict,
  whose output is the image embedding), with a spec in the style of the image-only export.

Loading needs only open_clip (see the README):

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")

or, for a built-in arch, `create_model_and_transforms(arch, pretrained="OUT/open_clip_model.safetensors",
**spec["open_clip"]["create_kwargs"])` (the image size, and SigLIP's bias if the arch has none).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ssl_dist import export

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the name open_clip looks for first in a folder
OPEN_CLIP_CONFIG = "open_clip_config.json"
FORMAT = "ssl_dist.open_clip/1"


def open_clip_model_cfg(cfg) -> dict:
    """The open_clip model config that builds the checkpoint's towers: `model.clip_arch`'s at
    `data.image_size`, with the method's initial logit scale (and bias) in place of the
    arch's, so that open_clip creates exactly the parameters the engine trained (a SigLIP
    bias even on a CLIP arch, none on CLIP even for a SigLIP arch). Called by the export."""
    from ssl_dist import methods, model

    method = methods.resolve(cfg.method.name)
    model_cfg = model.clip_model_config(cfg.model.clip_arch, cfg.data.image_size)
    model_cfg.pop("init_logit_bias", None)
    model_cfg["init_logit_scale"] = method.init_logit_scale
    if method.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = method.init_logit_bias
    return model_cfg


def open_clip_state(module, model_cfg: dict) -> dict[str, torch.Tensor]:
    """`module`'s (an ImageTextModel) fp32 tensors under open_clip's names: the wrapped model's
    keys without "clip.", and the (1,) logit scale and bias in the shape open_clip's model has
    (0-dim unless the config asks for `nonscalar_logit_scale`). Checked against the model
    open_clip builds from `model_cfg` (on the meta device: no memory), so that a key or shape
    open_clip would refuse is an ExportError here, not a failed load later."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    shape = (1,) if model_cfg.get("nonscalar_logit_scale") else ()
    state = {}
    for key, value in module.state_dict().items():
        name = key.removeprefix("clip.")
        value = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype)
        state[name] = (value.reshape(shape) if name in ("logit_scale", "logit_bias") else value).contiguous().clone()
    cfg = dict(model_cfg)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(**cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise export.ExportError(f"the checkpoint's towers do not match open_clip's model for its config "
                                 f"(keys or shapes differ: {differ[:5]}); open_clip {open_clip.__version__}")
    return state


def create_kwargs(cfg, model_cfg: dict) -> dict:
    """Keyword arguments of `open_clip.create_model_and_transforms(arch, pretrained=...)` that
    make open_clip's own config for `arch` (a built-in name, or a JSON file registered with
    `open_clip.add_model_config`) build these towers: the image size
    trained at, and SigLIP's bias when the arch has none. (A CLIP checkpoint of a SigLIP
    arch needs nothing: open_clip fills a missing bias with 0.)"""
    from ssl_dist import model

    kwargs = {"force_image_size": cfg.data.image_size}
    own = model.clip_model_config(cfg.model.clip_arch)  # the arch's config as open_clip reads it
    if "init_logit_bias" in model_cfg and "init_logit_bias" not in own:
        kwargs["init_logit_bias"] = model_cfg["init_logit_bias"]
    return kwargs


def export_image_text(module, cfg, info, out_url: str, storage_options: dict | None = None) -> dict:
    """Write the four files of an image-text checkpoint (the module docstring) into the folder
    `out_url`. `module`: the checkpoint's ImageTextModel with its fp32 weights, `cfg` its
    config, `info` its `checkpoint.inspect` record. Returns the JSON written as encoder.json.
    Called by `export.export_encoder`."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = open_clip_model_cfg(cfg)
    state = open_clip_state(module, model_cfg)
    view = {"size": cfg.data.image_size, "mode": "RGB", "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bilinear", "resize_mode": "shortest",
            "fill_color": 0}  # ssl-dist's eval view (augment.eval_transform): what evaluate scores
    arch = cfg.model.clip_arch
    builtin = not arch.endswith(".json")
    spec = {
        "format": FORMAT,
        "method": cfg.method.name,
        "arch": arch,
        "feature_dim": model_cfg["embed_dim"],
        "tower": "open_clip's image tower (model.visual): its output, not normalised, is the image embedding",
        "image_size": cfg.data.image_size,
        "normalize": {"mean": view["mean"], "std": view["std"]},
        "open_clip": {
            "weights": OPEN_CLIP_WEIGHTS,
            "config": OPEN_CLIP_CONFIG,
            "load": "open_clip.create_model_and_transforms('local-dir:OUT')" + (
                "; or (arch, pretrained='OUT/open_clip_model.safetensors', **create_kwargs)" if builtin else
                "; arch is a JSON file: open_clip.add_model_config(it), then its file name without .json as arch, "
                "pretrained='OUT/open_clip_model.safetensors', **create_kwargs"),
            "create_kwargs": create_kwargs(cfg, model_cfg),
            "logit_scale": float(state["logit_scale"].reshape(-1)[0]),
            "logit_bias": float(state["logit_bias"].reshape(-1)[0]) if "logit_bias" in state else None,
            "version": open_clip.__version__,
        },
        "checkpoint": info.url,
        "step": info.step,
    }
    meta = {"format": FORMAT, "arch": arch, "method": cfg.method.name}
    with tempfile.TemporaryDirectory(prefix="ssl-dist-export-") as tmp:
        save_file(state, str(Path(tmp) / OPEN_CLIP_WEIGHTS), metadata=meta)
        save_file({k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")},
                  str(Path(tmp) / export.WEIGHTS), metadata=meta)
        (Path(tmp) / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": view},
                                                             indent=1))
        (Path(tmp) / export.SPEC).write_text(json.dumps(spec, indent=1))
        export.put_files(tmp, out_url, storage_options)
    return spec
