"""Evaluations: metrics on hand-made embeddings with known answers, prompt lists, the linear
probe against a float64 reference, and the Evaluators end to end on a tiny model."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import config as config_lib
from clipjax import sharding, train
from clipjax.data import eval_input, shapes
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.evaluate import evaluator as evaluator_lib
from clipjax.evaluate import late_interaction, linear_probe, prompts, retrieval, zeroshot
from clipjax.evaluate.retrieval import recall_at_k
from clipjax.evaluate.zeroshot import chance as class_chance
from clipjax.evaluate.zeroshot import class_embeddings, topk_accuracy
from tests.tiny import tiny_config

# ---------------------------------------------------------------------------- zero-shot


def _unit(degrees: float) -> np.ndarray:
    return np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])


def test_class_embeddings_average_templates_then_normalise():
    prompt_embeds = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # 2 classes × 2
    classifier = class_embeddings(prompt_embeds, num_classes=2)
    np.testing.assert_allclose(classifier, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]])


def test_prompt_ensemble_fixes_what_one_template_gets_wrong():
    # Class 0's templates point at 60° and -40° (mean 10°), class 1's at 50° and 130° (mean 90°).
    prompt_embeds = np.stack([_unit(60), _unit(-40), _unit(50), _unit(130)])
    images, labels = np.stack([_unit(40), _unit(95)]), np.array([0, 1])
    classifier = class_embeddings(prompt_embeds, num_classes=2)
    np.testing.assert_allclose(classifier, [_unit(10), _unit(90)], atol=1e-12)
    assert topk_accuracy(images @ classifier.T, labels, ks=(1,)) == {1: 1.0}
    # The first template alone: image 0 is nearer 50° than 60°, image 1 nearer 60° than 50°.
    first_template = prompt_embeds[[0, 2]]
    assert topk_accuracy(images @ first_template.T, labels, ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_topk_accuracy_counts_the_true_class_rank():
    # Scores order the classes [0, 1, 2, 3] for every row; true-class ranks 0, 1, 2, 3.
    scores = np.tile([0.4, 0.3, 0.2, 0.1], (4, 1))
    accuracy = topk_accuracy(scores, np.array([0, 1, 2, 3]), ks=(1, 2, 3, 4))
    assert accuracy == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_topk_accuracy_breaks_ties_like_argmax():
    # Classes 1 and 2 score the same (one name listed twice): only class 1 can be top-1.
    scores = np.array([[0.1, 0.5, 0.5], [0.1, 0.5, 0.5]])
    labels = np.array([1, 2])
    assert topk_accuracy(scores, labels, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    assert np.mean(scores.argmax(axis=1) == labels) == 0.5


# ---------------------------------------------------------------------------- retrieval


def _brute_force_recall(images, texts, text_image, ks):
    """Each query's candidates sorted (stable, descending); the position of the first hit."""
    i2t, t2i = [], []
    for i in range(len(images)):
        own = [j for j in range(len(texts)) if text_image[j] == i]
        if own:
            order = list(np.argsort(-(texts @ images[i]), kind="stable"))
            i2t.append(min(order.index(j) for j in own))
    for j in range(len(texts)):
        order = list(np.argsort(-(images @ texts[j]), kind="stable"))
        t2i.append(order.index(text_image[j]))
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(np.array(i2t) < k))
        out[f"t2i_r{k}"] = float(np.mean(np.array(t2i) < k))
    return out


