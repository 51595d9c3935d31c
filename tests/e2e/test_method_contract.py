"""A method is a file, not a loop edit: `Toy` below lives in this test file, not in ssl_dist/,
and trains through the real loop (`ssl-dist pretrain`, Ray Train, 2 DeepSpeed ZeRO-2 ranks,
CIFAR-10 shards from the moto S3 server). The driver imports it by `method.name=module:Class`
and ships it to the workers, which could not import this file themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from runs import ssl_dist_cli

from ssl_dist import metrics, storage
from ssl_dist.methods import Method

HERE = Path(__file__).resolve().parent


class ToyModel(torch.nn.Module):
    """8 x 8 crops -> 4 numbers; `features` is what evaluation would read."""

    def __init__(self):
        super().__init__()
        self.toy_tower = torch.nn.Linear(3 * 8 * 8, 4)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.toy_tower(images.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class ToyCrop:
    """In the loader workers: the uint8 image's top-left 8 x 8 corner as floats in [0, 1]."""

    def __call__(self, sample: dict) -> dict:
        return {"__key__": sample["__key__"], "crop": sample["image"][:, :8, :8].float() / 255}


class Toy(Method):
    """Loss: the mean squared embedding, a simple function that SGD drives down at every step."""

    name = "toy"
    image_format = "tensor"

    def build_module(self):
        return ToyModel()

    def sample_transform(self):
        return ToyCrop()

    def forward(self, engine, batch):
        return (engine(batch["crop"].to(engine.device)),)

    def loss(self, outputs, valid):
        (z,) = outputs
        return F.mse_loss(z, torch.zeros_like(z))


def test_a_method_defined_outside_the_package_trains_through_the_real_loop(cifar_shards_s3, ray_address):
    bucket = cifar_shards_s3["bucket"]
    run_url = f"s3://{bucket}/runs/toy-method"
    done = ssl_dist_cli("pretrain", f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path=s3://{bucket}/runs",
                        "run.name=toy-method", "method.name=test_method_contract:Toy", "data.batch_size=8",
                        "run.num_workers=2", "train.max_steps=2", "train.log_every=1", "optim.name=sgd",
                        "optim.lr=0.05", "optim.warmup_steps=0", "optim.schedule=constant",
                        env={"RAY_ADDRESS": ray_address, "PYTHONPATH": f"{HERE}:{HERE.parent}"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    (attempt,) = metrics.read_history(run_url)
    losses = [float(row["loss"]) for row in attempt]
    assert [int(row["step"]) for row in attempt] == [1, 2] and losses[1] < losses[0], losses
    fs, path = storage.filesystem(run_url)
    meta = json.loads(fs.cat_file(f"{path}/checkpoint-00000002/meta.json"))
    assert meta["config"]["method"]["name"] == "test_method_contract:Toy" and meta["samples_seen"] == 2 * 16
    # The engine trained the toy's own module: its parameter names are in the DeepSpeed shard.
    model_states = [p for p in fs.find(f"{path}/checkpoint-00000002") if p.endswith("model_states.pt")]
    assert model_states and b"toy_tower" in fs.cat_file(model_states[0])


def test_a_method_name_that_imports_nothing_is_one_clear_error(cifar_shards_s3, tmp_path):
    done = ssl_dist_cli("pretrain", f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path={tmp_path}",
                        "method.name=no_such_module:Toy")
    assert done.returncode != 0
    assert "method.name='no_such_module:Toy': module 'no_such_module' does not import" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
