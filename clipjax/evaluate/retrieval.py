"""Image↔text retrieval recall with several captions per image (COCO / Flickr30k style).

Ranks are positions in a stable descending sort of the scores: of two equal scores the lower
index comes first, so ties neither help nor hurt by chance.
"""

import math

import numpy as np

from clipjax.evaluate import late_interaction

# A retrieval evaluation has only the fields every kind has (`clipjax.evaluate.KINDS`).
FIELDS = {}
METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))

# Score-matrix elements per chunk of queries: bounds memory for large m (COCO: 5k × 25k).
_CHUNK_ELEMENTS = 1 << 24


def _chunks(num_queries: int, num_candidates: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, num_candidates))
    for start in range(0, num_queries, step):
        yield slice(start, min(start + step, num_queries))


def _text_to_image_ranks(t2i_scores, num_images: int, text_image) -> np.ndarray:
    """(m,) position of each caption's own image among all images, for each caption query."""
    ranks = []
    index = np.arange(num_images)
    for rows in _chunks(len(text_image), num_images):
        scores = t2i_scores(rows)  # (c, n)
        own = text_image[rows][:, None]
        own_score = np.take_along_axis(scores, own, axis=1)
        before = (scores > own_score) | ((scores == own_score) & (index < own))
        ranks.append(before.sum(axis=1))
    return np.concatenate(ranks)


def _image_to_text_ranks(i2t_scores, num_images: int, text_image) -> np.ndarray:
    """(n,) position of each image's first own caption among all captions (-1: no caption)."""
    ranks = []
    index = np.arange(len(text_image))
    for rows in _chunks(num_images, len(text_image)):
        scores = i2t_scores(rows)  # (c, m)
        own = text_image[None, :] == np.arange(rows.start, rows.stop)[:, None]
        best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
        first = np.argmax(own & (scores == best), axis=1)[:, None]  # the best own caption
        before = (scores > best) | ((scores == best) & (index < first))
        ranks.append(np.where(own.any(axis=1), before.sum(axis=1), -1))
    return np.concatenate(ranks)


def recall(i2t_scores, t2i_scores, num_images: int, text_image, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways for n images and m captions, caption j belonging to image
    `text_image[j]`, from the scores of a slice of queries: `i2t_scores(rows)` (c, m) for the
    images `rows`, `t2i_scores(rows)` (c, n) for the captions `rows`.

    Returns:
      `i2t_r{k}`: fraction of images (those with a caption) that have ANY of their captions in
      their top k captions; `t2i_r{k}`: fraction of captions whose image is in their top k.
    """
    text_image = np.asarray(text_image)
    t2i = _text_to_image_ranks(t2i_scores, num_images, text_image)
    i2t = _image_to_text_ranks(i2t_scores, num_images, text_image)
    i2t = i2t[i2t >= 0]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).mean())
        out[f"t2i_r{k}"] = float((t2i < k).mean())
    return out


def recall_at_k(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """`recall` of embeddings, image_embeds (n, d) and text_embeds (m, d), scored by their dot
    products (cosine similarity for unit vectors). All NaN for non-finite embeddings (NaN
    scores compare false and would rank first)."""
    if not (np.isfinite(image_embeds).all() and np.isfinite(text_embeds).all()):
        return {f"{d}_r{k}": float("nan") for k in ks for d in ("i2t", "t2i")}
    return recall(
        lambda rows: image_embeds[rows] @ text_embeds.T,
        lambda rows: text_embeds[rows] @ image_embeds.T,
        len(image_embeds),
        text_image,
        ks,
    )


def token_recall_at_k(
    image_tokens: np.ndarray, text_tokens: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """`recall` of FILIP's token-wise scores (`late_interaction.scores`): image_tokens
    (n, P, d) and text_tokens (m, L, d), zero where a caption token does not count. An image
    ranks captions by the mean over its patches of the max over the caption's tokens; a caption
    ranks images by the mean over its tokens of the max over the image's patches."""
    text_mask = late_interaction.token_mask(text_tokens)
    return recall(
        lambda rows: late_interaction.scores(image_tokens[rows], text_tokens, key_mask=text_mask),
        lambda rows: late_interaction.scores(
            text_tokens[rows], image_tokens, query_mask=text_mask[rows]
        ),
        len(image_tokens),
        text_image,
        ks,
    )


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
    embeddings. An objective with `scores_tokens` (FILIP) is scored token-wise."""
    objective = evaluation.objective
    if getattr(objective, "scores_tokens", False):
        images = embed(objective.embed_image_tokens, evaluation.images, evaluation.valid)
        captions = embed(objective.embed_text_tokens, prepared["captions"])
        return token_recall_at_k(images, captions, prepared["text_image"])
    images = embed(objective.embed_images, evaluation.images, evaluation.valid)
    captions = embed(objective.embed_texts, prepared["captions"])
    return recall_at_k(images, captions, prepared["text_image"])
