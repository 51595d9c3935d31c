"""Zero-shot classification and image-text retrieval (ssl_dist.zero_shot), and `ssl-dist evaluate
--zero-shot/--retrieval`: references computed by hand, and a real tiny open_clip model on real
CIFAR-10 images checked against the CLIP recipe written out with plain torch."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifar import cifar_slice
from ssl_dist import config, evaluate, zero_shot
from ssl_dist.cli import main
from ssl_dist.model import build_model
from ssl_dist.shards import index_shards, make_shards

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def labeled_url(tmp_path_factory) -> str:
    """3 real CIFAR-10 test images of each of the 10 classes, as shards with "classes"."""
    root = tmp_path_factory.mktemp("zs")
    make_shards(str(cifar_slice(root / "src", per_class=3, split="test")), str(root / "shards"),
                samples_per_shard=12, workers=1)
    return str(root / "shards")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model, tokenizer) of a randomly initialised tiny open_clip model from a JSON config."""
    import open_clip

    path = tmp_path_factory.mktemp("arch") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model("tiny-clip-test").eval(), open_clip.get_tokenizer("tiny-clip-test")


# ---- the math, against hand-made embeddings --------------------------------------------------


def test_classifier_and_top1_on_hand_made_embeddings():
    table = {"a cat.": [3.0, 0.0], "the cat!": [0.0, 4.0], "a dog.": [0.0, -2.0], "the dog!": [0.0, -1.0]}
    texts: list[str] = []

    def tokenizer(strings):  # token i = the i-th string seen
        texts.extend(strings)
        return torch.arange(len(texts) - len(strings), len(texts))

    def encode_text(tokens):
        return torch.tensor([table[texts[i]] for i in tokens.tolist()])

    classifier = zero_shot.zero_shot_classifier(encode_text, tokenizer, ["cat", "dog"], ["a {}.", "the {}!"])
    r = 2 ** -0.5  # cat: mean of (1, 0) and (0, 1), normalised; dog: (0, -1) twice
    assert torch.allclose(classifier, torch.tensor([[r, 0.0], [r, -1.0]]))
    images = torch.tensor([[1.0, 1.0], [1.0, -5.0], [-1.0, 0.1]])  # -> cat, dog, dog
    assert zero_shot.zero_shot_top1(images, torch.tensor([0, 1, 0]), classifier) == pytest.approx(2 / 3)
    assert zero_shot.zero_shot_top1(images, torch.tensor([0, 1, 1]), classifier) == 1.0


def test_retrieval_recall_on_hand_made_pairs():
    eye = torch.eye(3)
    images, texts = eye, eye[[0, 2, 1]]  # pair 0 matches; pairs 1 and 2 each rank their true match 2nd
    scores = zero_shot.retrieval_recall(images, texts, ks=(1, 2))
    assert scores == {"image_to_text_R@1": pytest.approx(1 / 3), "image_to_text_R@2": 1.0,
                      "text_to_image_R@1": pytest.approx(1 / 3), "text_to_image_R@2": 1.0}
    # Not symmetric: each image's nearest text is its own (image 1: 0.67 to text 1, 0 to text 0), but
    # text 1, (1, 0.9)/|.|, is nearer image 0 (0.74) than its own image 1 (0.67).
    images, texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.9]])
    scores = zero_shot.retrieval_recall(images, texts, ks=(1,))
    assert scores == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 0.5}


def test_retrieval_recall_equals_a_plain_loop_in_any_chunking():
    torch.manual_seed(1)
    images, texts = torch.randn(37, 8), torch.randn(37, 8)
    sims = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T
    expected = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranks = [int((s[i].argsort(descending=True) == i).nonzero()) for i in range(len(s))]
        expected.update({f"{name}_R@{k}": sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)})
    for chunk in (1, 5, 1024):
        got = zero_shot.retrieval_recall(images, texts, chunk=chunk)
        assert got == pytest.approx(expected)


# ---- a real tiny open_clip model on real CIFAR images ----------------------------------------


