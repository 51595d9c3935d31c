"""Contrastive losses whose negatives come from every rank: NT-Xent, CLIP InfoNCE, MoCo v3, SigLIP.

Contract (DESIGN.md, "Loss"): every rank of the process group calls the loss with its own
local (n, D) embeddings and gets back *its* scalar loss, the mean over its own anchors (with
nt_xent's validity mask: its share of the global mean over valid anchors, see there). The
other ranks' embeddings arrive through an autograd-aware collective whose backward sums the
gradients of all ranks into the rank that owns the embedding, so on rank r

    d loss_r / d z_r  (after the gather's backward)  ==  d (sum_q loss_q) / d z_r,

and once DeepSpeed (or DDP) averages parameter gradients over the W ranks the gradient is
that of mean_q loss_q: the loss one process would compute on the global batch of N = n x W
samples. A rank's loss is not the global loss, only the mean over ranks is: log that.

Files: `gather.py` (the process group and the autograd-aware gather), `numerics.py` (dtypes
and chunks every loss shares), `softmax.py` (NT-Xent and CLIP: row log-sum-exp computed with
its gradient in the forward), `infonce.py` (MoCo v3: queries against gathered momentum keys,
no gradient through the keys), `sigmoid.py` (SigLIP, negatives passed around a ring).
"""

from __future__ import annotations

from ssl_dist.loss.gather import gather, rank_and_world
from ssl_dist.loss.infonce import moco_infonce
from ssl_dist.loss.sigmoid import siglip_loss
from ssl_dist.loss.softmax import CLIP_MAX_LOGIT_SCALE, clip_loss, nt_xent

__all__ = ["CLIP_MAX_LOGIT_SCALE", "clip_loss", "gather", "moco_infonce", "nt_xent", "rank_and_world", "siglip_loss"]
