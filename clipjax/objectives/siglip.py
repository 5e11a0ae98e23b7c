"""SigLIP (Zhai et al. 2023): a sigmoid loss over every image-text pair, learned scale and bias."""

import jax.numpy as jnp

from clipjax import losses
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import EmbeddingObjective


class SigLip(EmbeddingObjective):
    """One image view and one plain caption per example; the model adds a logit bias `b`.

    With `config.siglip.chunked`, text embeddings travel around the device ring, so no device
    holds more than (B/k)² logits; otherwise each device builds its (B/k) × B rows.
    """

    def __init__(self, config, mesh):
        self.model = TwoTower.from_config(
            config.model, log_scale_init=config.siglip.scale_init, bias_init=config.siglip.bias_init
        )
        body = losses.sigmoid_loss_ring if config.siglip.chunked else losses.sigmoid_loss
        self._sigmoid = losses.on_batch_shards(body, mesh, num_batched=2)

    def contrast(self, params, embeddings, state):
        logit_scale = jnp.exp(params["log_scale"])
        loss, logits = self._sigmoid(
            embeddings["image"], embeddings["text"], logit_scale, params["bias"]
        )
        metrics = {
            "train/logit_scale": logit_scale,
            "train/bias": params["bias"],
            "train/pos_logit_mean": logits["pos_logit_mean"],
            "train/neg_logit_mean": logits["neg_logit_mean"],
        }
        return loss, (metrics, state)