def test_recall_with_several_captions_per_image_known_answer():
    images = np.eye(3)
    text_image = np.array([0, 0, 1, 2, 2])
    texts = np.array(
        [
            [0.2, 0.9, 0.0],  # image 0's, but nearer image 1
            [0.8, 0.0, 0.1],  # image 0's
            [0.5, 0.6, 0.0],  # image 1's
            [0.0, 0.0, 1.0],  # image 2's
            [0.9, 0.0, 0.3],  # image 2's, but nearer image 0
        ]
    )
    recall = recall_at_k(images, texts, text_image, ks=(1, 2))
    # Caption ranks of their image: 1, 0, 0, 0, 1. Image 0's best caption (0.8) trails caption
    # 4 (0.9); image 1's (0.6) trails caption 0 (0.9); image 2's (1.0) leads.
    assert recall == {"t2i_r1": 0.6, "t2i_r2": 1.0, "i2t_r1": 1 / 3, "i2t_r2": 1.0}


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7])
def test_recall_matches_brute_force_with_ties_and_chunks(monkeypatch, chunk_elements):
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(0)
    # Small integer vectors: many exactly tied scores, and some repeated captions.
    images = rng.integers(-2, 3, size=(15, 4)).astype(float)
    text_image = rng.integers(0, 12, size=40)  # images 12-14 have no caption
    texts = rng.integers(-2, 3, size=(40, 4)).astype(float)
    texts[5] = texts[6]
    ks = (1, 3, 5, 10)
    got = recall_at_k(images, texts, text_image, ks)
    want = _brute_force_recall(images, texts, text_image, ks)
    assert got == pytest.approx(want, abs=1e-12)


def test_perfect_embeddings_give_perfect_scores():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    captions = np.repeat(x, 3, axis=0) + 1e-3 * rng.normal(size=(60, 8))  # 3 per image
    assert set(recall_at_k(x, captions, np.repeat(np.arange(20), 3)).values()) == {1.0}
    assert topk_accuracy(x @ x.T, np.arange(20), ks=(1,)) == {1: 1.0}


# ---------------------------------------------------------------------------- prompts


def test_chance_levels_equal_the_mean_over_every_random_ranking():
    """The chance level of each metric is its exact mean over all rankings of the candidates:
    enumerated here (5 captions of 3 images; 4 classes), against the closed forms."""
    text_image = np.array([0, 0, 1, 2, 2])  # images with 2, 1 and 2 captions
    levels = retrieval.chance(text_image, ks=(1, 2))
    rows = []
    for text_order in itertools.permutations(range(5)):
        for image_order in itertools.permutations(range(3)):
            # Every query ranks the candidates alike: over all orders, every ranking equally.
            text_scores, image_scores = np.empty(5), np.empty(3)
            text_scores[list(text_order)] = np.arange(5, 0, -1)
            image_scores[list(image_order)] = np.arange(3, 0, -1)
            rows.append(
                _recall_from_scores(
                    np.tile(text_scores, (3, 1)), np.tile(image_scores, (5, 1)), text_image, (1, 2)
                )
            )
    for key, value in levels.items():
        assert value == pytest.approx(np.mean([r[key] for r in rows]), abs=1e-12), key
    # Zero-shot and probe: k of C classes.
    labels = np.array([0, 1, 2, 3])
    accuracies = [
        topk_accuracy(np.tile(np.array(order, float), (4, 1)), labels, ks=(1, 2, 5))
        for order in itertools.permutations(range(4))
    ]
    for k, value in class_chance(4, ks=(1, 2, 5)).items():
        assert value == pytest.approx(np.mean([a[k] for a in accuracies]), abs=1e-12)


def _recall_from_scores(scores_i2t, scores_t2i, text_image, ks):
    """recall@k from (images, texts) and (texts, images) score matrices, by brute force."""
    out = {}
    for k in ks:
        top_texts = np.argsort(-scores_i2t, axis=1, kind="stable")[:, :k]
        hits = [
            np.isin(np.flatnonzero(text_image == i), top).any() for i, top in enumerate(top_texts)
        ]
        top_images = np.argsort(-scores_t2i, axis=1, kind="stable")[:, :k]
        out[f"i2t_r{k}"] = np.mean(hits)
        out[f"t2i_r{k}"] = np.mean([text_image[j] in top for j, top in enumerate(top_images)])
    return out


