"""CLIP (Radford et al. 2021): symmetric InfoNCE over the global batch, learned temperature."""

from clipjax import losses
from clipjax.models.two_tower import TwoTower


class Clip:
    """One image view and one plain caption per example; no extra state."""

    def __init__(self, config, model: TwoTower, mesh):
        del config  # CLIP has no objective-specific fields
        self.model = model
        self._contrastive = losses.on_batch_shards(losses.clip_loss, mesh, num_batched=2)

    def init_state(self, rng):
        del rng
        return {}

    def loss(self, params, batch, state, rng):
        del rng  # deterministic given the batch
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        loss = self._contrastive(out["image"]["embed"], out["text"]["embed"], out["logit_scale"])
        return loss, ({"train/logit_scale": out["logit_scale"]}, state)

    def embed_images(self, params, images):
        out = self.model.apply({"params": params}, images, method=TwoTower.encode_image)
        return out["embed"]

    def embed_texts(self, params, tokens):
        return self.model.apply({"params": params}, tokens, method=TwoTower.encode_text)["embed"]