def test_zero_shot_top1_of_a_tiny_open_clip_model_equals_the_recipe_written_out(labeled_url, tiny_clip):
    model, tokenizer = tiny_clip
    names = zero_shot.class_names(labeled_url)
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(zero_shot.CIFAR10_TEMPLATES) == 18
    templates = zero_shot.CIFAR10_TEMPLATES[::5]  # 4 of the 18: the loop below encodes prompts one by one
    classifier = zero_shot.zero_shot_classifier(model.encode_text, tokenizer, names, templates)
    feats, labels = zero_shot.embed_labeled(model.encode_image, labeled_url, image_size=32)
    assert feats.shape == (30, 16) and sorted(labels.tolist()) == sorted(list(range(10)) * 3)

    with torch.no_grad():  # the recipe, one prompt and one image at a time
        columns = []
        for name in names:
            prompts = [F.normalize(model.encode_text(tokenizer([t.format(name)]))[0], dim=0)
                       for t in templates]
            columns.append(F.normalize(torch.stack(prompts).mean(0), dim=0))
        images = torch.cat([x for x, _ in evaluate.iter_labeled(labeled_url, image_size=32, batch_size=7)])
        correct = 0
        for image, label in zip(images, labels.tolist()):
            emb = F.normalize(model.encode_image(image[None])[0], dim=0)
            correct += int(torch.stack([emb @ c for c in columns]).argmax()) == label
    assert torch.allclose(classifier, torch.stack(columns, dim=1), atol=1e-5)
    assert zero_shot.zero_shot_top1(feats, labels, classifier) == correct / 30


def captioned_shards(folder: Path, images: list[Path], captions: list[str]) -> str:
    """Shards of KEY.jpg + KEY.txt pairs, written with tarfile and indexed by `ssl-dist shards index`."""
    folder.mkdir(parents=True)
    for number in range(0, len(images), 4):
        with tarfile.open(folder / f"pairs-{number // 4:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(number, min(number + 4, len(images))):
                for ext, data in (("jpg", images[i].read_bytes()), ("txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"pair{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    index_shards(str(folder), workers=1)
    return str(folder)


def test_retrieval_of_a_tiny_open_clip_model_on_captioned_shards(tmp_path, tiny_clip):
    model, tokenizer = tiny_clip
    src = cifar_slice(tmp_path / "src", per_class=1, split="test")
    images = sorted(src.glob("*/*.jpg"))
    captions = [f"a photo of a {p.parent.name}." for p in images]
    url = captioned_shards(tmp_path / "pairs", images, captions)
    pairs = list(zero_shot.iter_captioned(url, image_size=32, batch_size=3, limit=7))
    assert [len(batch) for _, batch in pairs] == [3, 3, 1] and pairs[0][0].shape == (3, 3, 32, 32)
    assert [c for _, batch in pairs for c in batch] == captions[:7]  # manifest order, bounded
    image_emb, text_emb = zero_shot.embed_captioned(model.encode_image, model.encode_text, tokenizer, url,
                                                    image_size=32)
    with torch.no_grad():
        assert torch.allclose(text_emb, model.encode_text(tokenizer(captions)), atol=1e-5)
    scores = zero_shot.retrieval_recall(image_emb, text_emb)
    assert set(scores) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    make_shards(str(src), str(tmp_path / "labeled"), workers=1)
    with pytest.raises(evaluate.EvaluationError, match="has no caption"):  # labeled shards are not pairs
        next(zero_shot.iter_captioned(str(tmp_path / "labeled"), image_size=32))


# ---- errors -----------------------------------------------------------------------------------


def test_read_templates(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\n\n  itap of the {}.  \n")
    assert zero_shot.read_templates(str(good)) == ("a photo of a {}.", "itap of the {}.")
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of a cat.\n")
    with pytest.raises(evaluate.EvaluationError, match=r"bad.txt, line 2: 'a photo of a cat.' has no \{\}"):
        zero_shot.read_templates(str(bad))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(evaluate.EvaluationError, match="holds no template"):
        zero_shot.read_templates(str(tmp_path / "empty.txt"))
    with pytest.raises(evaluate.EvaluationError, match="cannot be read"):
        zero_shot.read_templates(str(tmp_path / "missing.txt"))


def test_zero_shot_on_shards_without_class_names_is_one_clear_error(tmp_path, labeled_url):
    import shutil

    url = tmp_path / "unnamed"
    shutil.copytree(labeled_url, url)
    manifest = json.loads((url / "index.json").read_text())
    del manifest["classes"]
    (url / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(evaluate.EvaluationError, match=f"the shards at {url} list no class names.*ssl-dist shards make"):
        zero_shot.class_names(str(url))


def fake_checkpoint(folder: Path, module_state, *overrides: str) -> str:
    """A checkpoint folder as `checkpoint.weights` reads it (meta.json + the model file), no Ray."""
    cfg = config.load(None, ["train.zero_stage=2", *overrides])
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 1, "samples_seen": 1, "world_size": 1,
                                                  "config": config.to_dict(cfg)}))
    (folder / "stream-rank00000.json").write_text("{}")  # (a checkpoint from before part lists: complete)
    torch.save({"module": module_state, "ds_version": "0.19"}, folder / "deepspeed" / "mp_rank_00_model_states.pt")
    return str(folder)


SMALL = ("model.proj_hidden_dim=32", "model.proj_dim=8", "model.width=8")


def test_simclr_checkpoint_builds_the_same_module_and_has_no_text_tower(tmp_path, labeled_url, capsys):
    cfg = config.load(None, list(SMALL))
    torch.manual_seed(0)
    before = build_model(cfg.model)
    torch.manual_seed(0)
    through_method = evaluate.build_module(cfg)  # the Method contract gives SimCLR's module as before
    assert type(through_method) is type(before)
    assert all(torch.equal(a, b) for a, b in zip(through_method.state_dict().values(), before.state_dict().values()))

    ckpt = fake_checkpoint(tmp_path / "ckpt", before.state_dict(), *SMALL)
    loaded, _ = evaluate.load_checkpoint_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), before.state_dict().values()))
    for flag in ("--zero-shot", "--retrieval"):
        assert main(["evaluate", ckpt, flag, labeled_url]) == 2
        err = capsys.readouterr().err
        assert "method.name=simclr model, which has no text tower" in err and "Traceback" not in err
    assert main(["evaluate", ckpt]) == 2
    assert "evaluate needs --train and --test" in capsys.readouterr().err


