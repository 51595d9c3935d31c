"""method.name=rotnet (`ssl_dist/methods/rotnet.py`): every image turned 0/90/180/270 degrees
with the labels of those turns, the loss of the valid slots only and each rank's share of the
global-batch mean, gradient caching equal to the whole-batch step through the real 2-rank
DeepSpeed engine (gloo), and the loss falling on real CIFAR-10 images."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from cifar import cifar_slice
from PIL import Image
from ranks import join_group, spawn_ranks

from ssl_dist import config
from ssl_dist.methods import resolve

MICRO, ACCUMULATE, WORLD, SIZE = 4, 2, 2, 8


def rotnet_cfg(*overrides: str) -> config.Config:
    return config.load(None, ["method.name=rotnet", *overrides])


def corner_logits(rotated: torch.Tensor) -> torch.Tensor:
    """(4b, 3, S, S) -> (4b, 4): 100 x the pixel in the corner where a turn by r quarters
    (counter-clockwise) moves the top-left corner: r=0 top-left, 1 bottom-left, 2 bottom-right,
    3 top-right. For images whose only bright pixel is the top-left one, a perfect classifier."""
    x = rotated.sum(1)
    return 100 * torch.stack([x[:, 0, 0], x[:, -1, 0], x[:, -1, -1], x[:, 0, -1]], dim=1)


def test_labels_match_the_rotations_applied():
    method = resolve("rotnet")(rotnet_cfg())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 6, 6, generator=g)
    batch = method.on_device({"image": images.clone(), "__batch__": 0}, epoch=0, device=torch.device("cpu"))
    rotated, rotation = batch["rotated"], batch["rotation"]
    assert rotated.shape == (20, 3, 6, 6) and rotation.shape == (20,) and rotation.dtype == torch.long
    assert "image" not in batch  # the batch holds the turned copies only
    for row, label in enumerate(rotation.tolist()):
        assert torch.equal(rotated[row], torch.rot90(images[row // 4], label, dims=(-2, -1))), row
    assert sorted(rotation.view(5, 4)[0].tolist()) == [0, 1, 2, 3]  # all four turns of every image

    # ...and the loss's targets are those labels: a classifier that reads the turn off a marker
    # pixel gets loss ~0; the same logits with two classes swapped get a large one.
    marked = torch.zeros(5, 3, 6, 6)
    marked[:, :, 0, 0] = 1
    turned = method.on_device({"image": marked, "__batch__": 0}, epoch=0, device=torch.device("cpu"))
    oracle = corner_logits(turned["rotated"]).view(5, 4, 4)
    assert float(method.loss((oracle,), None)) < 1e-6
    assert float(method.loss((oracle[..., [1, 0, 2, 3]],), None)) > 10


def test_the_loss_of_a_batch_with_invalid_slots_is_the_loss_of_the_valid_ones():
    method = resolve("rotnet")(rotnet_cfg())
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, False, True, True, False, True])
    loss = method.loss((logits,), valid)
    loss.backward()
    kept = logits.detach()[valid].requires_grad_(True)
    reference = F.cross_entropy(kept.reshape(-1, 4), torch.arange(4).repeat(int(valid.sum())))
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(logits.grad[valid], kept.grad, rtol=1e-12, atol=0)
    assert torch.count_nonzero(logits.grad[~valid]) == 0  # an invalid slot moves nothing
    torch.testing.assert_close(method.loss((logits,), None).detach(),  # all valid: the plain mean
                               F.cross_entropy(logits.detach().reshape(-1, 4), torch.arange(4).repeat(6)))


def test_per_batch_augmentation_crops_and_flips_on_the_device_reproducibly():
    cfg = rotnet_cfg("data.augment=per_batch", "data.image_size=8")
    transform = pickle.loads(pickle.dumps(resolve("rotnet")(cfg).sample_transform()))  # as loader workers get it
    flat = Image.new("RGB", (8, 8), (200, 10, 10))
    g = torch.Generator().manual_seed(0)
    noise = Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy())
    samples = [transform({"__key__": f"k{i}", "image": im}) for i, im in enumerate([flat, noise])]
    assert all(s["image"].dtype == torch.uint8 and s["image"].shape == (3, 8, 8) for s in samples)
    uint8 = torch.stack([s["image"] for s in samples])

    def on_device(batch_index, epoch=0, rank=0):
        batch = {"image": uint8.clone(), "__batch__": batch_index}
        rotated = resolve("rotnet")(cfg, rank=rank).on_device(batch, epoch=epoch, device=torch.device("cpu"))["rotated"]
        return rotated[::4]  # the unturned rows: the augmented images

    first = on_device(3)
    assert first.shape == (2, 3, 8, 8) and first.dtype == torch.float32
    # a flat image is the same under any crop or flip: normalised as the per-sample path does
    per_sample = resolve("rotnet")(rotnet_cfg("data.image_size=8")).sample_transform()({"__key__": "k", "image": flat})
    torch.testing.assert_close(first[0], per_sample["image"], atol=1e-5, rtol=0)
    # the noise image is a crop of itself reflection-padded by 4, maybe flipped
    from ssl_dist.augment import MEAN, STD

    normalised = (uint8[1:].float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    padded = F.pad(normalised, (4, 4, 4, 4), mode="reflect")[0]
    crops = [c.flip(-1) if flip else c for y in range(9) for x in range(9) for flip in (False, True)
             for c in [padded[:, y:y + 8, x:x + 8]]]
    assert any(torch.allclose(first[1], c, atol=1e-5) for c in crops)
    assert torch.equal(on_device(3), first)  # seeded by (seed, epoch, batch, rank): a resume redraws it
    assert not torch.equal(on_device(4)[1], first[1]) and not torch.equal(on_device(3, rank=1)[1], first[1])


def test_the_module_offers_encoder_features_and_exports_as_an_encoder():
    from ssl_dist import evaluate, export

    cfg = rotnet_cfg("model.width=16", "model.stem_stride=2")
    module = evaluate.build_module(cfg)  # what evaluation and export build for a rotnet checkpoint
    images = torch.rand(2, 3, 32, 32)
    module.eval()
    assert module.features(images).shape == (2, 128) and module(images).shape == (2, 4)
    state = export.encoder_state(module)
    assert state["fc.weight"].shape == (128, 128) and not any(k.startswith("classifier") for k in state)


# ---- the global batch through the real engine: 2 spawned gloo ranks (as tests/test_step.py)


def tiny_module() -> torch.nn.Module:
    # No BatchNorm: its batch statistics differ between a micro-batch and the whole batch.
    from ssl_dist.methods.rotnet import RotNetModel

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 16), torch.nn.Tanh())
    return RotNetModel(encoder, 16)


def micro_batches_of(rank: int) -> list[dict]:
    """This rank's ACCUMULATE micro-batches of MICRO images; rank 0 has 1 invalid slot, rank 1 has 3."""
    g = torch.Generator().manual_seed(100 + rank)
    invalid = {0: [2], 1: [0, 5, 7]}[rank]
    valid = torch.ones(MICRO * ACCUMULATE, dtype=torch.bool)
    valid[invalid] = False
    images = torch.rand(MICRO * ACCUMULATE, 3, SIZE, SIZE, generator=g)
    return [{"image": images[i:i + MICRO], "__valid__": valid[i:i + MICRO], "__batch__": 0}
            for i in range(0, len(images), MICRO)]