def test_presets_have_the_standard_sizes_and_order():
    imagenet = prompts.class_names("imagenet", [])
    assert len(imagenet) == 1000
    assert imagenet[:3] == ["tench", "goldfish", "great white shark"]
    assert imagenet[-1] == "toilet paper"
    cifar10 = prompts.class_names("cifar10", None)
    assert cifar10 == ["airplane", "automobile", "bird", "cat", "deer"] + cifar10[5:]
    assert len(cifar10) == 10 and cifar10[-1] == "truck"
    cifar100 = prompts.class_names("cifar100", [])
    assert len(cifar100) == len(set(cifar100)) == 100
    # CIFAR-100's fine labels are its sorted names (which use '_' where these have ' ').
    assert [n.replace(" ", "_") for n in cifar100] == sorted(n.replace(" ", "_") for n in cifar100)
    clip = prompts.templates("clip", [])
    assert len(clip) == len(set(clip)) == 80
    assert all(t.count("{}") == 1 for t in clip)
    assert "itap of a {}." in clip


def test_empty_settings_use_the_source_then_fall_back():
    assert prompts.class_names("", ["a", "b"]) == ["a", "b"]
    assert prompts.templates("", ["x {}", "y {}"]) == ["x {}", "y {}"]
    assert (
        prompts.templates("", []) == prompts.templates("simple", ["x {}"]) == ["a photo of a {}."]
    )
    with pytest.raises(ValueError, match="no class names"):
        prompts.class_names("", [])


def test_list_files_skip_comments_and_blank_lines(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\nred circle\n\n  blue star  \n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} drawn.\n# comment\na {} in {braces}.\n")
    assert prompts.class_names(str(classes), ["ignored"]) == ["red circle", "blue star"]
    template_list = prompts.templates(str(templates), [])
    assert prompts.fill(template_list, ["x", "y"]) == [
        "a x drawn.",
        "a x in {braces}.",
        "a y drawn.",
        "a y in {braces}.",
    ]


def test_prompt_setting_errors(tmp_path):
    with pytest.raises(ValueError, match=r"classes='imagenet21k' is neither a preset"):
        prompts.class_names("imagenet21k", ["a"])
    with pytest.raises(ValueError, match=r"templates='/nope.txt' is neither a preset"):
        prompts.templates("/nope.txt", [])
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match=r"needs '\{\}'.*1 do not, e.g. 'a photo'"):
        prompts.templates(str(bad), [])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no entries"):
        prompts.class_names(str(empty), [])


# ---------------------------------------------------------------------------- linear probe


