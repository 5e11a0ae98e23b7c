"""Tests for clipjax.data: shapes dataset, tokenizer, image ops, sources and the Grain pipeline."""

import pickle

import ml_collections
import numpy as np
import pytest

from clipjax.data import image_ops, pipeline, shapes, sources, tokenizer

CONTEXT_LENGTH = 16


@pytest.fixture(scope="module")
def tok() -> tokenizer.Tokenizer:
    return tokenizer.train(shapes.ShapesSource("train").captions(3000), vocab_size=256)


def tokenizer_config(path: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"path": path, "vocab_size": 256})


# ---------------------------------------------------------------------------- shapes


def test_shapes_is_deterministic_by_index():
    a, b = shapes.ShapesSource("train"), shapes.ShapesSource("train")
    for i in (0, 7, 99_999):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
        assert a[i]["image"].shape == (64, 64, 3) and a[i]["image"].dtype == np.uint8
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert len({a[i]["caption"] for i in range(50)}) > 40
    assert list(a.captions(5)) == [a[i]["caption"] for i in range(5)]


def test_shapes_eval_split_is_held_out():
    train = [shapes.ShapesSource("train")[i]["image"] for i in range(500)]
    evals = [shapes.ShapesSource("eval")[i]["image"] for i in range(500)]
    train_bytes = {image.tobytes() for image in train}
    assert not any(image.tobytes() in train_bytes for image in evals)


def test_shapes_eval_labels_match_class_names_and_captions():
    source = shapes.ShapesSource("eval", size=2 * len(shapes.CLASS_NAMES))
    assert len(shapes.CLASS_NAMES) == len(set(shapes.CLASS_NAMES)) == 8 * 6
    labels = [int(source[i]["label"]) for i in range(len(source))]
    assert labels == list(range(len(shapes.CLASS_NAMES))) * 2
    for i in range(len(source)):
        color, shape = shapes.CLASS_NAMES[labels[i]].split()
        words = source[i]["caption"].rstrip(".").split()
        assert color in words and shape in words, source[i]["caption"]


