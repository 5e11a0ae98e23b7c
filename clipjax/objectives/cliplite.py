"""CLIP-Lite (Shrivastava et al. 2021): the Jensen-Shannon MI bound with one negative each.

The two towers end in MI blocks (`config.model.projection = "mi_block"`), whose normalised
outputs are the critic embeddings; the dot critic is T(x, y) = exp(τ)·⟨n(g_I(x)), n(g_T(y))⟩
with τ unclamped. Each image's negative is the next caption of the same device's batch. A
cooperative prior discriminator pushes tower features towards U[0, 1)^d (Deep InfoMax).
Optional JSD terms between two image views and between two captions (off by default) use the
same one-negative form with critics of their own.

Two departures are offered as options, both off by default: `cliplite.negative="sampled"`
draws each image's one negative caption ∝ exp(critic) among the device's captions, and
`cliplite.prior_mode="adversarial"` trains the prior adversarially, as Deep InfoMax does: the
discriminator learns on the features with their gradient stopped, and the towers minimise
−log D(features) against a discriminator held fixed.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax import losses
from clipjax.errors import ConfigError
from clipjax.models.heads import MIBlock, PriorDiscriminator
from clipjax.models.two_tower import LOGIT_SCALE_INIT, TwoTower, normalize
from clipjax.objectives.base import Objective, Views

PRIOR_MODES = ("cooperative", "adversarial")


class ClipLiteModel(TwoTower):
    """The two towers plus CLIP-Lite's heads: prior discriminators on the "image" / "text"
    tower features (`priors`), and for the optional view terms a critic per kind with its
    own logit scale, learned as its log (`view_critics`)."""

    priors: tuple[str, ...] = ()
    view_critics: tuple[str, ...] = ()
    adversarial_prior: bool = False  # the discriminators see the features' values only

    def setup(self):
        super().setup()
        self.image_prior = PriorDiscriminator() if "image" in self.priors else None
        self.text_prior = PriorDiscriminator() if "text" in self.priors else None
        self.image_view_critic = MIBlock(self.embed_dim) if "image" in self.view_critics else None
        self.text_view_critic = MIBlock(self.embed_dim) if "text" in self.view_critics else None
        init = nn.with_logical_partitioning(nn.initializers.constant(LOGIT_SCALE_INIT), ())
        self.view_log_scales = {
            kind: self.param(f"{kind}_view_log_scale", init, ()) for kind in self.view_critics
        }

    def view_embed(self, kind: str, features, train: bool = False):
        """A view critic's unit embedding (B, embed_dim) of "image" or "text" tower features."""
        critic = {"image": self.image_view_critic, "text": self.text_view_critic}[kind]
        return normalize(critic(features, train=train))

    def discriminate(self, kind: str, features):
        """Prior-discriminator logits (B,) of the "image" or "text" prior on features (B, d)."""
        return {"image": self.image_prior, "text": self.text_prior}[kind](features)

    def __call__(self, images, tokens, train: bool = False):
        """TwoTower's outputs plus the priors' logits on the tower features (`prior_logits`,
        by kind; of the features under stop_gradient if `adversarial_prior`), the view
        critics' embeddings (`<kind>.view_embed`) and the logs of their logit scales
        (`view_log_scales`)."""
        out = super().__call__(images, tokens, train=train)
        detach = jax.lax.stop_gradient if self.adversarial_prior else lambda x: x
        if self.priors:
            out["prior_logits"] = {
                k: self.discriminate(k, detach(out[k]["features"])) for k in self.priors
            }
        for kind in self.view_critics:
            out[kind]["view_embed"] = self.view_embed(kind, out[kind]["features"], train=train)
        if self.view_critics:
            out["view_log_scales"] = self.view_log_scales
        return out


def _forward(model: ClipLiteModel, batch, prior_samples, train: bool):
    """The towers; prior-discriminator logits on real features and on prior samples; and, for
    the optional view terms, the view critics' embeddings of the second image / caption view."""
    out = model(batch["image"], batch["text"], train=train)
    out["prior_logits"] = {
        kind: (real, model.discriminate(kind, prior_samples[kind]))
        for kind, real in out.get("prior_logits", {}).items()
    }
    if "image_2" in batch:
        features = model.encode_image(batch["image_2"], train=train)["features"]
        out["image_2_view_embed"] = model.view_embed("image", features, train=train)
    if "text_eda" in batch:
        features = model.encode_text(batch["text_eda"], train=train)["features"]
        out["text_2_view_embed"] = model.view_embed("text", features, train=train)
    return out


