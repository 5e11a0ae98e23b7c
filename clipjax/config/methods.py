"""Each objective's own config section, read only when `config.objective` names it."""

import math

import ml_collections


def methods() -> ml_collections.ConfigDict:
    """One section per objective, by name."""
    c = ml_collections.ConfigDict()
    for name, section in SECTIONS.items():
        c[name] = section()
    return c


def _clip() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # InfoNCE (CLIP; DeCLIP's MVS and NNS) as a ring over devices: (B/k)² logits per device
    s.chunked = True
    # θ = log(logit scale) is projected into this range after each update (open_clip's clamp)
    s.log_scale_range = (0.0, math.log(100.0))
    return s


def _siglip() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.chunked = True  # ring over devices: at most (B/k)² logits per device
    s.scale_init = math.log(10.0)  # t' with t = exp(t')
    s.bias_init = -10.0
    return s


def _declip() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.mvs_weight = 0.4  # official code: 0.4 / 0.2 / 0.2 / 0.2
    s.iss_weight = 0.2
    s.tss_weight = 0.2
    s.nns_weight = 0.2
    s.queue_size = 65_536  # one global FIFO of text embeddings, sharded over devices
    s.multi_view = True  # MVS over the 2 × 2 view pairs; False: the (x¹, t¹) pair only
    s.masked_caption_contrastive = True  # t¹ = the MLM-masked caption (official code)
    s.eda = True  # t² = an EDA rewrite of the caption; False: the caption itself
    s.sync_bn = False  # SimSiam BatchNorm statistics: per device (official) or synced
    s.log_scale_range = (3.0, 6.0)  # θ after each update (official); s is capped at 100
    return s


def _cliplite() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.prior_weight = 0.1  # total = (1 - w) · cross + w · prior
    s.image_prior = True
    s.text_prior = False
    s.prior_mode = "cooperative"  # or "adversarial" (Deep InfoMax's minimax)
    s.negative = "next"  # or "sampled": one caption drawn ∝ exp(critic)
    s.image_view_weight = 0.0  # > 0 adds JSD between two image views, own critic
    s.caption_view_weight = 0.0  # > 0 adds JSD between caption and its EDA rewrite
    return s


def _slip() -> ml_collections.ConfigDict:
    """SLIP as DeCLIP's codebase trains it (`model/slip.py`): CLIP on a base view, SimCLR on two
    MoCo v2 views of the same image, L = clip_weight·CLIP + ssl_weight·NT-Xent."""
    s = ml_collections.ConfigDict()
    s.clip_weight = 1.0
    s.ssl_weight = 1.0
    s.temperature = 0.1  # NT-Xent's τ, fixed
    s.head_width = 4096  # SimCLR head: Linear-BN-ReLU, Linear-BN-ReLU, Linear(head_dim)
    s.head_dim = 256
    s.sync_bn = False  # the head's BatchNorm statistics per device (the reference) or synced
    # The two self-supervised views (image_2, image_3); the base view uses config.data.augment.
    s.ssl_augment = ml_collections.ConfigDict(
        {"recipe": "mocov2", "crop_scale": (0.2, 1.0), "flip": True}
    )
    return s


def _filip() -> ml_collections.ConfigDict:
    """FILIP's token-wise term (`model/filip.py`): patch and caption tokens mapped to `dim`,
    the top `top_k` of each side of a pair selected and compared across the batch."""
    s = ml_collections.ConfigDict()
    s.dim = 256
    s.top_k = 16
    s.mask_padding = True  # False: the reference's form, padding and start token included
    s.chunked = True  # ring over devices: (B/k, B/k, tokens, k) similarities at a time
    s.clip_weight = 0.0  # the reference trains on the token-wise term alone
    s.filip_weight = 1.0
    s.log_scale_range = (0.0, math.log(100.0))  # both scales, θ after each update
    return s


def _defilip() -> ml_collections.ConfigDict:
    """DeFILIP (`model/defilip.py`): DeCLIP's terms (config.declip) plus FILIP's token-wise
    term (config.filip's mapping, selection and masking) on image view 1 and the masked
    caption, weighted `filip_weight` (the weights sum to 1.2, as in the reference)."""
    s = ml_collections.ConfigDict()
    s.filip_weight = 0.2
    return s


SECTIONS = {
    "clip": _clip,
    "siglip": _siglip,
    "declip": _declip,
    "cliplite": _cliplite,
    "slip": _slip,
    "filip": _filip,
    "defilip": _defilip,
}