def run_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from ssl_dist.engine import build_engine
    from ssl_dist.methods.rotnet import RotNet
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    micro = micro_batches_of(rank)
    whole = [{"image": torch.cat([b["image"] for b in micro]), "__valid__": torch.cat([b["__valid__"] for b in micro]),
              "__batch__": 0}]
    for name, stage, accumulate, batches, batch_size in (("whole", 2, 1, whole, MICRO * ACCUMULATE),
                                                         ("cached", 2, ACCUMULATE, micro, MICRO),
                                                         ("zero3 cached", 3, ACCUMULATE, micro, MICRO)):
        cfg = rotnet_cfg(f"data.batch_size={batch_size}", f"train.accumulate={accumulate}",
                         f"train.zero_stage={stage}", "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0",
                         "optim.weight_decay=0", "optim.warmup_steps=0", "optim.schedule=constant",
                         "train.max_steps=10")
        method = RotNet(cfg, rank=rank)
        on_device = [method.on_device(dict(b), epoch=0, device=torch.device("cpu")) for b in batches]
        engine = build_engine(tiny_module(), cfg, WORLD)
        loss = optimizer_step(engine, method, on_device)
        params = dict(engine.module.named_parameters())
        with GatheredParameters(list(params.values())):  # ZeRO-3: whole tensors, on every rank
            out[f"{name}/loss{rank}"] = float(loss)
            if rank == 0:
                out[name] = {n: p.detach().clone() for n, p in params.items()}
    dist.barrier()  # nobody tears its group down while a peer still communicates
    dist.destroy_process_group()


