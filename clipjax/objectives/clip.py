"""CLIP (Radford et al. 2021): symmetric InfoNCE over the global batch, learned temperature."""

import jax.numpy as jnp

from clipjax import losses
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import Objective

MAX_LOGIT_SCALE = 100.0


class Clip(Objective):
    """One image view and one plain caption per example; no extra state. With
    `config.clip.chunked` the texts travel around the device ring (`losses.clip_loss_ring`)."""

    def __init__(self, config, mesh):
        self.model = TwoTower.from_config(config.model)
        body = losses.clip_loss_ring if config.clip.chunked else losses.clip_loss
        self._contrastive = losses.on_batch_shards(body, mesh, num_batched=2)

    def loss(self, params, model_state, batch, state, rng):
        del rng  # deterministic given the batch
        out, model_state = self.forward(params, model_state, batch["image"], batch["text"])
        logit_scale = jnp.minimum(jnp.exp(out["log_scale"]), MAX_LOGIT_SCALE)
        loss = self._contrastive(out["image"]["embed"], out["text"]["embed"], logit_scale)
        return loss, ({"train/logit_scale": logit_scale}, model_state, state)
