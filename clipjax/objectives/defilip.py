"""DeFILIP (DeCLIP's codebase, `model/defilip.py`): DeCLIP's four terms plus FILIP's token-wise
term on image view 1's patches and the MLM-masked caption's tokens,

  L = 0.4·MVS + 0.2·ISS + 0.2·TSS + 0.2·NNS + 0.2·FILIP   (the reference's weights; sum 1.2)

DeCLIP's views, queue, SimSiam and MLM heads are `objectives.declip`'s; FILIP's mappings,
selection, masking and scale are `objectives.filip`'s (`config.filip`), its weight
`config.defilip.filip_weight`. Zero-shot uses the global embeddings, as DeCLIP's.
"""

import jax.numpy as jnp

from clipjax.models.heads import TokenHeads
from clipjax.objectives import filip
from clipjax.objectives.base import clamp_log_scale, log_scale_range
from clipjax.objectives.declip import MAX_LOGIT_SCALE, DeClip, DeClipModel


class DeFilipModel(filip.TokenWise, DeClipModel):
    """DeCLIP's model plus FILIP's token mappings to `token_dim` and its token-wise scale."""

    token_dim: int = 256

    def setup(self):
        super().setup()
        self.token_heads = TokenHeads(self.token_dim)

    def __call__(self, images, tokens, train: bool = False, mlm_labels=None):
        """DeClipModel's outputs plus FILIP's unit tokens (`image_tokens`, `text_tokens`) and
        θ_dense (`token_log_scale`)."""
        out = super().__call__(images, tokens, train=train, mlm_labels=mlm_labels)
        patches = self.encode_image(images, train=train, tokens=True)["tokens"]
        out["image_tokens"], out["text_tokens"], out["token_log_scale"] = self.token_heads(
            patches, out["text"]["states"]
        )
        return out


class DeFilip(DeClip):
    token_wise = True

    def __init__(self, config, mesh):
        filip.check_tokens(config)
        super().__init__(config, mesh)
        self.weights["filip"] = config.defilip.filip_weight
        self.mask_padding = config.filip.mask_padding
        self.token_scale_range = log_scale_range(
            config.filip.log_scale_range, "filip.log_scale_range"
        )
        self._filip = filip.token_loss(config, mesh)

    def _build_model(self, config, **fields) -> DeFilipModel:
        return DeFilipModel.from_config(config.model, token_dim=config.filip.dim, **fields)

    def constrain(self, params):
        params = super().constrain(params)
        heads = clamp_log_scale(params["token_heads"], self.token_scale_range)
        return {**params, "token_heads": heads}

    def _extra_terms(self, params, out, batch) -> tuple[dict, dict]:
        theta = jnp.clip(params["token_heads"]["log_scale"], *self.token_scale_range)
        token_scale = jnp.minimum(jnp.exp(theta), MAX_LOGIT_SCALE)
        mask = filip.text_mask(self.mask_padding, batch["text_mlm"])
        term = self._filip(out["image_tokens"], out["text_tokens"], mask, token_scale)
        return {"filip": term}, {"train/token_logit_scale": token_scale}
