"""Typed, nested run configuration.

The dataclasses below are the single source of truth: their defaults are the embedded
defaults, a YAML file only overrides some of them, and `a.b=c` arguments on the command
line override the YAML. Every field has a docstring (the string literal under it), which
`describe()` prints, so the config is also the CLI's reference.

Validation happens while merging: an unknown key or a value of the wrong type raises
`ConfigError` naming the key and what is allowed, before anything starts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Built-in methods by name (ssl_dist/methods/ maps each to its class); a config may also
# name a Method subclass of the user's own as package.module:Class.
BUILTIN_METHODS = ("simclr", "mocov3", "rotnet", "clip", "siglip")

# The torchvision encoders of model.arch (any timm model is timm/<name>)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")

# Numeric keys that must not be negative, and what their 0 means.
NON_NEGATIVE = {
    "run.min_workers": "0 (fixed size) or between 1 and run.num_workers",
    "train.max_minutes": "0 (no limit) or positive", "train.checkpoint_minutes": "0 (off) or positive",
    "data.read_retries": "0 or more", "data.loader_workers": "0 or more",
    "loss.chunk_size": "0 (auto) or positive", "optim.grad_clip": "0 (no clipping) or positive",
    "eval.every": "0 (off) or more", "eval.max_samples": "0 (all) or more",
}

# Keys that existed once: a config naming one gets the message; a saved one drops them (valid when written).
REMOVED_KEYS = {"loss.name": "loss.name was removed: the method decides its loss (method.name=simclr is NT-Xent); "
                              "delete loss.name from the config"}


# A run name is one folder under run.storage_path: one path segment, never "." or "..".
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(ValueError):
    """A user-facing configuration problem; its message names the key and the fix."""


@dataclass
class DataConfig:
    train_url: str = ""
    """URL of the training shards' folder (holding index.json): local path, file://, s3://. Empty: quickstart makes a synthetic set."""
    batch_size: int = 64
    """Samples per worker per step; the global batch is batch_size x number of workers."""
    loader_workers: int = 1
    """DataLoader worker processes per training worker (0 decodes in the training process)."""
    image_size: int = 32
    """Side of the square crops fed to the encoder."""
    max_skip_fraction: float = 0.01
    """Stop the run when one worker has skipped more than this fraction of its share of an epoch (bad samples, unreadable shards); 0 stops at the first."""
    read_retries: int = 3
    """Retries, with exponential backoff from 0.5 s, before an unreadable shard is skipped."""
    read_deadline_s: float = 300.0
    """Total seconds one read may spend waiting out throttling, timeouts or an unreachable store (jittered exponential backoff); past it the run stops with a message naming the store. Data that is read and found bad is skipped instead."""
    max_pixels: int = 67_108_864
    """Largest image (width x height, read from its header before decoding) the stream, `shards check` and evaluation decode; a larger one is a bad sample. Default 8192 x 8192."""
    verify: bool = False
    """Check each shard against the sha256 in its manifest the first time a process reads it (one extra whole read per shard); a mismatch makes the shard's samples bad data."""
    augment: Literal["per_sample", "per_batch"] = "per_sample"
    """Where the views (SimCLR's two, CLIP's crop) are made: per_sample in the loader workers (torchvision, PIL), or per_batch on the training device (one draw per image; loader workers only decode)."""
    seed: int = 0
    """Seed of the data order (shard and sample shuffle); the order is a function of (seed, epoch, manifest)."""
    shuffle_window: int = 4096
    """Samples mixed by the bounded shuffle (memory per reader is bounded by one window's sample list)."""


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    """Encoder: a torchvision ResNet (resnet18, resnet34, resnet50) or any timm model as timm/<name> (e.g. timm/vit_small_patch16_224)."""
    arch_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the timm model (e.g. {img_size: 32, patch_size: 4} for a ViT on 32 px images); only with model.arch=timm/<name>."""
    cifar_stem: bool = True
    """Replace the ImageNet stem (7x7 conv, max-pool) by a 3x3 conv for small (32 px) images."""
    stem_stride: int = 1
    """Stride of the CIFAR stem's 3x3 conv: 2 halves the feature maps (32 px -> 16) and quarters the compute."""
    width: int = 64
    """Channels of the first ResNet stage (each later stage doubles them); 64 is torchvision's. Half the width is a quarter of the compute and parameters."""
    proj_hidden_dim: int = 512
    """Hidden width of the projection head's MLP."""
    proj_dim: int = 128
    """Output width of the projection head (the embedding the loss sees)."""
    clip_arch: str = ""
    """Towers of method.name=clip/siglip: an open_clip model config name (RN50, ViT-B-32, ...: open_clip.list_models()) or the path of a JSON file in its format (embed_dim, vision_cfg, text_cfg; e.g. jobs/configs/clip-tiny.json for CPU); the image tower is built at data.image_size."""