def test_clip_checkpoint_evaluates_zero_shot_and_retrieval_through_the_cli(tmp_path, labeled_url, capsys):
    pytest.importorskip("ssl_dist.methods.clip")  # the clip method (another engineer's work)
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY_CLIP))
    overrides = ("method.name=clip", f"model.clip_arch={arch}", "data.image_size=32", "data.augment=per_sample")
    cfg = config.load(None, list(overrides))
    torch.manual_seed(3)
    module = evaluate.build_module(cfg)
    ckpt = fake_checkpoint(tmp_path / "ckpt", module.state_dict(), *overrides)
    src = cifar_slice(tmp_path / "src", per_class=1, split="test")
    images = sorted(src.glob("*/*.jpg"))
    pairs = captioned_shards(tmp_path / "pairs", images, [f"a photo of a {p.parent.name}." for p in images])
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na blurry photo of a {}.\n")
    assert main(["evaluate", ckpt, "--zero-shot", labeled_url, "--templates", str(templates),
                 "--retrieval", pairs, "--json"]) == 0
    out = capsys.readouterr().out
    scores = json.loads(out.strip().splitlines()[-1])
    assert "zero-shot top-1" in out and "same model at random initialisation" in out
    keys = ["zero_shot_top1"] + [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert set(scores) == set(keys) | {f"{key}_random_init" for key in keys}

    # The checkpoint's score is the recipe's on its own module (nothing lost on the way).
    from ssl_dist import model

    expected = evaluate.text_scores(module, model.build_tokenizer(str(arch)), cfg, zero_shot_url=labeled_url,
                                    templates=("a photo of a {}.", "a blurry photo of a {}."), retrieval_url=pairs)
    assert all(scores[key] == pytest.approx(value) for key, value in expected.items())
