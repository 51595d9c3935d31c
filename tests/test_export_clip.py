"""`ssl-dist export` of an image-text checkpoint (method.name=clip, siglip): both towers as
open_clip loads them. The checkpoints are written by real DeepSpeed ZeRO-2 engines after one
optimizer step, in a spawned rank that also records the engines' embeddings of fixed inputs;
the export is then loaded by open_clip alone in a fresh process (no ssl_dist, DeepSpeed or
Ray there) and must give those embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssl_dist import checkpoint, config, export
from ssl_dist.cli import main

# The user's own model config (as jobs/configs/clip-tiny.json): its image size (48) is not the
# one trained at (data.image_size=32), and it has no SigLIP bias.
TINY_ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = ["a photo of a cat.", "a blurry photo of a dog.", "itap of the ship.", "a truck"]
SIMCLR = ("model.proj_hidden_dim=32", "model.proj_dim=8", "model.width=8")


def overrides(method: str, arch: Path) -> list[str]:
    if method == "simclr":
        return [*SIMCLR, "data.batch_size=4"]
    return [f"method.name={method}", f"model.clip_arch={arch}", "data.image_size=32", "data.augment=per_sample",
            "data.batch_size=4"]


class StreamStub:
    """What `checkpoint.save` reads of a loader: its global batch and its stream state."""

    class layout:
        global_batch = 4

    def state_dict(self):
        return {"epoch": 0}


def train_and_save(rank: int, port: int, root: str, arch: str, images: torch.Tensor, out: dict) -> None:
    """In a spawned rank of a gloo group of one: for each method a real DeepSpeed ZeRO-2 engine
    takes one optimizer step (so that the weights are no seed's initialisation) on these
    images and captions, saves a checkpoint, and records its embeddings of them."""
    import torch.distributed as dist

    from ranks import join_group
    from ssl_dist import methods, model
    from ssl_dist.engine import build_engine

    join_group(rank, port, world=1)
    tokens = model.build_tokenizer(arch)(CAPTIONS)
    for name in ("clip", "siglip", "simclr"):
        cfg = config.load(None, overrides(name, Path(arch)))
        method = methods.resolve(name)(cfg)
        engine = build_engine(method.build_module(), cfg, 1, micro_batch=4)
        if name != "simclr":
            engine.backward(method.loss(method.forward(engine, {"image": images, "tokens": tokens}), None))
            engine.step()
        folder = Path(root) / name / checkpoint.checkpoint_name(1)
        folder.mkdir(parents=True)
        checkpoint.save(folder, engine=engine, loader=StreamStub(), state=checkpoint.TrainState(1, 4), rank=0,
                        world_size=1, config=cfg, batch=checkpoint.BatchPlan(global_batch=4, per_worker=4, note=None))
        if name != "simclr":
            engine.module.eval()
            with torch.no_grad():
                out[name] = {"image": engine.module.features(images), "text": engine.module.encode_text(tokens),
                             "tokens": tokens, "logit_scale": engine.module.logit_scale.detach().clone(),
                             "logit_bias": None if engine.module.logit_bias is None
                             else engine.module.logit_bias.detach().clone()}
        out[f"{name}_checkpoint"] = str(folder)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"clip"/"siglip": the engine's outputs on `images` and CAPTIONS, "<method>_checkpoint":
    its folder (simclr too), "images": (4, 3, 32, 32), "arch": the user's JSON path}."""
    from ranks import spawn_ranks

    root = tmp_path_factory.mktemp("clip-export")
    arch = root / "tiny-user-clip.json"
    arch.write_text(json.dumps(TINY_ARCH))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    found = spawn_ranks(train_and_save, str(root), str(arch), images, world=1)
    return {**found, "images": images, "arch": str(arch)}


# Run with the export folders, the user's arch JSON, the inputs file and the results file:
# open_clip only, both ways of loading, plus the image tower alone and open_clip's tokenizer
# and preprocessing.
OPEN_CLIP_ONLY = textwrap.dedent("""
    import json, sys, torch, open_clip, safetensors.torch
    from PIL import Image
    folders, arch_json, inputs, results = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    images, tokens = torch.load(inputs)
    open_clip.add_model_config(arch_json)  # the user's JSON arch, registered under its file name
    arch = arch_json.rsplit("/", 1)[-1].removesuffix(".json")
    picture = Image.new("RGB", (40, 56), (200, 30, 90))
    picture.paste((10, 220, 60), (5, 10, 30, 50))
    out = {}
    for method, folder in folders.items():
        spec = json.load(open(f"{folder}/encoder.json"))
        models = {
            "local-dir": open_clip.create_model_and_transforms(f"local-dir:{folder}"),
            "arch": open_clip.create_model_and_transforms(arch, pretrained=f"{folder}/open_clip_model.safetensors",
                                                          **spec["open_clip"]["create_kwargs"]),
        }
        for form, (model, _, preprocess) in models.items():
            model.eval()
            with torch.no_grad():
                bias = None if model.logit_bias is None else model.logit_bias.detach().clone()
                out[method, form] = {"image": model.encode_image(images), "text": model.encode_text(tokens),
                                     "logit_scale": model.logit_scale.detach().clone(), "logit_bias": bias,
                                     "preprocessed": preprocess(picture)}
        tower = open_clip.create_model(f"local-dir:{folder}", load_weights=False).visual.eval()
        tower.load_state_dict(safetensors.torch.load_file(f"{folder}/encoder.safetensors"))  # strict
        with torch.no_grad():
            out[method, "encoder"] = tower(images)
        out[method, "tokens"] = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    assert not {"ssl_dist", "deepspeed", "ray"} & set(sys.modules), "open_clip alone loads the export"
    torch.save(out, results)
""")


def test_export_loaded_by_open_clip_in_a_fresh_process_gives_the_engines_embeddings(trained, tmp_path):
    folders = {}
    for method in ("clip", "siglip"):
        folders[method] = str(tmp_path / method)
        spec = export.export_encoder(trained[f"{method}_checkpoint"], folders[method])
        assert sorted(p.name for p in Path(folders[method]).iterdir()) == [
            "encoder.json", "encoder.safetensors", "open_clip_config.json", "open_clip_model.safetensors"]
        assert json.loads((Path(folders[method]) / "encoder.json").read_text()) == spec
        assert (spec["format"], spec["method"], spec["arch"]) == ("ssl_dist.open_clip/1", method, trained["arch"])
        assert (spec["feature_dim"], spec["image_size"], spec["step"]) == (16, 32, 1)
        expected_kwargs = {"force_image_size": 32} | ({"init_logit_bias": -10.0} if method == "siglip" else {})
        assert spec["open_clip"]["create_kwargs"] == expected_kwargs
        assert spec["open_clip"]["logit_scale"] == pytest.approx(float(trained[method]["logit_scale"]))
        model_cfg = json.loads((Path(folders[method]) / "open_clip_config.json").read_text())["model_cfg"]
        assert model_cfg["vision_cfg"]["image_size"] == 32  # trained at data.image_size, not the JSON's 48
    inputs = tmp_path / "inputs.pt"
    torch.save((trained["images"], trained["clip"]["tokens"]), inputs)
    script = f"CAPTIONS = {CAPTIONS!r}\n" + OPEN_CLIP_ONLY
    results = tmp_path / "results.pt"
    done = subprocess.run([sys.executable, "-c", script, json.dumps(folders), trained["arch"], str(inputs),
                           str(results)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    got = torch.load(results)

    from ssl_dist import evaluate

    for method in ("clip", "siglip"):
        engine = trained[method]
        for form in ("local-dir", "arch"):
            loaded = got[method, form]
            torch.testing.assert_close(loaded["image"], engine["image"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded["text"], engine["text"], rtol=1e-5, atol=1e-6)
            assert loaded["logit_scale"].shape == () and float(loaded["logit_scale"]) == float(engine["logit_scale"])
            if method == "siglip":
                assert float(loaded["logit_bias"]) == float(engine["logit_bias"])
                assert float(engine["logit_bias"]) != -10.0  # trained, not the initial value open_clip would build
            else:
                assert loaded["logit_bias"] is None
        torch.testing.assert_close(got[method, "encoder"], engine["image"], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[method, "tokens"], engine["tokens"])  # open_clip's tokenizer of the export: ours

    # open_clip's preprocessing of the export is the view ssl-dist evaluates with.
    import numpy as np
    from PIL import Image

    picture = Image.new("RGB", (40, 56), (200, 30, 90))
    picture.paste((10, 220, 60), (5, 10, 30, 50))
    cfg = config.load(None, overrides("clip", Path(trained["arch"])))
    view = evaluate.eval_view(cfg)({"__key__": "k", "image": picture})["image"]
    assert np.allclose(got["clip", "local-dir"]["preprocessed"].numpy(), view.numpy(), atol=1e-5)  # bicubic: 0.2 off


def test_an_export_replaces_the_one_already_in_the_folder(trained, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", trained["clip_checkpoint"], str(out)]) == 0
    printed = capsys.readouterr().out
    assert "both towers" in printed and f"local-dir:{out}" in printed and "open_clip_model.safetensors" in printed
    clip_files = sorted(p.name for p in out.iterdir())

    # A SimCLR checkpoint exported over it: the CLIP files are gone, not left beside another model's encoder.
    assert main(["export", trained["simclr_checkpoint"], str(out)]) == 0
    assert "wrote the encoder of" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.safetensors"]
    spec = json.loads((out / "encoder.json").read_text())
    assert spec["format"] == export.FORMAT and spec["feature_dim"] == 64 and spec["width"] == 8
    assert export.load_encoder(str(out))(torch.zeros(1, 3, 32, 32)).shape == (1, 64)

    # And back: the CLIP export overwrites the SimCLR encoder.
    assert main(["export", trained["clip_checkpoint"], str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == clip_files
    assert json.loads((out / "encoder.json").read_text())["format"] == "ssl_dist.open_clip/1"