def test_two_ranks_take_the_global_batch_step_whole_and_gradient_cached():
    from ssl_dist.methods.rotnet import rotate_all

    results = spawn_ranks(run_rank)
    # reference: one process, the valid images of both ranks, one SGD step (lr 0.5)
    batches = [b for rank in range(WORLD) for b in micro_batches_of(rank)]
    images = torch.cat([b["image"] for b in batches])[torch.cat([b["__valid__"] for b in batches])]
    module = tiny_module()
    rotated, labels = rotate_all(images)
    reference = F.cross_entropy(module(rotated), labels)
    reference.backward()
    expected = {n: p.detach() - 0.5 * p.grad for n, p in module.named_parameters()}
    for way in ("whole", "cached", "zero3 cached"):
        mean_of_ranks = (results[f"{way}/loss0"] + results[f"{way}/loss1"]) / 2  # what is logged
        assert mean_of_ranks == pytest.approx(float(reference), rel=1e-5), way
        assert results[way].keys() == expected.keys()
        for name, want in expected.items():
            torch.testing.assert_close(results[way][name], want, rtol=1e-5, atol=1e-6, msg=f"{way}: {name}")


# ---- the loss falls on real CIFAR-10 images: a small ResNet, one rank of the real engine


STEPS, BATCH = 40, 32


def run_training(rank: int, port: int, paths: list[str], out: dict) -> None:
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.methods.rotnet import RotNet
    from ssl_dist.step import optimizer_step

    join_group(rank, port, world=1)
    cfg = rotnet_cfg("model.width=16", "model.stem_stride=2", f"data.batch_size={BATCH}", "optim.lr=3e-3",
                     "optim.warmup_steps=0", "optim.schedule=constant", f"train.max_steps={STEPS}")
    method = RotNet(cfg, rank=rank)
    transform = method.sample_transform()
    torch.manual_seed(0)
    engine = build_engine(method.build_module(), cfg, 1)
    losses = []
    for step in range(STEPS):
        chosen = [paths[(step * BATCH + i) % len(paths)] for i in range(BATCH)]
        images = torch.stack([transform({"__key__": p, "image": Image.open(p).convert("RGB")})["image"] for p in chosen])
        batch = method.on_device({"image": images, "__batch__": step}, epoch=0, device=engine.device)
        losses.append(float(optimizer_step(engine, method, [batch])))
    out["losses"] = losses
    dist.destroy_process_group()


def test_the_loss_falls_on_cifar_images(tmp_path):
    paths = sorted(str(p) for p in cifar_slice(tmp_path / "cifar", per_class=30).rglob("*.jpg"))
    assert len(paths) == 300
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    paths = [paths[i] for i in order]  # batches of mixed classes (the folder is sorted by class)
    losses = spawn_ranks(run_training, paths, world=1)["losses"]
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert start > math.log(4) - 0.1  # at chance (four balanced classes) or above, untrained
    assert end < start - 0.25 and end < math.log(4) - 0.25, losses  # here ~1.53 -> ~1.05