def _clusters(seed, n, d, num_classes, spread, label_noise):
    """Gaussian clusters around random centres; `label_noise` of the labels redrawn at random."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, d))
    labels = rng.integers(0, num_classes, n)
    features = centres[labels] + spread * rng.normal(size=(n, d))
    flip = rng.random(n) < label_noise
    labels = np.where(flip, rng.integers(0, num_classes, n), labels)
    return features.astype(np.float32), labels


def test_fit_reaches_the_float64_optimum():
    rng = np.random.default_rng(0)
    n, d, num_classes, l2 = 60, 5, 3, 1e-2
    labels = rng.integers(0, num_classes, n)
    features = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + 2.0
    features[np.arange(n), labels] += 1.0
    weights = (rng.random(n) < 0.8).astype(float)  # some examples left out
    fitted = linear_probe.fit(features, labels, num_classes, l2, steps=500, weights=weights)

    # Standardisation uses the weighted examples' mean and standard deviation.
    kept = features[weights > 0]
    np.testing.assert_allclose(fitted["mean"], kept.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(fitted["scale"], kept.std(axis=0), rtol=1e-4)
    # Gradient of mean cross-entropy + l2/2 ‖W‖² in float64 at the solution: zero.
    x = (kept - kept.mean(axis=0)) / kept.std(axis=0)
    w, b = fitted["w"].astype(np.float64), fitted["b"].astype(np.float64)
    logits = x @ w + b
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    residual = probs - np.eye(num_classes)[labels[weights > 0]]
    grad_w = x.T @ residual / len(x) + l2 * w
    grad_b = residual.mean(axis=0)
    assert np.abs(w).max() > 0.1  # a real solution, not the zero start
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5
    # `predict` applies the same standardisation.
    np.testing.assert_allclose(linear_probe.predict(fitted, kept), logits, atol=1e-4)


def test_holdout_mask_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    held = linear_probe.holdout_mask(labels, 0.2, seed=3)
    assert [held[labels == c].sum() for c in range(4)] == [2, 4, 1, 0]
    np.testing.assert_array_equal(held, linear_probe.holdout_mask(labels, 0.2, seed=3))
    assert (held != linear_probe.holdout_mask(labels, 0.2, seed=4)).any()


def test_probe_chooses_weak_l2_on_clean_data_and_strong_on_noisy():
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    # Well-separated clusters, many examples: perfect, and the weakest penalty fits best.
    x, y = _clusters(0, n=400, d=16, num_classes=4, spread=0.5, label_noise=0.0)
    clean = linear_probe.probe(x[:300], y[:300], x[300:], y[300:], 4, grid, 0.25, 200, seed=0)
    assert clean == {"top1": 1.0, "top5": 1.0, "l2": 1e-4}
    # Overlapping clusters, 30% wrong labels, 80 examples in 32 dimensions: an unpenalised fit
    # memorises noise, so held-out accuracy picks a strong penalty; still well above chance.
    x, y = _clusters(0, n=400, d=32, num_classes=4, spread=2.0, label_noise=0.3)
    noisy = linear_probe.probe(x[:80], y[:80], x[80:], y[80:], 4, grid, 0.3, 200, seed=0)
    assert noisy["l2"] >= 0.1
    assert noisy["top1"] > 0.4  # chance: 0.25


# ---------------------------------------------------------------------------- Evaluator


@pytest.fixture(scope="module")
def tiny_setup():
    """A tiny CLIP's objective and initial state, a tokenizer, the mesh and the config."""
    config = tiny_config()
    config.evals.shapes.num_examples = 36  # not a multiple of the batch: a padded chunk
    tokenizer = tokenizer_lib.train(shapes.ShapesSource("train").captions(2000), 256)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, init, _, _ = train.build(config, mesh)
        state = init(jax.random.PRNGKey(0))
        yield config, objective, state, tokenizer, mesh


def test_evaluators_end_to_end(tiny_setup):
    config, objective, state, tokenizer, mesh = tiny_setup
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        evaluators = evaluator_lib.make_evaluators(
            config, objective=objective, tokenizer=tokenizer, mesh=mesh
        )
        results = evaluator_lib.run_all(evaluators, state.params, state.model_state)
        zeroshot = evaluators[0]
        images = zeroshot.images[zeroshot.valid]
        direct = jax.jit(objective.embed_images)(state.params, state.model_state, images)
        chunked = zeroshot._embed(
            objective.embed_images,
            state.params,
            state.model_state,
            zeroshot.images,
            zeroshot.valid,
        )
    assert [e.name for e in evaluators] == sorted(config.evals)
    metrics = {
        "shapes": ["zeroshot_top1", "zeroshot_top5"],
        "shapes_probe": ["probe_top1", "probe_top5", "probe_l2"],
        "shapes_retrieval": [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)],
    }
    assert set(results) == {f"eval/{name}/{m}" for name, ms in metrics.items() for m in ms}
    for key, value in results.items():
        assert isinstance(value, float)
        if key.endswith("probe_l2"):
            assert value in config_lib.eval_settings(config.evals.shapes_probe).l2
        else:
            assert 0.0 <= value <= 1.0
    assert results["eval/shapes/zeroshot_top1"] <= results["eval/shapes/zeroshot_top5"]
    chance = evaluator_lib.chance_all(evaluators)  # 48 classes; n images of 1 caption each
    assert chance["eval/shapes/zeroshot_top5"] == chance["eval/shapes_probe/probe_top5"] == 5 / 48
    n = len(next(e for e in evaluators if e.kind == "retrieval").prepared["captions"])
    assert chance["eval/shapes_retrieval/t2i_r10"] == 10 / n
    assert chance["eval/shapes_retrieval/i2t_r1"] == pytest.approx(1 / n)
    assert set(chance) < set(results)
    # Chunked, padded and sharded over 8 devices: the same embeddings as one direct call.
    assert zeroshot.valid.sum() == 36 and zeroshot.batch_size == 16
    assert zeroshot.images.shape[0] == 48  # 3 chunks of slots
    np.testing.assert_allclose(chunked, np.asarray(direct), atol=1e-5)
    # 48 classes × the source's 6 templates.
    assert len(zeroshot.prepared["prompts"]) == len(shapes.CLASS_NAMES) * len(
        shapes.PROMPT_TEMPLATES
    )