@dataclass
class MethodConfig:
    name: str = "simclr"
    """Pretraining method: simclr, mocov3, rotnet, clip, siglip (image-text pairs: set model.clip_arch), or `package.module:Class` naming a subclass of ssl_dist.methods.Method of your own (it ships with the run; see ssl_dist/methods/base.py)."""
    momentum: float = 0.99
    """MoCo v3: the momentum encoder's EMA momentum at step 0, raised on a cosine schedule to 1 at train.max_steps."""


@dataclass
class LossConfig:
    temperature: float = 0.2
    """Softmax temperature of NT-Xent."""
    chunk_size: int = 0
    """Anchor rows per chunk of the similarity matrix; 0 picks them from the sizes (the whole matrix
    while it fits 6 MiB on CPU, 1 GiB on a GPU: ssl_dist/loss/numerics.py auto_chunk); a number at
    least the anchor rows computes it whole."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    """Optimizer handed to DeepSpeed: torch's AdamW or SGD, or timm's LARS (large batches; biases and normalisation weights are left out of its adaptation)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """How optim.lr follows the global batch: none, linear (lr x global batch / optim.base_batch) or sqrt (lr x sqrt(global batch / optim.base_batch)); applied again when an elastic restart changes the global batch."""
    base_batch: int = 256
    """The global batch at which optim.lr is the learning rate (optim.lr_scaling)."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 1e-6
    """Decoupled weight decay."""
    momentum: float = 0.9
    """Momentum (SGD only)."""
    warmup_steps: int = 10
    """Linear warm-up steps, then the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to zero at train.max_steps, or constant (for runs bounded by train.max_minutes)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm (over every rank's shard) to this; 0: no clipping, as in torch's optimizers and the published SimCLR/CLIP recipes."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps of the whole run."""
    max_minutes: float = 0.0
    """Also stop (with a final checkpoint) once this many minutes of training have passed in this attempt; 0: no time limit."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0 to 3."""
    accumulate: int = 1
    """Micro-batches per optimizer step, with gradient caching: each anchor sees batch_size x accumulate x workers negatives."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Numeric precision of the engine (bf16 on GPUs that support it)."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    checkpoint_minutes: float = 0.0
    """Also save a checkpoint once this many minutes have passed since the previous one (rank 0's clock decides for all); 0 turns the timer off."""
    async_upload: bool = True
    """Upload checkpoints in the background (Ray Train's ASYNC mode): training waits for the local write only; a checkpoint counts once every rank's upload is done."""
    indivisible_batch: Literal["round_down", "keep_per_worker", "error"] = "round_down"
    """When a run resumes (or elastically restarts) on a number of workers that does not divide its global batch (data.batch_size x run.num_workers at its start): round_down uses floor(global / workers) per worker (a slightly smaller global batch), keep_per_worker keeps data.batch_size per worker (global batch = data.batch_size x workers), error stops with a message. When it divides, the global batch is always kept."""
    log_keys: bool = False
    """Debugging / audit aid: every rank writes the sample keys of each of its batches, per step, to keys/attempt-<start step>-<ms>-rank<r>.jsonl in the run folder."""
    log_every: int = 10
    """Report metrics to Ray Train every this many steps."""
    profile: bool = False
    """Wait for the GPU at every phase of the step so that the logged phase times are exact (costs speed)."""
    torch_threads: int = 0
    """Intra-op threads per worker; 0 divides the node's CPUs among its workers."""
    seed: int = 0
    """Seed of model initialisation and augmentation."""


@dataclass
class RunConfig:
    name: str = "ssl-dist"
    """Run name: the folder under storage_path that holds checkpoints and metrics."""
    storage_path: str = "./runs"
    """Where Ray Train keeps the run: a local path or s3://bucket/prefix."""
    num_workers: int = 2
    """Training workers (Ray Train workers, one DeepSpeed rank each); the most workers when min_workers is set."""
    min_workers: int = 0
    """Elastic training: run on any number of workers from min_workers to num_workers (Ray Train's (min, max) range); a restart may change the number and the checkpoint is resharded. 0: exactly num_workers."""
    use_gpu: bool = False
    """One GPU per worker, NCCL backend."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each training worker."""
    max_failures: int = 2
    """Worker-group restarts Ray Train attempts after a failure before giving up."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in storage."""
    collective_timeout_s: float = 300.0
    """A collective (gradient reduce, gather, broadcast) that waits longer than this fails the run: a hung or lost rank is found in minutes, not after torch's 30."""
    lease_s: float = 60.0
    """The run folder's writer lease: the driver holding it renews it every lease_s / 4; a second driver on the same run is refused until it has gone unrenewed for lease_s."""


@dataclass
class StorageConfig:
    endpoint_url: str = ""
    """S3 endpoint (MinIO, Ceph, moto...); empty: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS itself."""
    region: str = ""
    """S3 region; empty: AWS_REGION / AWS_DEFAULT_REGION."""
    anonymous: bool = False
    """Read public buckets without credentials."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate the live model every this many steps during training (and at the last step): kNN, and zero-shot for clip/siglip; 0: off."""
    train_url: str = ""
    """Labeled shards (KEY.cls) whose features are the kNN neighbours (empty: no kNN); keep it small, it is embedded at every evaluation."""
    test_url: str = ""
    """Labeled shards whose samples are the kNN queries and, for clip/siglip, zero-shot classified by their manifest's class names."""
    templates: str = ""
    """Zero-shot prompt templates during training, one per line with {} for the class name; empty: CLIP's CIFAR-10 ones."""
    k: int = 200
    """Neighbours per query (cosine similarity, votes weighted by exp(similarity / 0.1))."""
    max_samples: int = 2000
    """At most this many samples (the first, in manifest order) of each set are embedded; 0: all."""


@dataclass
class TrackConfig:
    mlflow_uri: str = ""
    """MLflow tracking server (http://host:5000, or a file: / sqlite: URI) that rank 0 logs the run to; empty: no MLflow. Credentials come from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never from here."""
    experiment: str = "ssl-dist"
    """MLflow experiment of the run (created if missing)."""
    wandb_project: str = ""
    """Weights & Biases project that rank 0 logs the run to; empty: no W&B. WANDB_API_KEY and WANDB_MODE (offline on clusters without internet) come from the environment."""
    wandb_entity: str = ""
    """W&B team or user owning the project; empty: the API key's default entity."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Where the shards are and how they are streamed."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """What a batch becomes (views, tokens), which towers, which loss."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and projection head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length of the run, engine and checkpoints."""
    run: RunConfig = field(default_factory=RunConfig)
    """Ray Train run: name, storage, workers, failures."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store access (credentials always come from the environment, never from here)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic kNN evaluation during training (`ssl-dist evaluate` scores a checkpoint afterwards)."""
    track: TrackConfig = field(default_factory=TrackConfig)
    """Experiment tracking beside the run folder's CSV and TensorBoard files: MLflow, Weights & Biases."""

    def get(self, dotted: str) -> Any:
        """The value of a `section.key`."""
        return getattr(getattr(self, dotted.split(".")[0]), dotted.split(".")[1])

    def validate(self) -> None:
        """Checks that a single field's type cannot express."""
        if not 0 <= self.train.zero_stage <= 3:
            raise ConfigError(f"train.zero_stage={self.train.zero_stage}: allowed values are 0, 1, 2, 3")
        if not RUN_NAME_RE.fullmatch(self.run.name):
            raise ConfigError(f"run.name={self.run.name!r}: a run name is one folder under run.storage_path: 1 to 128 "
                              f"letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. "
                              f"run.name=simclr-cifar10)")
        if not (self.model.arch in TORCHVISION_ARCHS or re.fullmatch(r"timm/[\w.\-]+", self.model.arch)):
            raise ConfigError(f"model.arch={self.model.arch!r}: allowed values are {', '.join(TORCHVISION_ARCHS)}, or "
                              f"timm/<name> for a timm model (e.g. timm/vit_small_patch16_224)")
        if self.model.arch_kwargs and not self.model.arch.startswith("timm/"):
            raise ConfigError(f"model.arch_kwargs={self.model.arch_kwargs}: keyword arguments of a timm model; "
                              f"model.arch={self.model.arch} takes none (set model.arch=timm/<name>, or remove them)")
        if not 0 <= self.method.momentum <= 1:
            raise ConfigError(f"method.momentum={self.method.momentum}: MoCo v3's EMA momentum must be between 0 "
                              f"and 1 (0.99 is the paper's; 1 freezes the momentum encoder)")
        for key in ("data.batch_size", "run.num_workers", "train.accumulate", "train.max_steps", "data.image_size",
                    "model.width", "eval.k", "data.max_pixels", "optim.base_batch"):
            if self.get(key) < 1:
                raise ConfigError(f"{key}={self.get(key)}: must be at least 1")
        for key, allowed in NON_NEGATIVE.items():
            if self.get(key) < 0:
                raise ConfigError(f"{key}={self.get(key)}: must be {allowed}")
        if self.run.min_workers > self.run.num_workers:
            raise ConfigError(f"run.min_workers={self.run.min_workers}: must be 0 (fixed size) or between 1 and "
                              f"run.num_workers={self.run.num_workers}")
        if not 0 <= self.data.max_skip_fraction <= 1:
            raise ConfigError(f"data.max_skip_fraction={self.data.max_skip_fraction}: must be between 0 and 1")
        if self.model.stem_stride not in (1, 2) or (self.model.stem_stride == 2 and not self.model.cifar_stem):
            raise ConfigError(f"model.stem_stride={self.model.stem_stride}: allowed values are 1 and 2, and 2 only "
                              f"with model.cifar_stem=true (the ImageNet stem has its own strides)")
        if self.method.name not in BUILTIN_METHODS and not re.fullmatch(r"[\w.]+:\w+", self.method.name):
            raise ConfigError(f"method.name={self.method.name!r}: allowed values are "
                              f"{', '.join(BUILTIN_METHODS)}, or package.module:Class for a method of your own")
        for key in ("data.read_deadline_s", "run.collective_timeout_s", "run.lease_s"):
            if self.get(key) <= 0:
                raise ConfigError(f"{key}={self.get(key)}: must be positive (seconds)")
        if self.loss.temperature <= 0:
            raise ConfigError(f"loss.temperature={self.loss.temperature}: must be positive")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@", self.track.mlflow_uri):
            raise ConfigError("track.mlflow_uri holds credentials (user:password@): configs are written to the run "
                              "folder and logged; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                              "MLFLOW_TRACKING_TOKEN) in the environment and give the URI without them")
        if self.eval.every and not self.eval.test_url:
            raise ConfigError(f"eval.every={self.eval.every} needs labeled shards: set eval.test_url (and "
                              f"eval.train_url for kNN), e.g. small sets made with `ssl-dist shards make`")


# ---- loading and merging ---------------------------------------------------------------


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides."""
    cfg = Config()
    if path is not None:
        cfg = merge(cfg, _read_yaml(Path(path)), origin=str(path))
    cfg = merge(cfg, parse_overrides(overrides), origin="command line")
    cfg.validate()
    return cfg


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """`["train.max_steps=10", "data.train_url=s3://b/x"]` -> nested dict with parsed scalars."""
    nested: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.max_steps=10)")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_scalar(raw)
    return nested


def _parse_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def merge(cfg: Any, updates: dict, *, origin: str, prefix: str = "") -> Any:
    """Return a copy of dataclass `cfg` with `updates` applied, type-checked field by field."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if dotted in REMOVED_KEYS:
            if origin == SAVED:
                continue
            raise ConfigError(f"{REMOVED_KEYS[dotted]} (from {origin})")
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r} (from {origin}); allowed keys here: "
                              f"{', '.join(prefix + k for k in fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} (from {origin}) is a section: set its keys, "
                                  f"e.g. {dotted}.{dataclasses.fields(current)[0].name}=...")
            changes[key] = merge(current, value, origin=origin, prefix=dotted + ".")
        else:
            changes[key] = _coerce(dotted, hints[key], value, origin)
    return dataclasses.replace(cfg, **changes)