class ClipLite(Objective):
    no_accumulation = (
        "its MI blocks' BatchNorm statistics are the whole batch's, and its negatives are drawn "
        "within it"
    )

    def __init__(self, config, mesh):
        if config.model.projection != "mi_block":
            raise ConfigError(
                "config.model.projection must be 'mi_block' for CLIP-Lite (its critic embeddings "
                f"come from MI blocks), got {config.model.projection!r}."
            )
        lite = config.cliplite
        if lite.negative not in losses.NEGATIVES:
            raise ConfigError(
                f"config.cliplite.negative={lite.negative!r} is unknown; use 'next' (the next "
                "caption of the batch, as CLIP-Lite has it) or 'sampled' (drawn ∝ exp(critic))."
            )
        if lite.prior_mode not in PRIOR_MODES:
            raise ConfigError(
                f"config.cliplite.prior_mode={lite.prior_mode!r} is unknown; use 'cooperative' "
                "(as the official code has it) or 'adversarial' (as Deep InfoMax has it)."
            )
        self.adversarial_prior = lite.prior_mode == "adversarial"
        self.priors = tuple(
            kind for kind, on in (("image", lite.image_prior), ("text", lite.text_prior)) if on
        )
        # Optional self-supervised JSD terms, each with its own critic: two augmentations of
        # the image, and two captions (the second an EDA rewrite: one caption per image here).
        self.view_weights = {
            kind: weight
            for kind, weight in (
                ("image", lite.image_view_weight),
                ("text", lite.caption_view_weight),
            )
            if weight > 0
        }
        self.views = Views(
            image_views=2 if "image" in self.view_weights else 1,
            text_views=("plain", "eda") if "text" in self.view_weights else ("plain",),
        )
        self.model = ClipLiteModel.from_config(
            config.model,
            priors=self.priors,
            view_critics=tuple(self.view_weights),
            adversarial_prior=self.adversarial_prior,
        )
        self.prior_weight = lite.prior_weight
        self._cross = losses.on_batch_shards(
            functools.partial(losses.jsd_cross_loss, negative=lite.negative), mesh, num_batched=2
        )
        self._view = losses.on_batch_shards(losses.jsd_cross_loss, mesh, num_batched=2)
        self._prior = losses.on_batch_shards(losses.prior_loss, mesh, num_batched=2)
        self._fool = losses.on_batch_shards(losses.prior_fool_loss, mesh, num_batched=1)

    def loss(self, params, model_state, batch, state, rng):
        images = batch["image"]
        widths = {"image": self.model.image_features_dim, "text": self.model.text_width}
        prior_samples = {
            kind: jax.random.uniform(jax.random.fold_in(rng, i), (len(images), widths[kind]))
            for i, kind in enumerate(self.priors)
        }
        out, model_state = self.forward(
            params,
            model_state,
            batch,
            prior_samples,
            rng=jax.random.fold_in(rng, 3),
            method=_forward,
        )
        logit_scale = jnp.exp(out["log_scale"])
        negatives_rng = jax.random.fold_in(rng, 2)  # 0 and 1 drew the prior samples
        cross, critic = self._cross(
            out["image"]["embed"], out["text"]["embed"], logit_scale, negatives_rng
        )
        prior = sum(
            (self._prior(real, fake) for real, fake in out["prior_logits"].values()),
            start=jnp.zeros(()),
        )
        if self.adversarial_prior:
            fixed = {"params": jax.lax.stop_gradient(params)}
            for kind in self.priors:
                logits = self.model.apply(
                    fixed, kind, out[kind]["features"], method=ClipLiteModel.discriminate
                )
                prior = prior + self._fool(logits)
        loss = (1 - self.prior_weight) * cross + self.prior_weight * prior
        metrics = {}
        for kind, weight in self.view_weights.items():
            view, name = (("image", "image_view"), ("text", "caption_view"))[kind == "text"]
            term, _ = self._view(
                out[view]["view_embed"],
                out[f"{view}_2_view_embed"],
                jnp.exp(out["view_log_scales"][kind]),
            )
            loss = loss + weight * term
            metrics[f"train/loss_{name}"] = term
        metrics |= {
            "train/loss_cross": cross,
            "train/loss_prior": prior,
            "train/critic_pos": critic["critic_pos"],
            "train/critic_neg": critic["critic_neg"],
            "train/logit_scale": logit_scale,
        }
        return loss, (metrics, model_state, state)
