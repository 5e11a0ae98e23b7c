"""What every objective shares: the views it asks of the input pipeline (`data.views`), its model,
training-mode forward passes and eval embeddings."""

import jax.numpy as jnp

from clipjax.data.views import TEXT_VIEWS, Views  # noqa: F401  (objectives.base.Views)
from clipjax.errors import ConfigError
from clipjax.models.two_tower import TwoTower


def log_scale_range(value, field: str) -> tuple[float, float]:
    """`value`, the (low, high) range of the logit scale's log θ read from `config.<field>`,
    as two floats; ConfigError naming the field unless low <= high."""
    try:
        low, high = (float(v) for v in value)
        ordered = low <= high
    except (TypeError, ValueError):
        ordered = False
    if not ordered:
        raise ConfigError(
            f"config.{field}={value!r} must be (low, high) with low <= high: the range of "
            "θ, the log of the logit scale, after each update (CLIP's (0, 4.605) keeps the "
            "scale in [1, 100])."
        )
    return low, high


def clamp_log_scale(params, bounds: tuple[float, float]):
    """`params` with θ (`log_scale`) projected into `bounds`."""
    return {**params, "log_scale": jnp.clip(params["log_scale"], *bounds)}


class Objective:
    """Base of the objectives. Subclasses set `model` (a TwoTower, with the heads they need)
    and implement `loss`.

    Interface used by the trainer:
      init_state(rng) -> pytree of extra training state (e.g. a feature queue); {} by default
      loss(params, model_state, batch, state, rng)
          -> (loss, (metrics, new_model_state, new_state))
      constrain(params) -> params          a projection applied after every update
      embed_images(params, model_state, images), embed_texts(params, model_state, tokens),
      image_features(params, model_state, images)
          -> (n, d) unit vectors used by the evaluations
    `views` says which views of each example the input pipeline makes.
    `model_state` holds the model's non-parameter collections (BatchNorm statistics).
    """

    model: TwoTower
    views: Views = Views()  # one CLIP-augmented image, one plain caption
    # Why the gradient cannot be accumulated exactly over micro-batches (`config.accum_steps`);
    # "" for an `EmbeddingObjective`, whose loss is a function of per-example embeddings.
    no_accumulation = "its loss is not a function of each example's embeddings alone"

    def init_state(self, rng):
        del rng
        return {}

    def constrain(self, params):
        return params

    def forward(self, params, model_state, *args, rng=None, method=None):
        """`model.apply` in training mode, `rng` drawing its random choices (needed by a ViT
        with patch dropout); returns (outputs, updated model_state)."""
        out, updates = self.model.apply(
            {"params": params, **model_state},
            *args,
            train=True,
            method=method,
            mutable=list(model_state),
            rngs={} if rng is None else {"patch_dropout": rng},
        )
        return out, {**model_state, **updates}

    def embed_images(self, params, model_state, images):
        variables = {"params": params, **model_state}
        return self.model.apply(variables, images, method=TwoTower.encode_image)["embed"]

    def image_features(self, params, model_state, images):
        """The image tower's output before the projection (B, width_v), for linear probes."""
        variables = {"params": params, **model_state}
        return self.model.apply(variables, images, method=TwoTower.encode_image)["features"]

    def embed_texts(self, params, model_state, tokens):
        variables = {"params": params, **model_state}
        return self.model.apply(variables, tokens, method=TwoTower.encode_text)["embed"]


class EmbeddingObjective(Objective):
    """An objective whose loss is a function of each example's embeddings (no batch statistics,
    no state that a part of the batch would change), split in two so that the trainer can
    accumulate its gradient over micro-batches exactly (`step.accumulated_grads`):

      embed(params, model_state, batch, rng) -> (embeddings: pytree of (b, ...) arrays,
                                                 model_state)
      contrast(params, embeddings, state) -> (loss, (metrics, state))
    """

    no_accumulation = ""

    def loss(self, params, model_state, batch, state, rng):
        embeddings, model_state = self.embed(params, model_state, batch, rng)
        loss, (metrics, state) = self.contrast(params, embeddings, state)
        return loss, (metrics, model_state, state)

    def embed(self, params, model_state, batch, rng):
        """The image and text embeddings (b, d) of a batch, in training mode."""
        out, model_state = self.forward(params, model_state, batch["image"], batch["text"], rng=rng)
        return {"image": out["image"]["embed"], "text": out["text"]["embed"]}, model_state
