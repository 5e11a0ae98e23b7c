"""Zero-shot classification from class-name prompts."""

import numpy as np


def class_embeddings(prompt_embeds: np.ndarray, num_classes: int) -> np.ndarray:
    """Average each class's prompt embeddings and re-normalise.

    Args:
      prompt_embeds: (num_classes * num_templates, d) unit vectors, class-major order.
    Returns:
      (num_classes, d) unit vectors, one classifier row per class.
    """
    per_class = prompt_embeds.reshape(num_classes, -1, prompt_embeds.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def topk_accuracy(
    image_embeds: np.ndarray, classifier: np.ndarray, labels: np.ndarray, ks=(1, 5)
) -> dict[int, float]:
    """Fraction of images whose label is among the k highest-scoring classes, for each k."""
    scores = image_embeds @ classifier.T
    # Rank of the true class = number of classes scoring strictly higher.
    rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}
