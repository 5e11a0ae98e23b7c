"""Zero-shot classification from class-name prompts, and top-k accuracy of any scores."""

import numpy as np

from clipjax.evaluate import prompts

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
    objective = evaluation.objective
    images = embed(objective.embed_images, evaluation.images, evaluation.valid)
    classifier = class_embeddings(
        embed(objective.embed_texts, prepared["prompts"]), prepared["num_classes"]
    )
    accuracy = topk_accuracy(images @ classifier.T, prepared["labels"], ks=(1, 5))
    return {f"zeroshot_top{k}": v for k, v in accuracy.items()}
