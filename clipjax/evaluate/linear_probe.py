"""Linear probe: multinomial logistic regression on frozen features, fit full-batch by L-BFGS.

The objective is the (weighted) mean cross-entropy plus `l2 / 2 · ‖W‖²` (the bias is not
penalised), on features standardised with the training set's mean and standard deviation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from clipjax.evaluate import zeroshot
from clipjax.evaluate.zeroshot import topk_accuracy

# A linear_probe evaluation's own config fields, with their defaults (`clipjax.evaluate.KINDS`).
FIELDS = {
    "train_source": "",  # labelled examples to fit the probe on
    "train_examples": -1,
    "holdout": 0.2,  # part of train_source that chooses the L2 strength
    "l2": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "steps": 500,
    # "tower": the image tower's output before the projection, as the CLIP and CLIP-Lite
    # papers probe; "embed": the unit embedding that zero-shot and retrieval use.
    "features": "tower",
}
FEATURES = ("tower", "embed")
METRICS = ("probe_top1", "probe_top5", "probe_l2")

_GRAD_TOL = 1e-6  # L-BFGS stops early once the objective's gradient norm is this small


def _objective(params, x, onehot, weights, l2):
    logits = x @ params["w"] + params["b"]
    cross_entropy = -(onehot * jax.nn.log_softmax(logits)).sum(axis=-1)
    data_term = (weights * cross_entropy).sum() / weights.sum()
    return data_term + 0.5 * l2 * (params["w"] ** 2).sum()


@functools.partial(jax.jit, static_argnames="num_classes")
def _fit(features, labels, weights, l2, steps, *, num_classes):
    total = weights.sum()
    mean = (weights[:, None] * features).sum(axis=0) / total
    var = (weights[:, None] * (features - mean) ** 2).sum(axis=0) / total
    scale = jnp.maximum(jnp.sqrt(var), 1e-6)  # constant features stay at 0
    loss = functools.partial(
        _objective,
        x=(features - mean) / scale,
        onehot=jax.nn.one_hot(labels, num_classes),
        weights=weights,
        l2=l2,
    )
    params = {
        "w": jnp.zeros((features.shape[1], num_classes), features.dtype),
        "b": jnp.zeros((num_classes,), features.dtype),
    }
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < steps) & (grad_norm > _GRAD_TOL))

    params, _ = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    return {"mean": mean, "scale": scale, **params}


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float,
    steps: int,
    weights: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Fit the probe; at most `steps` L-BFGS iterations.

    Args:
      features: (n, d); labels: (n,) int in [0, num_classes); weights: (n,) per-example weights
        of the data term (and of the standardisation), default all 1 (0 leaves an example out).
    Returns:
      {"mean": (d,), "scale": (d,), "w": (d, num_classes), "b": (num_classes,)}, float32; the
      logits of x are `((x - mean) / scale) @ w + b` (see `predict`).
    """
    if weights is None:
        weights = np.ones(len(features), np.float32)
    probe_params = _fit(
        jnp.asarray(features, jnp.float32),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(weights, jnp.float32),
        jnp.float32(l2),
        jnp.int32(steps),
        num_classes=num_classes,
    )
    return jax.tree.map(np.asarray, probe_params)


def predict(probe_params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """(n, d) features → (n, num_classes) logits."""
    x = (features - probe_params["mean"]) / probe_params["scale"]
    return x @ probe_params["w"] + probe_params["b"]


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool, True for the held-out examples: `fraction` of each class (at least one and
    never all of a class with two or more examples), chosen with `seed`."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) > 1:
            held[members[: min(max(round(fraction * len(members)), 1), len(members) - 1)]] = True
    return held


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.take_along_axis(log_probs, labels[:, None], axis=1).mean())


def probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    l2_grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    holdout: float = 0.2,
    steps: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """Choose the L2 strength on a held-out part of the training features, refit on all of
    them, and score the test features.

    The chosen strength has the best held-out top-1 accuracy (ties: the lower held-out
    cross-entropy). Returns {"top1", "top5", "l2"}.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    l2_grid = [float(l2) for l2 in l2_grid]
    chosen = l2_grid[0]
    if len(l2_grid) > 1:
        held = holdout_mask(train_labels, holdout, seed)
        if not held.any():
            raise ValueError(
                f"linear probe: {len(train_labels)} training examples leave none to hold out "
                "for choosing the L2 strength; use more, or a single l2 value."
            )
        best = None
        for l2 in l2_grid:
            probe_params = fit(
                train_feats, train_labels, num_classes, l2, steps, weights=(~held).astype(float)
            )
            logits = predict(probe_params, train_feats[held])
            top1 = topk_accuracy(logits, train_labels[held], ks=(1,))[1]
            score = (-top1, _mean_cross_entropy(logits, train_labels[held]))
            if best is None or score < best:
                best, chosen = score, l2
    probe_params = fit(train_feats, train_labels, num_classes, chosen, steps)
    accuracy = topk_accuracy(predict(probe_params, test_feats), test_labels, ks=(1, 5))
    return {"top1": accuracy[1], "top5": accuracy[5], "l2": chosen}


def prepare(evaluation, data: dict) -> dict:
    """The labels, and the labelled `train_source` images to fit on, of a linear_probe
    evaluation (an `evaluator.Evaluator`) of `data`; ValueError for a bad `features` or
    sources whose classes differ."""
    settings, field = evaluation.settings, f"config.evals.{evaluation.name}"
    if settings.features not in FEATURES:
        raise ValueError(
            f"{field}.features={settings.features!r} is not one of {', '.join(FEATURES)}."
        )
    labels = evaluation.labels(data, settings.source)
    train = evaluation.load(settings.train_source, num_examples=settings.train_examples)
    train_labels = evaluation.labels(train, settings.train_source)
    names, train_names = data["class_names"], train["class_names"]
    if names and train_names and names != train_names:
        raise ValueError(
            f"{field}: source {settings.source!r} and train_source "
            f"{settings.train_source!r} name different classes ({len(names)} vs "
            f"{len(train_names)}); their labels must mean the same classes."
        )
    num_classes = max(len(names), len(train_names), labels.max() + 1, train_labels.max() + 1)
    return {
        "labels": labels,
        "train_images": train["image"],
        "train_valid": train["valid"],
        "train_labels": train_labels,
        "num_classes": int(num_classes),
    }


def chance_levels(evaluation, prepared: dict) -> dict[str, float]:
    """What `score` gives features that carry nothing of the class: a guess among them."""
    return {f"probe_top{k}": v for k, v in zeroshot.chance(prepared["num_classes"]).items()}


def score(evaluation, prepared: dict, embed) -> dict[str, float]:
    """`probe_top{1,5}` and the chosen `probe_l2`; `embed(embed_fn, inputs[, valid])` gives
    float64 embeddings."""
    settings, objective = evaluation.settings, evaluation.objective
    features = {"tower": objective.image_features, "embed": objective.embed_images}[
        settings.features
    ]
    result = probe(
        embed(features, prepared["train_images"], prepared["train_valid"]),
        prepared["train_labels"],
        embed(features, evaluation.images, evaluation.valid),
        prepared["labels"],
        prepared["num_classes"],
        l2_grid=tuple(settings.l2),
        holdout=settings.holdout,
        steps=settings.steps,
    )
    return {f"probe_{k}": v for k, v in result.items()}