def _coerce(key: str, hint: Any, value: Any, origin: str) -> Any:
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r} (from {origin}): allowed values are "
                              f"{', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        # keyword arguments of a library's constructor: names to plain values (YAML scalars and lists)
        if isinstance(value, dict) and all(isinstance(k, str) for k in value) and \
                all(isinstance(v, (str, int, float, bool, list, type(None))) for v in value.values()):
            return dict(value)
    raise ConfigError(f"config key {key!r} = {value!r} (from {origin}) has the wrong type: "
                      f"expected {getattr(hint, '__name__', hint)}")


# ---- output -----------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (JSON/YAML-serialisable) of a config."""
    return dataclasses.asdict(cfg)


SAVED = "saved config"  # the origin of a config read back from a run folder or checkpoint


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict`, validated (used to carry the config to Ray workers and checkpoints)."""
    cfg = merge(Config(), data, origin=SAVED)
    cfg.validate()
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as written next to every run."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal right under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def describe(cfg: Config | None = None) -> str:
    """Human-readable listing of every key, its value and its docstring (for `--help-config`)."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines.append(f"{section.name}:")
        docs = field_docs(type(sub))
        for f in dataclasses.fields(sub):
            lines.append(f"  {section.name}.{f.name} = {json.dumps(getattr(sub, f.name))}")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)

