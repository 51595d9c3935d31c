"""engine.py without DeepSpeed running: which parameters weight decay reaches."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_dist import config
from ssl_dist.engine import build_optimizer, decay_groups
from ssl_dist.model import build_image_text_model, build_model

TINY = "jobs/configs/clip-tiny.json"


def test_biases_norms_and_a_methods_scalars_do_not_decay():
    from pathlib import Path

    arch = str(Path(__file__).resolve().parents[1] / TINY)
    clip = build_image_text_model(arch, image_size=32, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    names = {id(p): n for n, p in clip.named_parameters()}
    decayed, kept = ([names[id(p)] for p in g["params"]] for g in decay_groups(clip, 0.2))
    # open_clip's own trainer exempts the same ones (p.ndim < 2: also ViT's class embedding)
    assert {"logit_scale", "logit_bias", "clip.ln_final.weight", "clip.visual.class_embedding"} <= set(kept)
    assert "clip.visual.conv1.weight" in decayed and "clip.token_embedding.weight" in decayed
    assert not any("ln" in n.rsplit(".", 2)[-2] for n in decayed if "." in n)  # no LayerNorm gain decays
    assert len(decayed) + len(kept) == len(list(clip.parameters()))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_step_without_gradient_shrinks_only_the_decayed_weights(name):
    cfg = config.load(None, [f"optim.name={name}", "optim.weight_decay=0.5", "optim.lr=0.1",
                             "model.arch=resnet18", "model.proj_hidden_dim=16", "model.proj_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        if p.ndim >= 2:  # decoupled (AdamW) or L2 (SGD) decay alone: w <- w (1 - lr wd)
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)
        else:
            assert torch.equal(p.detach(), before[n]), n
