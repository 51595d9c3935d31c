"""A causal text tower run over the shortest prefix of the context that decides its output.

open_clip's causal text transformers (CLIP's own, and CustomTextCLIP's `TextTransformer`)
pool one position per caption: its end-of-text token (`argmax` pooling: the highest token id;
or `eos`). Under the causal mask the output at position p depends on positions <= p only, so
the positions after the last pooled one of a batch are padding that reaches no output: cut
off, the embeddings are the same (to float rounding: sums over fewer masked keys) and so are
the gradients (those positions' have none). Captions are short against the context (CIFAR-10's
prompts are 8-11 tokens of 32; alt-text is mostly under 20 of 77), and the tower's cost is
linear in positions (attention's quadratic), so training runs the text tower on the prefix,
where open_clip runs all of the context.

Towers where the cut would change the output run on the whole context as open_clip runs them:
no causal mask, `first`/`last` pooling, a class token appended (CoCa), HF text models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CausalText:
    """The parts of a causal text tower: `tower` holds token_embedding, positional_embedding,
    transformer, attn_mask, ln_final and text_projection (open_clip's CLIP itself, or its
    TextTransformer); `pool_type` 'argmax' or 'eos', `eos_id` the latter's token."""

    tower: nn.Module
    pool_type: str
    eos_id: int | None


def causal_text(clip: nn.Module) -> CausalText | None:
    """The causal text tower of an open_clip CLIP or CustomTextCLIP, or None where a prefix
    would not give the whole context's output."""
    from open_clip.transformer import TextTransformer

    if isinstance(getattr(clip, "text", None), TextTransformer):
        text = clip.text
        if text.cls_emb is not None or text.output_tokens:
            return None
        tower, pool_type, eos_id = text, text.pool_type, text.eos_id
    elif hasattr(clip, "token_embedding"):  # CLIP keeps its text tower's parts as its own attributes
        tower, pool_type, eos_id = clip, clip.text_pool_type, clip.text_eos_id
    else:
        return None
    if getattr(tower, "attn_mask", None) is None or pool_type not in ("argmax", "eos"):
        return None
    return CausalText(tower, pool_type, eos_id)


def pooled_positions(text: CausalText, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B,) long: the position each caption's embedding is read at."""
    if text.pool_type == "argmax":
        return tokens.argmax(dim=-1)  # the first end-of-text token: the highest id
    return (tokens == text.eos_id).int().argmax(dim=-1)


def shortest_prefix(text: CausalText, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L') with L' = 1 + the last pooled position of the batch: the columns the
    embeddings depend on. Reads the tokens (a device sync where they are on a GPU: call it on
    the loader's CPU tensor)."""
    return tokens[:, : int(pooled_positions(text, tokens).max()) + 1]


def encode(text: CausalText, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L') token ids, L' <= the context length -> (B, D): open_clip's encode_text with its
    positional embedding and causal mask cut to L'. Any rank, inside the model's forward."""
    from open_clip.transformer import text_global_pool

    tower, length = text.tower, tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, text.pool_type, eos_token_id=text.eos_id)
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