@pytest.mark.parametrize("features", ["tower", "embed"])
def test_probe_fits_the_chosen_features(tiny_setup, features):
    """The probe's metrics are those of linear_probe.probe on the tower's output before the
    projection (width_v), or on the unit embeddings (embed_dim)."""
    config, objective, state, tokenizer, mesh = tiny_setup
    config = config.copy_and_resolve_references()  # the fixture's is shared
    config.evals = {"probe": config.evals.shapes_probe}
    config.evals.probe.features = features
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        (probe,) = evaluator_lib.make_evaluators(
            config, objective=objective, tokenizer=tokenizer, mesh=mesh
        )
        results = probe(state.params, state.model_state)
        fitted = probe.prepared
        embed_fn = jax.jit(
            objective.image_features if features == "tower" else objective.embed_images
        )
        train, test = (
            np.asarray(embed_fn(state.params, state.model_state, images), np.float64)
            for images in (fitted["train_images"][fitted["train_valid"]], probe.images[probe.valid])
        )
    width = objective.model.image_features_dim if features == "tower" else config.model.embed_dim
    assert train.shape[1] == width
    settings = probe.settings
    want = linear_probe.probe(
        train,
        fitted["train_labels"],
        test,
        fitted["labels"],
        fitted["num_classes"],
        tuple(settings.l2),
        settings.holdout,
        settings.steps,
    )
    assert results["eval/probe/probe_l2"] == want["l2"]
    np.testing.assert_allclose(results["eval/probe/probe_top1"], want["top1"], atol=1 / len(test))


def _fake_eval_arrays(labels, class_names, num_captions=0):
    def eval_arrays(spec, **kwargs):
        del spec, kwargs
        n = len(labels)
        return {
            "image": np.zeros((n, 16, 16, 3), np.uint8),
            "valid": np.ones(n, bool),
            "label": np.asarray(labels, np.int32),
            "text": np.zeros((num_captions, 16), np.int32),
            "text_image": np.zeros((num_captions,), np.int32),
            "class_names": list(class_names),
            "prompt_templates": [],
            "skipped": 0,
        }

    return eval_arrays


@pytest.mark.parametrize(
    "entry, labels, class_names, message",
    [
        (
            {"kind": "zeroshot", "source": "csv:/d/x.csv"},
            [-1, -1],
            [],
            "'csv:/d/x.csv' has no class",
        ),
        ({"kind": "zeroshot", "source": "s"}, [0, -1], ["a", "b"], "1 of 2 examples"),
        ({"kind": "zeroshot", "classes": "cifar10"}, [0, 1], ["a", "b"], "gives 10 class names"),
        ({"kind": "zeroshot", "classes": "cifar10"}, [0, 10], [], "has label 10"),
        ({"kind": "zeroshot", "classes": "imagenet21k"}, [0, 1], ["a", "b"], "neither a preset"),
        ({"kind": "retrieval", "source": "folder:/v"}, [0, 1], ["a", "b"], "has no captions"),
        ({"kind": "linear_probe", "train_source": "t"}, [-1, -1], [], "no class labels"),
        (
            {"kind": "linear_probe", "train_source": "t", "features": "pooled"},
            [0, 1],
            ["a", "b"],
            r"features='pooled' is not one of tower, embed\.",
        ),
    ],
)
def test_evaluator_rejects_data_that_does_not_fit(
    tiny_setup, monkeypatch, entry, labels, class_names, message
):
    config, objective, _, tokenizer, mesh = tiny_setup
    monkeypatch.setattr(eval_input, "eval_arrays", _fake_eval_arrays(labels, class_names))
    with pytest.raises(ValueError, match=message) as error:
        evaluator_lib.Evaluator(
            "mine",
            config_lib.eval_settings(entry),
            objective=objective,
            tokenizer=tokenizer,
            mesh=mesh,
            image_size=16,
            context_length=16,
            max_skipped_fraction=0.01,
        )
    assert str(error.value).startswith("config.evals.mine")


