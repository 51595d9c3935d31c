"""The text tower over the prefix of the context that its output depends on (text_prefix.py):
embeddings and every parameter's gradient equal to the whole context's, for open_clip's CLIP and
CustomTextCLIP towers; towers where the cut would change the output are run whole."""

import json
from pathlib import Path

import pytest
import torch

from ssl_dist.model import build_image_text_model, build_tokenizer

TINY = json.loads((Path(__file__).resolve().parents[1] / "jobs" / "configs" / "clip-tiny.json").read_text())
CAPTIONS = ["a photo of a cat.", "a blurry photo of the automobile.", "a low contrast photo of a frog.", "a ship"]


def towers(tmp_path: Path, **text_cfg) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny towers with `text_cfg` changes, and CAPTIONS tokenized to their context of 32."""
    spec = json.loads(json.dumps(TINY))
    custom = text_cfg.pop("custom_text", False)
    spec["text_cfg"].update(text_cfg)
    if custom:
        spec["custom_text"] = True
    arch = tmp_path / "towers.json"
    arch.write_text(json.dumps(spec))
    torch.manual_seed(0)
    model = build_image_text_model(str(arch), image_size=32, init_logit_scale=2.0)
    return model, build_tokenizer(str(arch))(CAPTIONS)


def text_step(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Text embeddings (B, D) and the gradient of a loss that weighs every output element."""
    model.zero_grad()
    text = model(None, tokens)[1]
    (text * torch.linspace(-1, 1, text.numel()).reshape(text.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return text.detach(), grads


@pytest.mark.parametrize("text_cfg", [{}, {"custom_text": True},
                                      {"custom_text": True, "pool_type": "eos", "eos_id": 49407}],
                         ids=["CLIP", "CustomTextCLIP", "eos pooling"])
def test_the_prefix_gives_the_whole_contexts_embeddings_and_gradients(tmp_path, text_cfg):
    model, tokens = towers(tmp_path, **text_cfg)
    prefix = model.text_prefix(tokens)
    # the longest caption: start, 7 words and the full stop, end -> 10 of the 32 columns
    assert prefix.shape == (4, 10) and torch.equal(prefix, tokens[:, :10])
    whole, whole_grads = text_step(model, tokens)
    short, short_grads = text_step(model, prefix)
    torch.testing.assert_close(short, whole, rtol=1e-5, atol=1e-6)
    assert short_grads.keys() == whole_grads.keys() and whole_grads
    for name, grad in whole_grads.items():  # float rounding, relative to the gradient's scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(short_grads[name], grad, rtol=1e-5, atol=2e-6 * max(scale, 1.0),
                                   msg=lambda m, name=name: f"{name}: {m}")
    positional = next(g for n, g in whole_grads.items() if n.endswith("positional_embedding"))
    assert positional[10:].abs().max() == 0 and positional[:10].abs().max() > 0  # past the prefix: no gradient
    # evaluation's entry point cuts the prefix itself
    torch.testing.assert_close(model.encode_text(tokens).detach(), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text_cfg", [{"custom_text": True, "no_causal_mask": True},
                                      {"custom_text": True, "pool_type": "last"},
                                      {"custom_text": True, "embed_cls": True}],
                         ids=["bidirectional", "last pooling", "class token"])
def test_towers_whose_output_reads_the_padding_run_on_the_whole_context(tmp_path, text_cfg):
    model, tokens = towers(tmp_path, **text_cfg)
    assert model.text_prefix(tokens) is tokens
    torch.testing.assert_close(model.encode_text(tokens), model.clip.encode_text(tokens))
