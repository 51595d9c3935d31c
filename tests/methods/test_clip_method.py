"""method.name=clip / siglip (`ssl_dist/methods/clip.py`): the loader-worker transform
tokenizes to the model's context length, a bad model.clip_arch is one clear error on the
driver, and gradient caching through the real 2-rank DeepSpeed engine (gloo) gives the update
of the whole-batch step, logit scale and bias included."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from ranks import join_group, spawn_ranks

from ssl_dist import config
from ssl_dist.launch import LaunchError, check_method
from ssl_dist.methods import resolve

TINY = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "clip-tiny.json")
MICRO, ACCUMULATE, WORLD, VOCAB, CONTEXT = 4, 3, 2, 500, 16


def clip_cfg(*overrides: str, method: str = "clip", arch: str = TINY) -> config.Config:
    return config.load(None, [f"method.name={method}", f"model.clip_arch={arch}", *overrides])


@pytest.mark.parametrize("method", ["clip", "siglip"])
def test_transform_gives_normalised_crops_and_tokens_of_the_context_length(method):
    cfg = clip_cfg(method=method)
    transform = pickle.loads(pickle.dumps(resolve(method)(cfg).sample_transform()))  # as loader workers get it
    out = transform({"__key__": "k0", "image": Image.new("RGB", (48, 40), (200, 10, 10)), "txt": "a red square"})
    assert set(out) == {"__key__", "image", "tokens"} and out["__key__"] == "k0"
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
    context = json.loads(Path(TINY).read_text())["text_cfg"]["context_length"]
    assert out["tokens"].shape == (context,) and out["tokens"].dtype == torch.long
    assert (out["tokens"] != 0).sum() == 5  # start, "a", "red", "square", end; the rest padding


@pytest.mark.parametrize("arch", ["ViT-Q-99", "no/such/file.json", ""])
def test_a_bad_clip_arch_is_one_clear_error_on_the_driver(arch):
    with pytest.raises(LaunchError, match=r"model.clip_arch=.*(open_clip.list_models\(\).*ViT-B-32|no such JSON)"):
        check_method(clip_cfg(arch=arch), {})


def noise_image() -> Image.Image:
    """A seeded 48 x 40 RGB image of uniform noise: every crop of it differs."""
    rng = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=rng, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("method", ["clip", "siglip"])
def test_per_batch_augmentation_crops_on_the_device_reproducibly(method):
    cfg = clip_cfg("data.augment=per_batch", method=method)
    check_method(cfg, {})  # accepted on the driver
    transform = pickle.loads(pickle.dumps(resolve(method)(cfg).sample_transform()))
    flat = Image.new("RGB", (48, 40), (200, 10, 10))
    noise = noise_image()
    samples = [transform({"__key__": f"k{i}", "image": im, "txt": "a red square"}) for i, im in enumerate([flat, noise])]
    assert all(s["image"].dtype == torch.uint8 and s["image"].shape == (3, 32, 32) for s in samples)

    def on_device(batch_index, epoch=0, rank=0):
        batch = {"image": torch.stack([s["image"] for s in samples]), "__batch__": batch_index}
        return resolve(method)(cfg, rank=rank).on_device(batch, epoch=epoch, device=torch.device("cpu"))["image"]

    first = on_device(3)
    assert first.shape == (2, 3, 32, 32) and first.dtype == torch.float32
    # a flat image is the same under any crop: normalised as the per-sample path normalises it
    per_sample = resolve(method)(clip_cfg(method=method)).sample_transform()({"__key__": "k", "image": flat, "txt": "x"})
    torch.testing.assert_close(first[0], per_sample["image"], atol=1e-5, rtol=0)
    assert torch.equal(on_device(3), first)  # seeded by (seed, epoch, batch, rank): a resume redraws it
    assert not torch.equal(on_device(4)[1], first[1]) and not torch.equal(on_device(3, rank=1)[1], first[1])


def test_builtin_names_resolve():
    assert resolve("clip").name == "clip" and resolve("siglip").name == "siglip"


# ---- gradient caching through the real engine: 2 spawned gloo ranks (as tests/test_step.py)


def batches_of(rank: int) -> list[dict]:
    """This rank's ACCUMULATE micro-batches of MICRO (image, tokens) pairs (fixed random data)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [{"image": torch.randn(MICRO, 3, 32, 32, generator=g),
             "tokens": torch.randint(1, VOCAB, (MICRO, CONTEXT), generator=g)} for _ in range(ACCUMULATE)]


