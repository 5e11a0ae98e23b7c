"""CLIP-Lite (Shrivastava et al. 2021): the Jensen-Shannon MI bound with one negative each.

The two towers end in MI blocks (`config.model.projection = "mi_block"`), whose normalised
outputs are the critic embeddings; the dot critic is T(x, y) = exp(τ)·⟨n(g_I(x)), n(g_T(y))⟩
with τ unclamped. Each image's negative is the next caption of the same device's batch. A
cooperative prior discriminator pushes tower features towards U[0, 1)^d (Deep InfoMax).
"""

import jax
import jax.numpy as jnp

from clipjax import losses
from clipjax.config import ConfigError
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import Objective


def _forward_with_priors(model: TwoTower, images, tokens, prior_samples, train: bool):
    """The towers, and prior-discriminator logits on real features and on prior samples."""
    out = model(images, tokens, train=train)
    out["prior_logits"] = {
        kind: (real, model.discriminate(kind, prior_samples[kind]))
        for kind, real in out["prior_logits"].items()
    }
    return out


class ClipLite(Objective):
    def __init__(self, config, mesh):
        if config.model.projection != "mi_block":
            raise ConfigError(
                "config.model.projection must be 'mi_block' for CLIP-Lite (its critic embeddings "
                f"come from MI blocks), got {config.model.projection!r}."
            )
        lite = config.cliplite
        self.priors = tuple(
            kind for kind, on in (("image", lite.image_prior), ("text", lite.text_prior)) if on
        )
        self.model = TwoTower.from_config(config.model, priors=self.priors)
        self.prior_weight = lite.prior_weight
        self._cross = losses.on_batch_shards(losses.jsd_cross_loss, mesh, num_batched=2)
        self._prior = losses.on_batch_shards(losses.prior_loss, mesh, num_batched=2)

    def loss(self, params, model_state, batch, state, rng):
        images, tokens = batch["image"], batch["text"]
        widths = {"image": self.model.image_features_dim, "text": self.model.text_width}
        prior_samples = {
            kind: jax.random.uniform(jax.random.fold_in(rng, i), (len(images), widths[kind]))
            for i, kind in enumerate(self.priors)
        }
        out, model_state = self.forward(
            params, model_state, images, tokens, prior_samples, method=_forward_with_priors
        )
        temperature = jnp.exp(out["log_scale"])
        cross, critic = self._cross(out["image"]["embed"], out["text"]["embed"], temperature)
        prior = sum(
            (self._prior(real, fake) for real, fake in out["prior_logits"].values()),
            start=jnp.zeros(()),
        )
        loss = (1 - self.prior_weight) * cross + self.prior_weight * prior
        metrics = {
            "train/loss_cross": cross,
            "train/loss_prior": prior,
            "train/critic_pos": critic["critic_pos"],
            "train/critic_neg": critic["critic_neg"],
            "train/logit_scale": temperature,
        }
        return loss, (metrics, model_state, state)
