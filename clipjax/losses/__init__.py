"""Losses as pure functions of embeddings: no model inside, collectives explicit.

A loss that needs the global batch takes each device's local slice plus the name of the mesh
axes the batch is split over, and all-gathers itself (or passes chunks around the device ring).
The same body therefore runs under `jax.shard_map` (see `on_batch_shards`) and under `jax.pmap`
with that axis name; with `axis_name=None` it is the single-device loss.

Modules by concern: `contrastive` (InfoNCE, CLIP), `sigmoid` (SigLIP), `selfsup` (SimSiam,
masked LM, NT-Xent), `cliplite` (JSD, priors), `tokenwise` (FILIP); `common` holds the gather,
the ring and the shard_map wrapper.
"""

from clipjax.losses.cliplite import (
    NEGATIVES,
    jsd_cross_loss,
    prior_fool_loss,
    prior_loss,
    sample_negatives,
)
from clipjax.losses.common import on_batch_shards, row_logsumexp
from clipjax.losses.contrastive import clip_loss, clip_loss_ring, info_nce, info_nce_ring
from clipjax.losses.selfsup import masked_lm_loss, nt_xent_loss, nt_xent_loss_ring, simsiam_loss
from clipjax.losses.sigmoid import sigmoid_loss, sigmoid_loss_ring
from clipjax.losses.tokenwise import filip_loss, filip_loss_ring, select_tokens, token_similarity

__all__ = [
    "NEGATIVES",
    "clip_loss",
    "clip_loss_ring",
    "filip_loss",
    "filip_loss_ring",
    "info_nce",
    "info_nce_ring",
    "jsd_cross_loss",
    "masked_lm_loss",
    "nt_xent_loss",
    "nt_xent_loss_ring",
    "on_batch_shards",
    "prior_fool_loss",
    "prior_loss",
    "row_logsumexp",
    "sample_negatives",
    "select_tokens",
    "sigmoid_loss",
    "sigmoid_loss_ring",
    "simsiam_loss",
    "token_similarity",
]
