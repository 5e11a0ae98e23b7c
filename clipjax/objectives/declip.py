"""DeCLIP (Li et al. 2021): supervision from image and text views, self-supervision and neighbours.

Per example: two augmented views of the image (`config.data.augment`; MoCo v2's recipe in the
official code) and two captions, t¹ and t². In the official code t¹ is the MLM-masked caption,
which passes through the text tower once for both the MLM head and the contrastive terms, and t²
an EDA rewrite. `declip.masked_caption_contrastive=False` makes t¹ the plain caption (the masked
one then passes through the tower for the MLM head only), and `declip.eda=False` makes t² the
plain caption. The loss is

  L = w_mvs·MVS + w_iss·ISS + w_tss·TSS + w_nns·NNS   (0.4 / 0.2 / 0.2 / 0.2, official code)

- MVS: ¼ Σ over the 2 × 2 image/text view pairs of CLIP's symmetric InfoNCE
  (`declip.multi_view=False`: the (x¹, t¹) pair alone, i.e. CLIP's loss, for ablations).
- ISS: SimSiam between the two image views (projector and predictor on tower features).
- TSS: masked-LM cross-entropy on the masked positions of t¹.
- NNS: ¼ Σ_a Σ_b image→text InfoNCE of image view a against the nearest neighbours of text view
  b in a FIFO queue of past text embeddings, looked up before this step's texts are enqueued.

The queue is training state, sharded over the batch axes of the mesh (Q·d/devices per device).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clipjax import losses, nn_queue, sharding
from clipjax.errors import ConfigError
from clipjax.models.heads import MaskedLMHead, SimSiamHead
from clipjax.models.two_tower import TwoTower
from clipjax.objectives.base import Objective, Views, clamp_log_scale, log_scale_range

# The official code clamps θ (s = exp θ) into [3, 6] after each step (`declip.log_scale_range`),
# and s is capped at 100.
MAX_LOGIT_SCALE = 100.0
MLM_RATIO = 0.15


class DeClipModel(TwoTower):
    """The two towers plus DeCLIP's heads: SimSiam's projector and predictor on the image
    features (BatchNorm statistics over `simsiam_bn_groups` groups of the batch) and the
    masked-LM head, scoring up to `mlm_max_masked` positions a caption."""

    simsiam_bn_groups: int = 1
    mlm_max_masked: int = 1

    def setup(self):
        super().setup()
        self.simsiam = SimSiamHead(self.simsiam_bn_groups)
        self.masked_lm = MaskedLMHead(self.text_vocab_size, self.mlm_max_masked)

    def __call__(self, images, tokens, train: bool = False, mlm_labels=None):
        """TwoTower's outputs plus the SimSiam head's (z, p) on the image features
        (`image.simsiam`) and the masked-LM head's (logits, labels) at the masked positions
        of `mlm_labels` (`text.mlm`)."""
        out = super().__call__(images, tokens, train=train)
        out["image"]["simsiam"] = self.simsiam(out["image"]["features"], train=train)
        labels = jnp.zeros_like(tokens) if mlm_labels is None else mlm_labels
        out["text"]["mlm"] = self.masked_lm(out["text"]["states"], labels)
        return out


def _forward(model: DeClipModel, batch, train: bool, text_keys: tuple[str, str], tokens=False):
    """Both image views and the two contrastive captions (batch keys `text_keys`) through the
    towers, plus the SimSiam and MLM heads; with `tokens` (DeFILIP), FILIP's unit tokens of
    image view 1 and of the masked caption too (`image_tokens`, `text_tokens`)."""
    images = [
        model.encode_image(batch[key], train=train, tokens=tokens and key == "image")
        for key in ("image", "image_2")
    ]
    texts = [model.encode_text(batch[key], train=train) for key in text_keys]
    if text_keys[0] == "text_mlm":
        masked = texts[0]
    else:
        masked = model.encode_text(batch["text_mlm"], train=train)
    out = {
        "images": [view["embed"] for view in images],
        "texts": [view["embed"] for view in texts],
        "simsiam": [model.simsiam(view["features"], train=train) for view in images],
        "mlm": model.masked_lm(masked["states"], batch["mlm_labels"]),
        "log_scale": model.log_scale,
    }
    if tokens:
        out["image_tokens"], out["text_tokens"], out["token_log_scale"] = model.token_heads(
            images[0]["tokens"], masked["states"]
        )
    return out


def _terms(views: dict, queue: dict, logit_scale, *, axis_name, multi_view: bool, chunked: bool):
    """The four DeCLIP terms and the updated queue, on each device's slices (inside shard_map).

    `views`: "images" and "texts", [view 1, view 2] of (b, d) unit embeddings; "simsiam",
    [(z, p)] per image view; "mlm", (logits, labels). `queue`: `nn_queue` state. `chunked`
    computes the InfoNCE terms as rings over the devices (`config.clip.chunked`)."""
    clip_loss = losses.clip_loss_ring if chunked else losses.clip_loss
    info_nce = losses.info_nce_ring if chunked else losses.info_nce
    images, texts = views["images"], views["texts"]
    pairs = [(i, t) for i in images for t in texts] if multi_view else [(images[0], texts[0])]
    mvs = sum(clip_loss(i, t, logit_scale, axis_name) for i, t in pairs) / len(pairs)
    (z1, p1), (z2, p2) = views["simsiam"]
    iss = losses.simsiam_loss(p1, p2, z1, z2, axis_name)
    tss, mlm_accuracy = losses.masked_lm_loss(*views["mlm"], axis_name)
    # Neighbours come from the queue as it was before this step: never the batch itself.
    neighbours = [nn_queue.lookup(t, queue["embeds"], axis_name) for t in texts]
    nns = sum(info_nce(i, n, logit_scale, axis_name) for i in images for n in neighbours) / 4
    for t in texts:  # t¹ of the whole batch first, then t²
        queue = nn_queue.enqueue(queue, jax.lax.stop_gradient(t), axis_name)
    terms = {"mvs": mvs, "iss": iss, "tss": tss, "nns": nns, "mlm_accuracy": mlm_accuracy}
    return terms, queue


class DeClip(Objective):
    token_wise = False  # DeFILIP: the forward pass also gives FILIP's tokens
    no_accumulation = (
        "its SimSiam BatchNorm statistics and its feature queue are computed over the whole batch"
    )

    def __init__(self, config, mesh):
        cfg = config.declip
        text_keys = (
            "text_mlm" if cfg.masked_caption_contrastive else "text",
            "text_eda" if cfg.eda else "text",
        )
        kinds = {"text": "plain", "text_mlm": "mlm", "text_eda": "eda"}
        needed = ("text_mlm", *(key for key in text_keys if key != "text_mlm"))
        self.views = Views(
            image_views=2, text_views=tuple(kinds[key] for key in dict.fromkeys(needed))
        )
        self._forward = functools.partial(_forward, text_keys=text_keys, tokens=self.token_wise)
        if cfg.queue_size % sharding.data_parallel_size(mesh):
            raise ConfigError(
                f"config.declip.queue_size={cfg.queue_size} does not split over the "
                f"{sharding.data_parallel_size(mesh)} data-parallel devices; use a multiple."
            )
        groups = 1 if cfg.sync_bn else sharding.data_parallel_size(mesh)
        self.model = self._build_model(
            config,
            simsiam_bn_groups=groups,
            mlm_max_masked=max(1, math.ceil(MLM_RATIO * config.model.text.context_length)),
        )
        self.weights = {
            "mvs": cfg.mvs_weight,
            "iss": cfg.iss_weight,
            "tss": cfg.tss_weight,
            "nns": cfg.nns_weight,
        }
        self.log_scale_range = log_scale_range(cfg.log_scale_range, "declip.log_scale_range")
        self.queue_size, self.embed_dim = cfg.queue_size, config.model.embed_dim
        batched, whole = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()
        queue = {"embeds": batched, "pointer": whole, "count": whole}
        self._terms = jax.shard_map(
            functools.partial(
                _terms,
                axis_name=sharding.BATCH_AXES,
                multi_view=cfg.multi_view,
                chunked=config.clip.chunked,
            ),
            mesh=mesh,
            in_specs=(batched, queue, whole),  # every view is split over the batch axes
            out_specs=(whole, queue),
        )

    def _build_model(self, config, **fields) -> DeClipModel:
        return DeClipModel.from_config(config.model, **fields)

    def _extra_terms(self, params, out, batch) -> tuple[dict, dict]:
        """Terms a subclass adds to the four (DeFILIP's token-wise term), by weight name, and
        their metrics."""
        del params, out, batch
        return {}, {}

    def init_state(self, rng):
        queue = nn_queue.init(rng, self.queue_size, self.embed_dim)
        # The queue's rows are split over the batch axes, like the batch.
        return {**queue, "embeds": nn.LogicallyPartitioned(queue["embeds"], ("queue", None))}

    def constrain(self, params):
        return clamp_log_scale(params, self.log_scale_range)

    def loss(self, params, model_state, batch, state, rng):
        out, model_state = self.forward(params, model_state, batch, rng=rng, method=self._forward)
        logit_scale = jnp.minimum(jnp.exp(out["log_scale"]), MAX_LOGIT_SCALE)
        views = {key: out[key] for key in ("images", "texts", "simsiam", "mlm")}
        terms, queue = self._terms(views, state, logit_scale)
        extra_terms, extra_metrics = self._extra_terms(params, out, batch)
        terms.update(extra_terms)
        loss = sum(self.weights[k] * terms[k] for k in self.weights)
        metrics = {f"train/loss_{k}": terms[k] for k in self.weights}
        metrics["train/mlm_accuracy"] = terms["mlm_accuracy"]
        metrics["train/nn_queue_fill"] = nn_queue.fill(queue)
        metrics["train/logit_scale"] = logit_scale
        metrics.update(extra_metrics)
        return loss, (metrics, model_state, queue)
