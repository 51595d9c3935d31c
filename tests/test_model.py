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
