"""Zero-shot classification from class-name prompts, and top-k accuracy of any scores.

Images are scored against each class's prompt-ensemble embedding, or, for an objective with
`scores_tokens` (FILIP), token-wise: each image by the mean over its patches of the max over
the class's tokens (`class_tokens`, `late_interaction.scores`), as DeCLIP's codebase evaluates
FILIP.
"""

import numpy as np

from clipjax.evaluate import late_interaction, prompts

# A zeroshot evaluation's own config fields, with their defaults (`clipjax.evaluate.KINDS`).
FIELDS = {
    "classes": "",  # "": the source's; "imagenet", "cifar10", "cifar100" or a file
    "templates": "",  # "": the source's; "clip" (80), "simple" or a file
}
METRICS = ("zeroshot_top1", "zeroshot_top5")


def class_embeddings(prompt_embeds: np.ndarray, num_classes: int) -> np.ndarray:
    """Average each class's prompt embeddings and re-normalise (CLIP's prompt ensembling).

    Args:
      prompt_embeds: (num_classes * num_templates, d) unit vectors, class-major order.
    Returns:
      (num_classes, d) unit vectors, one classifier row per class.
    """
    per_class = prompt_embeds.reshape(num_classes, -1, prompt_embeds.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def class_tokens(prompt_tokens: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Average each class's prompt tokens position by position (FILIP's prompt ensembling).

    Args:
      prompt_tokens: (num_classes * num_templates, L, d) unit tokens, class-major order; the
        zero vector at the positions that do not count (padding, the start token).
    Returns:
      (tokens (num_classes, L, d), mask (num_classes, L) bool): at each position the mean over
      the templates where it counts, each class's tokens then divided by their joint norm, as
      the reference does; `mask` marks the positions that count in some template.
    """
    tokens = prompt_tokens.reshape(num_classes, -1, *prompt_tokens.shape[1:])
    counts = late_interaction.token_mask(tokens).sum(axis=1)  # (C, L)
    mean = tokens.sum(axis=1) / np.maximum(counts, 1)[..., None]
    mean /= np.linalg.norm(mean.reshape(num_classes, -1), axis=1)[:, None, None]
    return mean, counts > 0


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among their k highest-scoring classes, for each k.

    Args:
      scores: (n, num_classes), e.g. image embeddings @ class embeddings.T, or logits.
      labels: (n,) int, each row's true class.
    Ties go to the lower class index, as with argmax: two classes with equal scores (e.g. one
    name listed twice) never both count as right. Non-finite scores give NaN: NaN compares
    false, so ranks counted by comparison would call every row right.
    """
    if not np.isfinite(scores).all():
        return dict.fromkeys(ks, float("nan"))
    labels = np.asarray(labels)
    true = np.take_along_axis(scores, labels[:, None], axis=1)
    classes = np.arange(scores.shape[1])
    rank = ((scores > true) | ((scores == true) & (classes < labels[:, None]))).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


def prepare(evaluation, data: dict) -> dict:
    """The labels and the tokenised class prompts of a zeroshot evaluation (an
    `evaluator.Evaluator`) of `data`; ValueError for classes that do not match the labels."""
    settings, field = evaluation.settings, f"config.evals.{evaluation.name}"
    labels = evaluation.labels(data, settings.source)
    try:
        names = prompts.class_names(settings.classes, data["class_names"])
        template_list = prompts.templates(settings.templates, data["prompt_templates"])
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}: {e}") from None
    if data["class_names"] and len(names) != len(data["class_names"]):
        raise ValueError(
            f"{field}: classes={settings.classes!r} gives {len(names)} class names but "
            f"source {settings.source!r} has {len(data['class_names'])} classes; use the "
            "class list that matches its labels."
        )
    if labels.max() >= len(names):
        raise ValueError(
            f"{field}: classes={settings.classes!r} gives {len(names)} class names but "
            f"source {settings.source!r} has label {labels.max()}; use the class list "
            "that matches its labels."
        )
    tokens = evaluation.tokenizer.encode(
        prompts.fill(template_list, names), evaluation.context_length
    )
    return {"labels": labels, "num_classes": len(names), "prompts": tokens}


def chance(num_classes: int, ks=(1, 5)) -> dict[int, float]:
    """The top-k accuracy of scores that rank the classes at random: min(k, C) / C."""
    return {k: min(k, num_classes) / num_classes for k in ks}


def chance_levels(evaluation, prepared: dict) -> dict[str, float]:
    """What `score` gives a model that guesses."""
    return {f"zeroshot_top{k}": v for k, v in chance(prepared["num_classes"]).items()}


def score(evaluation, prepared: dict, embed) -> dict[str, float]:
    """`zeroshot_top{1,5}`; `embed(embed_fn, inputs[, valid])` gives float64 embeddings."""
    objective, num_classes = evaluation.objective, prepared["num_classes"]
    if getattr(objective, "scores_tokens", False):
        images = embed(objective.embed_image_tokens, evaluation.images, evaluation.valid)
        tokens, mask = class_tokens(
            embed(objective.embed_text_tokens, prepared["prompts"]), num_classes
        )
        scores = late_interaction.scores(images, tokens, key_mask=mask)
    else:
        images = embed(objective.embed_images, evaluation.images, evaluation.valid)
        classifier = class_embeddings(
            embed(objective.embed_texts, prepared["prompts"]), num_classes
        )
        scores = images @ classifier.T
    accuracy = topk_accuracy(scores, prepared["labels"], ks=(1, 5))
    return {f"zeroshot_top{k}": v for k, v in accuracy.items()}
