"""CLIP (Radford et al. 2021): symmetric InfoNCE over the global batch, learned temperature."""

import jax.numpy as jnp

from clipjax import losses
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import EmbeddingObjective, clamp_log_scale, log_scale_range


class Clip(EmbeddingObjective):
    """One image view and one plain caption per example; no extra state. With
    `config.clip.chunked` the texts travel around the device ring (`losses.clip_loss_ring`).
    After each update θ is projected into `config.clip.log_scale_range` (open_clip's
    clamp_(0, ln 100) by default: the logit scale stays in [1, 100])."""

    def __init__(self, config, mesh):
        self.model = TwoTower.from_config(config.model)
        self.log_scale_range = log_scale_range(config.clip.log_scale_range, "clip.log_scale_range")
        body = losses.clip_loss_ring if config.clip.chunked else losses.clip_loss
        self._contrastive = losses.on_batch_shards(body, mesh, num_batched=2)

    def constrain(self, params):
        return clamp_log_scale(params, self.log_scale_range)

    def contrast(self, params, embeddings, state):
        # Clipped here too, for a starting θ outside the range (weights loaded with init_from).
        logit_scale = jnp.exp(jnp.clip(params["log_scale"], *self.log_scale_range))
        loss = self._contrastive(embeddings["image"], embeddings["text"], logit_scale)
        return loss, ({"train/logit_scale": logit_scale}, state)
