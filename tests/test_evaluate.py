"""Zero-shot and retrieval metrics on hand-made embeddings with known answers."""

import numpy as np

from clipjax.evaluate.retrieval import recall_at_k
from clipjax.evaluate.zeroshot import class_embeddings, topk_accuracy


def test_class_embeddings_average_templates_then_normalise():
    prompts = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # 2 classes × 2
    classifier = class_embeddings(prompts, num_classes=2)
    np.testing.assert_allclose(classifier, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]])


def test_topk_accuracy_counts_the_true_class_rank():
    classifier = np.eye(4)
    # Image scores: class order by score is [0, 1, 2, 3] for every image.
    images = np.tile([0.4, 0.3, 0.2, 0.1], (4, 1))
    labels = np.array([0, 1, 2, 3])  # true-class ranks 0, 1, 2, 3
    accuracy = topk_accuracy(images, classifier, labels, ks=(1, 2, 3, 4))
    assert accuracy == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_recall_at_k_on_a_known_permutation():
    n = 12
    images = np.eye(n)
    # Caption i is closest to image i for the first 6 pairs; for the rest, caption i sits on
    # image (i + 1) mod n with a weaker link to image i, so the true image ranks second.
    captions = np.eye(n)
    for i in range(6, n):
        captions[i] = 0.9 * np.eye(n)[(i + 1) % n] + 0.1 * np.eye(n)[i]
    recall = recall_at_k(images, captions, ks=(1, 5, 10))
    assert recall["t2i_r1"] == 0.5
    assert recall["t2i_r5"] == 1.0
    # Images 6..11 score their own caption 0.1; image 7..11 and 0 also have a 0.9 caption.
    image_ranks = np.array(
        [(images[i] @ captions.T > images[i] @ captions[i]).sum() for i in range(n)]
    )
    assert recall["i2t_r1"] == np.mean(image_ranks < 1)
    assert recall["i2t_r10"] == np.mean(image_ranks < 10)


def test_perfect_embeddings_give_perfect_scores():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert set(recall_at_k(x, x).values()) == {1.0}
    assert topk_accuracy(x, x, np.arange(20), ks=(1,)) == {1: 1.0}
