"""FILIP (Yao et al. 2021) as DeCLIP's codebase trains it: token-wise late interaction.

The ViT's patch tokens (before ln_post) and the text tower's token states (after ln_final) are
each mapped to `filip.dim` and L2-normalised per token. For each pair the top `filip.top_k`
tokens of each side are selected, and the symmetric InfoNCE runs on the token-wise scores with
their own learned scale σ = exp(θ_dense) (`losses.filip_loss`; the ring form with
`filip.chunked`). The loss is

  L = filip_weight·L_FILIP + clip_weight·L_CLIP   (1 / 0 in the reference)

Padding and the start token are masked out of the text's tokens (`filip.mask_padding=False`
keeps them, as the reference does). The loss is a function of each example's tokens, so
gradient accumulation is exact (an `EmbeddingObjective`). Zero-shot classification, retrieval,
`clipjax.load`'s models and `clipjax.predict` score tokens as well (`scores_tokens`,
`evaluate.late_interaction`).
"""

import functools

import jax.numpy as jnp

from clipjax import losses
from clipjax.errors import ConfigError
from clipjax.models.heads import TokenHeads
from clipjax.models.text import caption_mask
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import EmbeddingObjective, clamp_log_scale, log_scale_range


class TokenWise:
    """What FILIP adds to a two-tower model (mixed into FilipModel and DeFilipModel): the token
    mappings and scale (`token_heads`), and `encode_tokens`."""

    def encode_tokens(self, images, tokens, train: bool = False):
        """Both encodings (`image`, `text`, as `encode_image` / `encode_text`), and the mapped
        unit tokens: `image_tokens` (B, P, dim), `text_tokens` (B, L, dim), and θ_dense
        (`token_log_scale`)."""
        image = self.encode_image(images, train=train, tokens=True)
        text = self.encode_text(tokens, train=train)
        image_tokens, text_tokens, log_scale = self.token_heads(image["tokens"], text["states"])
        return {
            "image": image,
            "text": text,
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "token_log_scale": log_scale,
        }

    def image_token_embed(self, images):
        """Images -> (B, P, dim) unit patch tokens, in inference mode."""
        return self.token_heads.image(self.encode_image(images, tokens=True)["tokens"])

    def text_token_embed(self, tokens, mask_padding: bool = True):
        """Tokens -> (B, L, dim) unit token states, in inference mode; the zero vector at the
        positions FILIP leaves out (`text_mask`)."""
        states = self.token_heads.text(self.encode_text(tokens)["states"])
        return states * text_mask(mask_padding, tokens)[..., None]


class FilipModel(TokenWise, TwoTower):
    """The two towers plus FILIP's token mappings to `token_dim` and its token-wise scale."""

    token_dim: int = 256

    def setup(self):
        super().setup()
        self.token_heads = TokenHeads(self.token_dim)

    def __call__(self, images, tokens, train: bool = False):
        """`encode_tokens`'s outputs and θ (`log_scale`)."""
        return {**self.encode_tokens(images, tokens, train=train), "log_scale": self.log_scale}


def check_tokens(config) -> None:
    """ConfigError unless the image tower has patch tokens and `top_k` is positive."""
    if config.model.image.variant.startswith("RN"):
        raise ConfigError(
            f"config.objective={config.objective!r} compares patch tokens, and "
            f"{config.model.image.variant!r} is a ResNet; use a ViT image tower "
            "(config.model.image.variant, e.g. 'B/32')."
        )
    top_k = config.filip.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(
            f"config.filip.top_k={top_k!r} must be a positive integer: the tokens of each side "
            f"selected per pair (16 in the reference)."
        )


def token_loss(config, mesh):
    """FILIP's term on the mesh: (image_tokens, text_tokens, text_mask, σ) -> loss, the tokens
    split over the batch axes; the ring form with `config.filip.chunked`."""
    body = functools.partial(losses.filip_loss, top_k=config.filip.top_k, ring=config.filip.chunked)
    return losses.on_batch_shards(body, mesh, num_batched=3)


