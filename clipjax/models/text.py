"""CLIP's causal text transformer; the caption feature is the state at the end-of-text token."""

import flax.linen as nn
import jax.numpy as jnp

from clipjax.models.layers import TowerOptions, layer_norm, tower_transformer

PAD_ID = 0


class TextTransformer(nn.Module):
    """Tokens (B, L) int32, rows `BOS ... EOS PAD...` with pad id 0, L <= context_length.

    Returns `(pooled, states)`: `states` (B, L, width) are the final-LayerNorm token states and
    `pooled` (B, width) is the state at the end-of-text token, the last non-pad position.
    `options` (`layers.TowerOptions`) are how it computes, as the image tower does.
    """

    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    options: TowerOptions = TowerOptions()

    @nn.compact
    def __call__(self, tokens):
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"Token sequences of length {length} exceed model.text.context_length="
                f"{self.context_length}."
            )
        x = nn.Embed(
            self.vocab_size,
            self.width,
            # CLIP's initial scales: 0.02 for tokens, 0.01 for positions.
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="token_embed",
        )(tokens)
        pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (self.context_length, self.width),
        )
        x = x + pos_embed[:length]  # the residual stream is float32 (the precision policy)
        x = tower_transformer(
            self.options, self.depth, self.heads, self.mlp_ratio * self.width, causal=True
        )(x)
        states = layer_norm("ln_final")(x)
        # The last non-pad position; not the count of non-pad ids, since a vocabulary may also
        # give id 0 to a real token (OpenAI's BPE: "!").
        eot = jnp.argmax(jnp.where(tokens != PAD_ID, jnp.arange(length), -1), axis=1)  # (B,)
        pooled = jnp.take_along_axis(states, eot[:, None, None], axis=1)[:, 0]
        return nn.with_logical_constraint(pooled, ("batch", "embed")), states


def caption_mask(tokens):
    """Tokens (B, L) `BOS ... EOS PAD...` -> bool (B, L): the caption's own tokens and its
    end-of-text token, i.e. positions 1 to the last non-pad one (FILIP's token-wise terms leave
    out the start token and the padding)."""
    positions = jnp.arange(tokens.shape[1])
    eot = jnp.max(jnp.where(tokens != PAD_ID, positions, 0), axis=1, keepdims=True)
    return (positions >= 1) & (positions <= eot)
