"""The encoder's width and stem options, and loading an exported encoder of another width."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ssl_dist import config
from ssl_dist.export import SPEC, WEIGHTS, encoder_state, load_encoder
from ssl_dist.model import ContrastiveModel, build_encoder


def test_narrow_encoder_keeps_torchvision_names_at_half_the_channels():
    narrow, feature_dim = build_encoder("resnet18", cifar_stem=False, width=32)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    ours, theirs = narrow.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        if tensor.dim() == 4:  # conv kernels: both channel counts halved, except the RGB input
            out_channels, in_channels, *kernel = theirs[key].shape
            assert tensor.shape == (out_channels // 2, 3 if in_channels == 3 else in_channels // 2, *kernel), key
    assert feature_dim == 256
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    ratio = sum(p.numel() for p in reference.parameters()) / sum(p.numel() for p in narrow.parameters())
    assert 3.9 < ratio < 4.1  # a quarter of the parameters


@pytest.mark.parametrize("stride, side", [(1, 32), (2, 16)])
def test_cifar_stem_stride_sets_the_feature_map_size(stride, side):
    encoder, _ = build_encoder("resnet18", cifar_stem=True, stem_stride=stride, width=16)
    seen = {}
    encoder.layer1.register_forward_hook(lambda module, args, out: seen.update(shape=out.shape))
    encoder(torch.randn(1, 3, 32, 32))
    assert seen["shape"] == (1, 16, side, side)


def test_stem_stride_needs_the_cifar_stem():
    with pytest.raises(config.ConfigError, match="model.stem_stride=2.*cifar_stem=true"):
        config.load(None, ["model.stem_stride=2", "model.cifar_stem=false"])
    with pytest.raises(config.ConfigError, match="model.stem_stride=3"):
        config.load(None, ["model.stem_stride=3"])


def test_exported_narrow_encoder_loads_and_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    model = ContrastiveModel("resnet18", cifar_stem=True, stem_stride=2, width=24).eval()
    save_file(encoder_state(model), str(tmp_path / WEIGHTS))
    (tmp_path / SPEC).write_text(json.dumps({"arch": "resnet18", "cifar_stem": True, "stem_stride": 2, "width": 24,
                                             "feature_dim": model.feature_dim}))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(str(tmp_path))(images), model.features(images))


# ---- timm encoders (model.arch=timm/<name>) ---------------------------------------------------

# A ViT small enough for CPU tests: 32 px images in 4x4 patches of 8 px, two blocks of width 64.
TINY_VIT = ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=32",
            "model.arch_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
            "model.proj_hidden_dim=32", "model.proj_dim=16"]


def test_timm_vit_encoder_gives_its_pooled_features_and_the_projection_head():
    import timm

    from ssl_dist.model import build_model

    cfg = config.load(None, TINY_VIT)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert isinstance(model.encoder, timm.models.VisionTransformer) and model.feature_dim == 64
    assert len(model.encoder.blocks) == 2 and model.encoder.patch_embed.patch_size == (8, 8)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model.features(images).shape == (3, 64) and model(images).shape == (3, 16)
        # timm's own model of the same name and kwargs, with no classifier: the same features
        torch.manual_seed(0)
        theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                   **cfg.model.arch_kwargs).eval()
        assert theirs.state_dict().keys() == model.encoder.state_dict().keys()
        theirs.load_state_dict(model.encoder.state_dict())
        torch.testing.assert_close(theirs(images), model.features(images))


def test_a_timm_model_name_that_does_not_exist_is_refused_naming_the_closest():
    from ssl_dist.model import check_arch

    with pytest.raises(config.ConfigError) as err:
        check_arch(config.load(None, ["model.arch=timm/vit_smal_patch16_224"]))
    message = str(err.value)
    assert "model.arch=timm/vit_smal_patch16_224" in message and "timm/vit_small_patch16_224" in message
    assert "\n" not in message
    with pytest.raises(config.ConfigError, match="timm.list_models"):  # nothing close: where to look
        check_arch(config.load(None, ["model.arch=timm/nope"]))
    check_arch(config.load(None, TINY_VIT))  # a real one passes
    check_arch(config.load(None, ["model.arch=resnet18"]))


def test_timm_kwargs_it_does_not_take_or_images_it_cannot_read_are_refused():
    from ssl_dist.model import check_arch

    with pytest.raises(config.ConfigError, match="model.arch_kwargs.*imgsize"):
        check_arch(config.load(None, ["model.arch=timm/vit_tiny_patch16_224", "model.arch_kwargs={imgsize: 32}"]))
    # timm's ViT is built for 224 px unless told: 32 px images would fail in every worker's first step
    with pytest.raises(config.ConfigError, match="data.image_size=32.*img_size"):
        check_arch(config.load(None, ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=32"]))


@pytest.mark.parametrize("option", ["model.width=32", "model.stem_stride=2"])
def test_resnet_options_with_a_timm_encoder_are_refused(option):
    from ssl_dist.model import check_arch

    with pytest.raises(config.ConfigError, match=f"{option.split('=')[0]}.*ResNet"):
        check_arch(config.load(None, [*TINY_VIT, option]))


def test_pretrain_with_a_timm_model_that_does_not_exist_exits_2_before_anything_starts(tmp_path, capsys,
                                                                                       monkeypatch):
    from cifar import cifar_slice

    from ssl_dist import cli
    from ssl_dist.shards import make_shards

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # nothing listens: a check after connecting fails
    make_shards(str(cifar_slice(tmp_path / "images", per_class=2)), str(tmp_path / "shards"), samples_per_shard=10)
    runs = tmp_path / "runs"
    assert cli.main(["pretrain", "model.arch=timm/vit_smal_patch16_224", f"data.train_url={tmp_path / 'shards'}",
                     f"run.storage_path={runs}", "data.batch_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "timm/vit_small_patch16_224" in err, err
    assert not runs.exists()  # nothing written, no lease taken


def test_a_checkpoint_of_other_timm_kwargs_does_not_resume():
    from ssl_dist.checkpoint import CheckpointError, CheckpointInfo
    from ssl_dist.checkpoint.resume import check_compatible

    then = config.load(None, TINY_VIT)
    info = CheckpointInfo(url="runs/x/checkpoint-00000002", meta={"step": 2, "config": config.to_dict(then)})
    check_compatible(info, config.load(None, TINY_VIT))
    other = [*TINY_VIT[:2], "model.arch_kwargs={img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2}"]
    with pytest.raises(CheckpointError, match="model.arch_kwargs"):
        check_compatible(info, config.load(None, other + TINY_VIT[3:]))