def test_a_diverged_model_scores_nan_never_perfect(tiny_setup):
    config, objective, state, tokenizer, mesh = tiny_setup
    params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        evaluators = evaluator_lib.make_evaluators(
            config, objective=objective, tokenizer=tokenizer, mesh=mesh
        )
        results = evaluator_lib.run_all(evaluators, params, state.model_state)
    assert len(results) == 11 and all(math.isnan(v) for v in results.values()), results
    # The rank functions alone: NaN scores compare false and would rank every row first.
    scores = np.full((4, 3), np.nan)
    assert all(math.isnan(v) for v in topk_accuracy(scores, np.arange(4) % 3).values())
    recall = recall_at_k(np.full((4, 2), np.nan), np.ones((4, 2)), np.arange(4))
    assert len(recall) == 6 and all(math.isnan(v) for v in recall.values())


# ------------------------------------------------------------- token-wise scores (FILIP)


def _unit_tokens(rng, *shape):
    tokens = rng.normal(size=shape)
    return tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)


def _late_interaction_loops(queries, query_counts, keys, key_counts):
    """scores[i, j]: the mean over query i's first `query_counts[i]` tokens of the max over key
    j's first `key_counts[j]` tokens of their dot products, by loops."""
    out = np.zeros((len(queries), len(keys)))
    for i, q in enumerate(queries):
        for j, k in enumerate(keys):
            out[i, j] = np.mean(
                [max(a @ b for b in k[: key_counts[j]]) for a in q[: query_counts[i]]]
            )
    return out


@pytest.mark.parametrize("max_elements", [1 << 24, 50])
def test_late_interaction_matches_its_definition_with_masks_and_chunks(max_elements):
    rng = np.random.default_rng(0)
    queries, keys = _unit_tokens(rng, 7, 5, 4), _unit_tokens(rng, 6, 3, 4)
    query_counts, key_counts = rng.integers(1, 6, size=7), rng.integers(1, 4, size=6)
    keys[np.arange(3)[None, :] >= key_counts[:, None]] = 0.0  # as the text towers give them
    query_mask = np.arange(5)[None, :] < query_counts[:, None]
    key_mask = late_interaction.token_mask(keys)
    np.testing.assert_array_equal(key_mask, np.arange(3)[None, :] < key_counts[:, None])
    got = late_interaction.scores(
        queries, keys, query_mask=query_mask, key_mask=key_mask, max_elements=max_elements
    )
    want = _late_interaction_loops(queries, query_counts, keys, key_counts)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    every = late_interaction.scores(queries, keys, max_elements=max_elements)
    np.testing.assert_allclose(every, _late_interaction_loops(queries, [5] * 7, keys, [3] * 6))


