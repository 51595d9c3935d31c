"""A timm encoder (model.arch=timm/<name>) through the real 2-rank DeepSpeed engine at ZeRO 2
and 3 (spawned gloo ranks), its checkpoint exported and rebuilt by timm alone in a fresh
process (no ssl_dist, DeepSpeed or Ray there), and scored by `ssl-dist evaluate` (kNN)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssl_dist import checkpoint, config, export

WORLD, BATCH, STEPS = 2, 4, 2
# As tests/test_model.py's: 32 px images in 4x4 patches of 8 px, two blocks of width 64.
TINY_VIT = ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=32",
            "model.arch_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
            "model.proj_hidden_dim=32", "model.proj_dim=16"]


class StreamStub:
    """What `checkpoint.save` reads of a loader: its global batch and its stream state."""

    class layout:
        global_batch = WORLD * BATCH

    def state_dict(self):
        return {"epoch": 0}


def train_and_save(rank: int, port: int, root: str, images: torch.Tensor, out: dict) -> None:
    """Each rank of a gloo group of 2, for ZeRO 2 then 3: SimCLR with the tiny timm ViT takes
    STEPS optimizer steps on its own random views, saves a checkpoint into root/zero<stage>,
    and records its losses, its full parameters (gathered at ZeRO-3) before and after, and
    the engine module's features of `images`."""
    import torch.distributed as dist

    from ranks import join_group, save_checkpoint_as_ray_train
    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    join_group(rank, port, world=WORLD)
    for stage in (2, 3):
        cfg = config.load(None, [*TINY_VIT, f"train.zero_stage={stage}", f"data.batch_size={BATCH}",
                                 f"run.num_workers={WORLD}", "optim.warmup_steps=0", "optim.lr=0.01",
                                 "train.max_steps=10"])
        method = SimCLR(cfg, rank=rank)
        torch.manual_seed(0)  # the same initial weights on every rank, as the loop's seed gives
        module = method.build_module()
        before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        engine = build_engine(module, cfg, WORLD)
        g = torch.Generator().manual_seed(10 * stage + rank)
        losses = [float(optimizer_step(engine, method, [{"view1": torch.rand(BATCH, 3, 32, 32, generator=g),
                                                         "view2": torch.rand(BATCH, 3, 32, 32, generator=g)}]))
                  for _ in range(STEPS)]
        params = list(engine.module.parameters())
        if stage == 3:
            from deepspeed import zero

            with zero.GatheredParameters(params):
                after = torch.cat([p.detach().flatten().clone() for p in params])
        else:
            after = torch.cat([p.detach().flatten().clone() for p in params])
        engine.module.eval()
        with torch.no_grad():  # every rank: at ZeRO-3 the forward hooks gather the parameters collectively
            features = engine.module.features(images)
        folder = Path(root) / f"zero{stage}" / checkpoint.checkpoint_name(STEPS)
        save_checkpoint_as_ray_train(folder, rank=rank, world=WORLD, scratch=Path(root) / "ranks", engine=engine,
                                     loader=StreamStub(), state=checkpoint.TrainState(STEPS, STEPS * 8), config=cfg,
                                     batch=checkpoint.BatchPlan(global_batch=WORLD * BATCH, per_worker=BATCH,
                                                                note=None))
        out[stage, rank] = {"losses": losses, "before": before, "after": after, "features": features,
                            "checkpoint": str(folder)}
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{(stage, rank): what `train_and_save` recorded, "images": (4, 3, 32, 32)}."""
    from ranks import spawn_ranks

    root = tmp_path_factory.mktemp("timm-export")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {**spawn_ranks(train_and_save, str(root), images, world=WORLD), "images": images}


@pytest.mark.parametrize("stage", [2, 3])
def test_timm_vit_trains_in_the_2_rank_engine_and_the_ranks_agree(trained, stage):
    first, second = trained[stage, 0], trained[stage, 1]
    assert all(math.isfinite(loss) for loss in first["losses"] + second["losses"])
    assert first["after"].shape == first["before"].shape  # every parameter, gathered at ZeRO-3
    moved = (first["after"] - first["before"]).abs()
    assert moved.max() > 1e-4 and (moved > 0).float().mean() > 0.5  # the steps moved the weights
    torch.testing.assert_close(second["after"], first["after"], rtol=0, atol=0)  # ranks agree
    torch.testing.assert_close(second["features"], first["features"])


# Run with the export folder, the inputs file and the results file: timm, torch and safetensors
# only, exactly as the spec says to rebuild the encoder.
TIMM_ONLY = textwrap.dedent("""
    import json, sys, torch, timm, safetensors.torch
    folder, inputs, results = sys.argv[1:4]
    spec = json.load(open(f"{folder}/encoder.json"))
    model = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **spec["arch_kwargs"]).eval()
    model.load_state_dict(safetensors.torch.load_file(f"{folder}/encoder.safetensors"))  # strict
    with torch.no_grad():
        features = model(torch.load(inputs))
    assert features.shape[1] == spec["feature_dim"]
    assert not {"ssl_dist", "deepspeed", "ray"} & set(sys.modules), "timm alone rebuilds the export"
    torch.save(features, results)
""")


@pytest.mark.parametrize("stage", [2, 3])
def test_export_rebuilt_by_timm_in_a_fresh_process_gives_the_engines_features(trained, tmp_path, stage):
    folder = tmp_path / "export"
    spec = export.export_encoder(trained[stage, 0]["checkpoint"], str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["encoder.json", "encoder.safetensors"]
    assert json.loads((folder / "encoder.json").read_text()) == spec
    assert (spec["format"], spec["arch"], spec["timm_name"]) == ("ssl_dist.timm/1", "timm/vit_tiny_patch16_224",
                                                                 "vit_tiny_patch16_224")
    assert spec["arch_kwargs"] == {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    assert (spec["feature_dim"], spec["image_size"], spec["step"]) == (64, 32, STEPS)
    assert not {"cifar_stem", "stem_stride", "width"} & set(spec)  # ResNet options: not this encoder's
    torch.save(trained["images"], tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", TIMM_ONLY, str(folder), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "results.pt")], check=True, timeout=300)
    features = torch.load(tmp_path / "results.pt")
    torch.testing.assert_close(features, trained[stage, 0]["features"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and ssl_dist's own loader of an export
        torch.testing.assert_close(export.load_encoder(str(folder))(trained["images"]), features)


def test_evaluate_scores_a_timm_checkpoint_by_knn(trained, tmp_path, capsys):
    from cifar import cifar_slice

    from ssl_dist import cli
    from ssl_dist.shards import make_shards

    for split in ("train", "test"):
        make_shards(str(cifar_slice(tmp_path / split, per_class=3, split=split)), str(tmp_path / f"{split}-shards"),
                    samples_per_shard=30)
    assert cli.main(["evaluate", trained[3, 0]["checkpoint"], "--train", str(tmp_path / "train-shards"),
                     "--test", str(tmp_path / "test-shards"), "--k", "5", "--no-linear-probe", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= scores["knn_top1"] <= 1 and 0 <= scores["knn_top1_random_init"] <= 1