def text_mask(mask_padding: bool, tokens):
    """The text tokens FILIP's terms count, as float32 (B, L) 0/1: `caption_mask`, or every
    position without `mask_padding` (`config.filip.mask_padding`). A float, so that gradient
    accumulation can carry it with the embeddings."""
    if mask_padding:
        return caption_mask(tokens).astype(jnp.float32)
    return jnp.ones(tokens.shape, jnp.float32)


class ScoresTokens:
    """What evaluation and inference ask of an objective whose scores are token-wise (mixed into
    `Filip`, and `evaluate.checkpoint_eval`'s loaded towers): `model` a TokenWise model, and
    `mask_padding`. FILIP's loss does not train the global embeddings (unless
    `filip.clip_weight` > 0), so zero-shot and retrieval score tokens
    (`evaluate.late_interaction`)."""

    scores_tokens = True
    mask_padding = True

    def embed_image_tokens(self, params, model_state, images):
        """(n, P, dim) unit patch tokens."""
        variables = {"params": params, **model_state}
        return self.model.apply(variables, images, method=TokenWise.image_token_embed)

    def embed_text_tokens(self, params, model_state, tokens):
        """(n, L, dim) unit caption tokens, the zero vector at the positions FILIP leaves out
        (`text_mask`)."""
        variables = {"params": params, **model_state}
        return self.model.apply(
            variables, tokens, self.mask_padding, method=TokenWise.text_token_embed
        )


class Filip(ScoresTokens, EmbeddingObjective):
    """One image view and one plain caption per example; no extra state. θ and θ_dense are both
    projected into `filip.log_scale_range` after each update."""

    def __init__(self, config, mesh):
        check_tokens(config)
        cfg = config.filip
        self.mask_padding = cfg.mask_padding
        self.model = FilipModel.from_config(config.model, token_dim=cfg.dim)
        self.log_scale_range = log_scale_range(cfg.log_scale_range, "filip.log_scale_range")
        self.weights = {"filip": cfg.filip_weight, "clip": cfg.clip_weight}
        self._filip = token_loss(config, mesh)
        clip_body = losses.clip_loss_ring if config.clip.chunked else losses.clip_loss
        self._clip = losses.on_batch_shards(clip_body, mesh, num_batched=2)

    def constrain(self, params):
        params = clamp_log_scale(params, self.log_scale_range)
        heads = clamp_log_scale(params["token_heads"], self.log_scale_range)
        return {**params, "token_heads": heads}

    def embed(self, params, model_state, batch, rng):
        out, model_state = self.forward(
            params,
            model_state,
            batch["image"],
            batch["text"],
            rng=rng,
            method=FilipModel.encode_tokens,
        )
        embeddings = {
            "image": out["image"]["embed"],
            "text": out["text"]["embed"],
            "image_tokens": out["image_tokens"],
            "text_tokens": out["text_tokens"],
            "text_mask": text_mask(self.mask_padding, batch["text"]),
        }
        return embeddings, model_state

    def contrast(self, params, embeddings, state):
        bounds = self.log_scale_range
        token_scale = jnp.exp(jnp.clip(params["token_heads"]["log_scale"], *bounds))
        terms = {
            "filip": self._filip(
                embeddings["image_tokens"],
                embeddings["text_tokens"],
                embeddings["text_mask"],
                token_scale,
            )
        }
        logit_scale = jnp.exp(jnp.clip(params["log_scale"], *bounds))
        if self.weights["clip"]:
            terms["clip"] = self._clip(embeddings["image"], embeddings["text"], logit_scale)
        loss = sum(self.weights[k] * terms[k] for k in terms)
        metrics = {f"train/loss_{k}": v for k, v in terms.items()}
        metrics["train/logit_scale"] = logit_scale
        metrics["train/token_logit_scale"] = token_scale
        return loss, (metrics, state)