def test_token_wise_zeroshot_matches_its_definition():
    """`class_tokens` + late interaction against loops over the definition: per class and
    position the mean over the templates where the position counts, the class's tokens divided
    by their joint norm; an image's score the mean over patches of the max over those tokens."""
    rng = np.random.default_rng(0)
    classes, templates, length, patches, dim, n = 3, 4, 5, 6, 4, 7
    tokens = _unit_tokens(rng, classes * templates, length, dim)
    counts = rng.integers(1, length, size=classes * templates)  # each prompt's tokens
    tokens[np.arange(length)[None, :] >= counts[:, None]] = 0.0
    images = _unit_tokens(rng, n, patches, dim)
    want = np.zeros((n, classes))
    for c in range(classes):
        rows = tokens[c * templates : (c + 1) * templates]
        kept = []
        for position in range(length):
            valid = [t for t in rows[:, position] if np.linalg.norm(t) > 0]
            if valid:
                kept.append(np.mean(valid, axis=0))
        kept = np.array(kept) / np.sqrt((np.array(kept) ** 2).sum())
        for i in range(n):
            want[i, c] = np.mean([max(patch @ t for t in kept) for patch in images[i]])
    class_tokens, mask = zeroshot.class_tokens(tokens, classes)
    got = late_interaction.scores(images, class_tokens, key_mask=mask, max_elements=100)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_token_wise_recall_matches_brute_force():
    """Images rank captions by the mean over their patches of the max over the caption's valid
    tokens; captions rank images by the mean over their valid tokens of the max over the
    patches; recall by brute force on those two score matrices."""
    rng = np.random.default_rng(1)
    images, texts = _unit_tokens(rng, 9, 4, 3), _unit_tokens(rng, 20, 5, 3)
    counts = rng.integers(1, 6, size=20)
    texts[np.arange(5)[None, :] >= counts[:, None]] = 0.0
    text_image = rng.permutation(np.concatenate([np.arange(9), rng.integers(0, 9, size=11)]))
    ks = (1, 3, 5)
    want = _recall_from_scores(
        _late_interaction_loops(images, [4] * 9, texts, counts),
        _late_interaction_loops(texts, counts, images, [4] * 9),
        text_image,
        ks,
    )
    assert retrieval.token_recall_at_k(images, texts, text_image, ks) == pytest.approx(want)


def test_filip_evaluations_score_tokens_and_the_probe_runs(tiny_setup):
    """A FILIP objective's zero-shot and retrieval evaluations score tokens: their metrics are
    those of the token-wise scores of its token embeddings."""
    config, _, _, tokenizer, mesh = tiny_setup
    config = config.copy_and_resolve_references()
    config.objective, config.filip.dim, config.filip.top_k = "filip", 16, 4
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        objective, init, _, _ = train.build(config, mesh)
        state = init(jax.random.PRNGKey(0))
        evaluators = evaluator_lib.make_evaluators(
            config, objective=objective, tokenizer=tokenizer, mesh=mesh
        )
        results = evaluator_lib.run_all(evaluators, state.params, state.model_state)
        by_name = {e.name: e for e in evaluators}

        def tokens(embed_fn, inputs):
            out = jax.jit(embed_fn)(state.params, state.model_state, inputs)
            return np.asarray(out, np.float64)

        classify, search = by_name["shapes"], by_name["shapes_retrieval"]
        images = tokens(objective.embed_image_tokens, classify.images[classify.valid])
        prompts = tokens(objective.embed_text_tokens, classify.prepared["prompts"])
        captions = tokens(objective.embed_text_tokens, search.prepared["captions"])
        search_images = tokens(objective.embed_image_tokens, search.images[search.valid])
    class_tokens, mask = zeroshot.class_tokens(prompts, classify.prepared["num_classes"])
    scores = late_interaction.scores(images, class_tokens, key_mask=mask)
    want = zeroshot.topk_accuracy(scores, classify.prepared["labels"])[1]
    assert results["eval/shapes/zeroshot_top1"] == pytest.approx(want)
    recall = retrieval.token_recall_at_k(search_images, captions, search.prepared["text_image"])
    for key, value in recall.items():
        assert results[f"eval/shapes_retrieval/{key}"] == pytest.approx(value), key
    assert "eval/shapes_probe/probe_top1" in results
