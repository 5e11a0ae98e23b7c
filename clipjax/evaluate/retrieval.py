"""Image↔text retrieval recall with several captions per image (COCO / Flickr30k style).

Ranks are positions in a stable descending sort of the scores: of two equal scores the lower
index comes first, so ties neither help nor hurt by chance.
"""

import math

import numpy as np

# A retrieval evaluation has only the fields every kind has (`clipjax.evaluate.KINDS`).
FIELDS = {}
METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))

# Score-matrix elements per chunk of queries: bounds memory for large m (COCO: 5k × 25k).
_CHUNK_ELEMENTS = 1 << 24


def _chunks(num_queries: int, num_candidates: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, num_candidates))
    for start in range(0, num_queries, step):
        yield slice(start, min(start + step, num_queries))


def _text_to_image_ranks(image_embeds, text_embeds, text_image) -> np.ndarray:
    """(m,) position of each caption's own image among all images, for each caption query."""
    ranks = []
    index = np.arange(len(image_embeds))
    for rows in _chunks(len(text_embeds), len(image_embeds)):
        scores = text_embeds[rows] @ image_embeds.T  # (c, n)
        own = text_image[rows][:, None]
        own_score = np.take_along_axis(scores, own, axis=1)
        before = (scores > own_score) | ((scores == own_score) & (index < own))
        ranks.append(before.sum(axis=1))
    return np.concatenate(ranks)


def _image_to_text_ranks(image_embeds, text_embeds, text_image) -> np.ndarray:
    """(n,) position of each image's first own caption among all captions (-1: no caption)."""
    ranks = []
    index = np.arange(len(text_embeds))
    for rows in _chunks(len(image_embeds), len(text_embeds)):
        scores = image_embeds[rows] @ text_embeds.T  # (c, m)
        own = text_image[None, :] == np.arange(rows.start, rows.stop)[:, None]
        best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
        first = np.argmax(own & (scores == best), axis=1)[:, None]  # the best own caption
        before = (scores > best) | ((scores == best) & (index < first))
        ranks.append(np.where(own.any(axis=1), before.sum(axis=1), -1))
    return np.concatenate(ranks)


def recall_at_k(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways for n images and m captions, caption j belonging to image
    `text_image[j]`.

    Args:
      image_embeds: (n, d); text_embeds: (m, d); scores are dot products (cosine similarity for
        unit vectors). text_image: (m,) int, each caption's image index.
    Returns:
      `i2t_r{k}`: fraction of images (those with a caption) that have ANY of their captions in
      their top k captions; `t2i_r{k}`: fraction of captions whose image is in their top k.
      All NaN for non-finite embeddings (NaN scores compare false and would rank first).
    """
    if not (np.isfinite(image_embeds).all() and np.isfinite(text_embeds).all()):
        return {f"{d}_r{k}": float("nan") for k in ks for d in ("i2t", "t2i")}
    text_image = np.asarray(text_image)
    t2i = _text_to_image_ranks(image_embeds, text_embeds, text_image)
    i2t = _image_to_text_ranks(image_embeds, text_embeds, text_image)
    i2t = i2t[i2t >= 0]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).mean())
        out[f"t2i_r{k}"] = float((t2i < k).mean())
    return out


def prepare(evaluation, data: dict) -> dict:
    """The captions of a retrieval evaluation (an `evaluator.Evaluator`) of `data` and the
    image of each; ValueError for a source without captions."""
    if not len(data["text"]):
        raise ValueError(
            f"config.evals.{evaluation.name}: source {evaluation.settings.source!r} has no "
            "captions; retrieval needs an image-caption source."
        )
    return {"captions": data["text"], "text_image": data["text_image"]}


def chance(text_image: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """The recall@k of a random ranking, exactly: t2i, k / n of the n images (those that
    `text_image` names); i2t, the mean over images of the chance that one of its m captions
    is among k of the M drawn at random, 1 - C(M - m, k) / C(M, k)."""
    text_image = np.asarray(text_image)
    num_images, num_texts = int(text_image.max()) + 1, len(text_image)
    per_image = np.bincount(text_image)
    per_image = per_image[per_image > 0]  # as `recall_at_k`, over the images with a caption
    levels = {}
    for k in ks:
        k_texts, k_images = min(k, num_texts), min(k, num_images)
        miss = [
            math.comb(num_texts - m, k_texts) / math.comb(num_texts, k_texts) for m in per_image
        ]
        levels[f"i2t_r{k}"] = float(1 - np.mean(miss))
        levels[f"t2i_r{k}"] = k_images / num_images
    return levels


def chance_levels(evaluation, prepared: dict) -> dict[str, float]:
    """What `score` gives a model that guesses."""
    return chance(prepared["text_image"])


def score(evaluation, prepared: dict, embed) -> dict[str, float]:
    """`i2t_r{1,5,10}`, `t2i_r{1,5,10}`; `embed(embed_fn, inputs[, valid])` gives float64
    embeddings."""
    objective = evaluation.objective
    images = embed(objective.embed_images, evaluation.images, evaluation.valid)
    captions = embed(objective.embed_texts, prepared["captions"])
    return recall_at_k(images, captions, prepared["text_image"])
