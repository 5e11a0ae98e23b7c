"""What every objective shares: the views it asks of the input pipeline, its model,
training-mode forward passes and eval embeddings."""

import dataclasses

import jax.numpy as jnp

from clipjax.errors import ConfigError
from clipjax.models.two_tower import TwoTower

TEXT_VIEWS = ("plain", "mlm", "eda")


@dataclasses.dataclass(frozen=True)
class Views:
    """Which views of each example an objective asks the training pipeline for
    (`data.pipeline.train_dataset` makes them).

    - `image_views` (1 or 2): independent augmentations of the image (`config.data.augment`,
      see `image_ops.Augment`), batch keys `image` and `image_2`, each float32 (b, size, size,
      3).
    - `text_views`, int32 (b, context_length) each: "plain" → `text`, the caption; "mlm" →
      `text_mlm`, the caption with BERT-style masking, plus `mlm_labels`, the original ids at
      the masked positions and 0 elsewhere (`text_ops.mlm_mask`); "eda" → `text_eda`, an
      EDA-augmented caption (`text_ops.eda`).
    """

    image_views: int = 1
    text_views: tuple[str, ...] = ("plain",)

    def __post_init__(self):
        if self.image_views not in (1, 2):
            raise ValueError(f"Views.image_views must be 1 or 2, not {self.image_views!r}.")
        views = tuple(self.text_views)
        object.__setattr__(self, "text_views", views)  # a list from a config is fine too
        if not views or len(set(views)) != len(views) or not set(views) <= set(TEXT_VIEWS):
            raise ValueError(
                f"Views.text_views {views!r} must be distinct kinds among {TEXT_VIEWS}."
            )


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

    def init_state(self, rng):
        del rng
        return {}

    def constrain(self, params):
        return params

    def forward(self, params, model_state, *args, method=None):
        """`model.apply` in training mode; returns (outputs, updated model_state)."""
        out, updates = self.model.apply(
            {"params": params, **model_state},
            *args,
            train=True,
            method=method,
            mutable=list(model_state),
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