def test_shapes_captions_are_flip_invariant():
    for caption in shapes.ShapesSource("train").captions(3000):
        assert "left" not in caption and "right" not in caption, caption


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.mask_id is not None and tok.mask_id > 3
    assert tok.vocab_size <= 256
    caption = "a small red star near the top and a blue circle"
    tokens = tok.encode([caption, "a cross"], 32)
    assert tokens.shape == (2, 32) and tokens.dtype == np.int32
    assert tok.decode(tokens[0]) == caption
    for row in tokens:
        n = int((row != tok.pad_id).sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and tok.eos_id not in row[1 : n - 1]


def test_tokenizer_truncation_keeps_eos(tok):
    long_caption = " and ".join(["a big purple hexagon near the bottom"] * 10)
    row = tok.encode([long_caption], CONTEXT_LENGTH)[0]
    assert row[0] == tok.bos_id and row[-1] == tok.eos_id and tok.pad_id not in row
    assert long_caption.startswith(tok.decode(row))


def test_tokenizer_pickles(tok):
    copy = pickle.loads(pickle.dumps(tok))
    texts = ["two green squares", "a tiny orange triangle."]
    np.testing.assert_array_equal(copy.encode(texts, 12), tok.encode(texts, 12))
    assert copy.mask_id == tok.mask_id


def test_load_or_train_saves_and_reuses(tmp_path):
    captions = list(shapes.ShapesSource("train").captions(1000))
    first = tokenizer.load_or_train(tokenizer_config(), str(tmp_path), captions)
    saved = tmp_path / "tokenizer.model"
    assert saved.read_bytes() == first.model_proto
    # A second call (a resumed run) loads the saved model and never reads the captions.
    second = tokenizer.load_or_train(tokenizer_config(), str(tmp_path), iter(()))
    assert second.model_proto == first.model_proto
    third = tokenizer.load_or_train(tokenizer_config(str(saved)), "/nonexistent", iter(()))
    assert third.model_proto == first.model_proto


def test_load_or_train_missing_path_error(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as error:
        tokenizer.load_or_train(tokenizer_config(missing), str(tmp_path), iter(()))
    message = str(error.value)
    assert "config.data.tokenizer.path" in message and repr(missing) in message
    assert "set it to ''" in message and "\n" not in message


# ---------------------------------------------------------------------------- image ops


def test_random_resized_crop_shapes_and_determinism():
    image = shapes.ShapesSource("train")[0]["image"]
    for scale, ratio in [((0.9, 1.0), (3 / 4, 4 / 3)), ((2.0, 3.0), (1.0, 1.0))]:  # 2nd: fallback
        crop = image_ops.random_resized_crop(
            image, np.random.default_rng(0), 32, scale=scale, ratio=ratio
        )
        again = image_ops.random_resized_crop(
            image, np.random.default_rng(0), 32, scale=scale, ratio=ratio
        )
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, again)
    # The fallback on a square image with ratio 1 is the whole image, resized.
    np.testing.assert_array_equal(crop, image_ops.resize(image, 32))
    flipped = {image_ops.random_flip(image, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert flipped == {image.tobytes(), image[:, ::-1].tobytes()}


def test_resize_takes_centre_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 200
    np.testing.assert_array_equal(image_ops.resize(image, 40), image[:, 10:50])


def test_normalize_matches_numpy_reference():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (image / 255.0 - mean) / std
    result = image_ops.normalize(image)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- sources


def test_make_source_schemes():
    assert len(sources.make_source("shapes", "train")) == 100_000
    assert len(sources.make_source("shapes:300", "train")) == 300
    assert len(sources.make_source("shapes:300", "eval")) == 300
    source = sources.make_source("shapes:3", "train")
    assert list(sources.captions("shapes:3")) == [source[i]["caption"] for i in range(3)]


def test_make_source_unknown_scheme_error():
    with pytest.raises(ValueError) as error:
        sources.make_source("parquet:/data/x", "train")
    message = str(error.value)
    assert "'parquet:/data/x'" in message and "shapes" in message and "\n" not in message
    with pytest.raises(ValueError, match="positive integer"):
        sources.make_source("shapes:many", "train")


# ---------------------------------------------------------------------------- pipeline


def make_train(tok, *, seed=0, num_workers=0, batch_size=8):
    data = ml_collections.ConfigDict(
        {"train": "shapes:40", "num_workers": num_workers, "crop_scale": (0.9, 1.0)}
    )
    return pipeline.train_dataset(
        data,
        tokenizer=tok,
        image_size=24,
        context_length=CONTEXT_LENGTH,
        global_batch_size=batch_size,
        seed=seed,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])


def test_train_dataset_batches_and_seeds(tok):
    first = take(iter(make_train(tok, seed=0)), 2)
    assert first[0]["image"].shape == (8, 24, 24, 3) and first[0]["image"].dtype == np.float32
    assert first[0]["text"].shape == (8, CONTEXT_LENGTH) and first[0]["text"].dtype == np.int32
    assert_same_batches(first, take(iter(make_train(tok, seed=0)), 2))
    other = next(iter(make_train(tok, seed=1)))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_train_dataset_epochs_cover_source_and_reshuffle(tok):
    # shapes:40 with batch 8: each 5 batches are one epoch, a permutation of the 40 captions.
    batches = take(iter(make_train(tok)), 10)
    texts = [tuple(row) for b in batches for row in b["text"]]
    expected = sorted(
        tuple(row) for row in tok.encode(list(shapes.ShapesSource(size=40).captions(40)), 16)
    )
    assert sorted(texts[:40]) == sorted(texts[40:]) == expected
    assert texts[:40] != texts[40:]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_iterator_resumes_from_state(tok, num_workers):
    iterator = iter(make_train(tok, num_workers=num_workers))
    try:
        take(iterator, 3)
        state = iterator.get_state()
        expected = take(iterator, 3)
    finally:
        iterator.close()
    restored = iter(make_train(tok, num_workers=num_workers))
    try:
        restored.set_state(state)
        assert_same_batches(take(restored, 3), expected)
    finally:
        restored.close()


def test_eval_arrays(tok):
    arrays = pipeline.eval_arrays(
        "shapes", tokenizer=tok, image_size=24, context_length=48, num_examples=100
    )
    assert arrays["image"].shape == (100, 24, 24, 3) and arrays["image"].dtype == np.float32
    assert arrays["text"].shape == (100, 48) and arrays["text"].dtype == np.int32
    np.testing.assert_array_equal(arrays["label"], np.arange(100) % len(shapes.CLASS_NAMES))
    assert arrays["class_names"] == shapes.CLASS_NAMES
    source = shapes.ShapesSource("eval", size=2048)
    np.testing.assert_allclose(
        arrays["image"][5], image_ops.normalize(image_ops.resize(source[5]["image"], 24))
    )
    assert tok.decode(arrays["text"][5]) == source[5]["caption"]