def run_rank(rank: int, port: int, arch: str, out: dict) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from ssl_dist.engine import build_engine
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    micro = batches_of(rank)
    whole = [{k: torch.cat([b[k] for b in micro]) for k in ("image", "tokens")}]
    for method in ("clip", "siglip"):
        for name, stage, accumulate, batches, batch_size in (("whole", 2, 1, whole, MICRO * ACCUMULATE),
                                                             ("cached", 2, ACCUMULATE, micro, MICRO),
                                                             ("zero3 cached", 3, ACCUMULATE, micro, MICRO)):
            cfg = clip_cfg(f"data.batch_size={batch_size}", f"train.accumulate={accumulate}",
                           f"train.zero_stage={stage}",
                           "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0",
                           "optim.warmup_steps=0", "loss.chunk_size=5", "train.max_steps=10",
                           method=method, arch=arch)
            instance = resolve(method)(cfg, rank=rank)
            torch.manual_seed(0)  # as the loop: same initial weights on every rank and both ways
            engine = build_engine(instance.build_module(), cfg, WORLD)
            loss = optimizer_step(engine, instance, batches)
            params = dict(engine.module.named_parameters())
            with GatheredParameters(list(params.values())):  # ZeRO-3: whole tensors, on every rank
                if rank == 0:
                    out[f"{method}/{name}"] = (float(loss), {n: p.detach().clone() for n, p in params.items()})
    dist.barrier()  # nobody tears its group down while a peer still communicates
    dist.destroy_process_group()


def test_gradient_caching_equals_the_whole_batch_step_under_zero2_and_zero3(tmp_path):
    # The tiny towers with a 500-token vocabulary: the same code, a tenth of the parameters.
    arch = tmp_path / "clip-micro.json"
    spec = json.loads(Path(TINY).read_text())
    spec["text_cfg"].update(vocab_size=VOCAB, context_length=CONTEXT)
    arch.write_text(json.dumps(spec))
    results = spawn_ranks(run_rank, str(arch))
    for method, initial in (("clip", {"logit_scale": 2.6593}), ("siglip", {"logit_scale": 2.3026, "logit_bias": -10})):
        loss_whole, p_whole = results[f"{method}/whole"]
        for name, value in initial.items():  # the step moved the method's state...
            assert p_whole[name].shape == (1,) and abs(float(p_whole[name]) - value) > 1e-4, (method, name)
        for way in ("cached", "zero3 cached"):  # ...and every parameter the same every way
            loss_cached, p_cached = results[f"{method}/{way}"]
            assert loss_cached == pytest.approx(loss_whole, rel=1e-5), (method, way)
            assert p_cached.keys() == p_whole.keys()
            for name, a in p_whole.items():  # atol: each micro-batch runs the text tower to its own
                # longest caption (text_prefix.py), the whole batch to its: sums of another length
                torch.testing.assert_close(p_cached[name], a, rtol=1e-5, atol=2e-6,
                                           msg=lambda m, name=name: f"{method} {way}: {name}: {m}")


@pytest.mark.parametrize("method, mean_of", [("clip", "open_clip"), ("simclr", "augment")])
def test_evaluation_normalises_images_as_the_method_trained_on_them(method, mean_of):
    # kNN, zero-shot and retrieval read images through the method's eval_view: a CLIP
    # checkpoint was once evaluated on inputs normalised with SimCLR's CIFAR statistics.
    import open_clip

    from ssl_dist import augment, evaluate

    cfg = clip_cfg(method=method)
    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    image = evaluate.eval_view(cfg)({"__key__": "k", "image": grey})["image"]
    mean, std = ((open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD) if mean_of == "open_clip"
                 else (augment.MEAN, augment.STD))
    want = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert image.shape == (3, cfg.data.image_size, cfg.data.image_size)
    torch.testing.assert_close(image[:, 0, 0], want, rtol=1e-5, atol=1e-5)


def test_the_per_sample_crop_is_open_clips_training_crop():
    """Same RNG state, same image: our loader's crop equals open_clip's training transform
    at its default augmentation (RandomResizedCrop at area 0.9-1, bicubic, then its mean and
    std) pixel for pixel."""
    import open_clip

    ours = resolve("clip")(clip_cfg()).sample_transform()
    theirs = open_clip.image_transform(32, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                       std=open_clip.OPENAI_DATASET_STD,
                                       aug_cfg=open_clip.AugmentationCfg())
    noise = noise_image()
    for seed in range(4):
        torch.manual_seed(seed)
        got = ours({"__key__": "k", "image": noise, "txt": "x"})["image"]
        torch.manual_seed(seed)
        torch.testing.assert_close(got, theirs(noise), atol=1e-5, rtol=0)
