"""SLIP (Mu et al. 2021) as DeCLIP's codebase trains it (`model/slip.py`): CLIP plus SimCLR.

Per example three image views: a base view (`config.data.augment`; the reference's
RandomResizedCrop at scale 0.5–1) for CLIP's term, and two views (`slip.ssl_augment`: MoCo v2's
recipe at crop scale 0.2–1, as DeCLIP's) for the self-supervised term. The SimCLR head
(`heads.SimClrHead`) maps the image tower's pooled feature of each view to `slip.head_dim`; its
outputs, L2-normalised, enter NT-Xent over the 2B embeddings of the global batch at the fixed
temperature `slip.temperature` (0.1). The loss is

  L = clip_weight·L_CLIP(base view, caption) + ssl_weight·L_NT-Xent(view 1, view 2)   (1 / 1)

The head's BatchNorm statistics are per device, as in the reference (`slip.sync_bn` syncs
them), so gradient accumulation cannot be exact and is refused.
"""

import jax.numpy as jnp

from clipjax import losses, sharding
from clipjax.models.heads import SimClrHead
from clipjax.models.two_tower import TwoTower, normalize
from clipjax.objectives.base import Objective, Views, clamp_log_scale, log_scale_range


class SlipModel(TwoTower):
    """The two towers plus SimCLR's head on the image tower's pooled feature."""

    simclr_bn_groups: int = 1
    simclr_width: int = 4096
    simclr_dim: int = 256

    def setup(self):
        super().setup()
        self.simclr = SimClrHead(self.simclr_bn_groups, self.simclr_width, self.simclr_dim)

    def __call__(self, images, tokens, train: bool = False):
        """TwoTower's outputs plus the SimCLR head's on the image features (`image.simclr`)."""
        out = super().__call__(images, tokens, train=train)
        out["image"]["simclr"] = self.simclr(out["image"]["features"], train=train)
        return out


def _forward(model: SlipModel, batch, train: bool):
    """The base view and the caption through the towers; the two SSL views through the image
    tower and the SimCLR head, L2-normalised."""
    image = model.encode_image(batch["image"], train=train)
    text = model.encode_text(batch["text"], train=train)
    ssl = [
        normalize(model.simclr(model.encode_image(batch[key], train=train)["features"], train))
        for key in ("image_2", "image_3")
    ]
    return {"image": image["embed"], "text": text["embed"], "ssl": ssl}


class Slip(Objective):
    no_accumulation = "its SimCLR head's BatchNorm statistics are computed over the whole batch"

    def __init__(self, config, mesh):
        cfg = config.slip
        self.views = Views(
            image_views=3, image_augments=(None, dict(cfg.ssl_augment), dict(cfg.ssl_augment))
        )
        groups = 1 if cfg.sync_bn else sharding.data_parallel_size(mesh)
        self.model = SlipModel.from_config(
            config.model,
            simclr_bn_groups=groups,
            simclr_width=cfg.head_width,
            simclr_dim=cfg.head_dim,
        )
        self.log_scale_range = log_scale_range(config.clip.log_scale_range, "clip.log_scale_range")
        self.weights = {"clip": cfg.clip_weight, "ssl": cfg.ssl_weight}
        chunked = config.clip.chunked
        clip_body = losses.clip_loss_ring if chunked else losses.clip_loss
        self._clip = losses.on_batch_shards(clip_body, mesh, num_batched=2)
        temperature = cfg.temperature

        def nt_xent(view_1, view_2, axis_name):
            return losses.nt_xent_loss(view_1, view_2, temperature, axis_name, ring=chunked)

        self._nt_xent = losses.on_batch_shards(nt_xent, mesh, num_batched=2)

    def constrain(self, params):
        return clamp_log_scale(params, self.log_scale_range)

    def loss(self, params, model_state, batch, state, rng):
        out, model_state = self.forward(params, model_state, batch, rng=rng, method=_forward)
        logit_scale = jnp.exp(jnp.clip(params["log_scale"], *self.log_scale_range))
        terms = {
            "clip": self._clip(out["image"], out["text"], logit_scale),
            "ssl": self._nt_xent(*out["ssl"]),
        }
        loss = sum(self.weights[k] * terms[k] for k in self.weights)
        metrics = {f"train/loss_{k}": v for k, v in terms.items()}
        metrics["train/logit_scale"] = logit_scale
        return loss, (metrics, model_state, state)
