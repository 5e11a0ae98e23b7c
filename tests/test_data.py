"""Tests for clipjax.data: shapes dataset, tokenizer, image ops, sources and the Grain pipeline."""

import collections
import colorsys
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


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2


def colorful_image(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def assert_close_uint8(result: np.ndarray, expected: np.ndarray, atol: float = 1.0):
    """Within `atol` levels of a float reference (PIL rounds or truncates to uint8)."""
    assert result.dtype == np.uint8 and result.shape == expected.shape
    np.testing.assert_allclose(result, np.clip(expected, 0, 255), atol=atol)


def test_grayscale_is_601_luma_on_three_channels():
    image = colorful_image()
    gray = image_ops.grayscale(image)
    assert (gray == gray[..., :1]).all()
    assert_close_uint8(gray, np.repeat(image @ LUMA, 3).reshape(image.shape), atol=0.5)


def test_brightness_contrast_saturation_match_numpy():
    image = colorful_image().astype(np.float64)
    luma = image @ LUMA
    for factor in (0.6, 1.4):
        assert_close_uint8(image_ops.adjust_brightness(colorful_image(), factor), image * factor)
        mean = np.round(luma.mean())  # contrast blends with the mean grey level
        expected = mean + factor * (image - mean)
        assert_close_uint8(image_ops.adjust_contrast(colorful_image(), factor), expected)
        grey = np.round(luma)[..., None]  # saturation blends with each pixel's grey
        expected = grey + factor * (image - grey)
        assert_close_uint8(image_ops.adjust_saturation(colorful_image(), factor), expected)


def test_hue_shift_matches_colorsys():
    image = colorful_image()
    for shift in (0.07, -0.08):
        expected = (
            np.array(
                [
                    colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                    for h, s, v in (colorsys.rgb_to_hsv(*rgb) for rgb in image.reshape(-1, 3) / 255)
                ]
            ).reshape(image.shape)
            * 255
        )
        result = image_ops.adjust_hue(image, shift).astype(np.float64)
        # PIL stores hue in 1/255 turns and saturation in 1/255: a few levels off at most.
        assert np.abs(result - expected).max() <= 10 and np.abs(result - expected).mean() < 1.5
    np.testing.assert_array_equal(image_ops.adjust_hue(image, 0.0), image)


def gaussian_reference(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable convolution with a normalised Gaussian kernel of radius 4 sigma."""
    x = np.arange(-int(np.ceil(4 * sigma)), int(np.ceil(4 * sigma)) + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        out = np.apply_along_axis(np.convolve, axis, out, kernel, mode="same")
    return out


def test_gaussian_blur_sigma_is_standard_deviation():
    image = colorful_image(48)
    for sigma in (0.5, 2.0):
        result = image_ops.gaussian_blur(image, sigma).astype(np.float64)[12:-12, 12:-12]
        errors = {
            s: np.abs(result - gaussian_reference(image, s)[12:-12, 12:-12]).mean()
            for s in (sigma / 2, sigma, 2 * sigma)
        }
        # PIL approximates the Gaussian with box blurs: close, and closest at the right sigma.
        assert errors[sigma] < 1.5 and errors[sigma] == min(errors.values()), errors


def test_color_jitter_draws_factors_in_range():
    image = colorful_image().astype(np.float64)
    factors = set()
    for seed in range(20):
        result = image_ops.color_jitter(
            colorful_image(), np.random.default_rng(seed), 0.4, 0.0, 0.0, 0.0
        )
        unclipped = image * 1.4 < 255
        # Least squares for `result ~ image * factor`; PIL truncates, hence the half level.
        fit = (result[unclipped] + 0.5) * image[unclipped]
        factor = fit.sum() / (image[unclipped] ** 2).sum()
        assert 0.6 - 0.01 < factor < 1.4 + 0.01
        assert_close_uint8(result, image * factor - 0.5)
        factors.add(round(factor, 3))
    assert len(factors) == 20
    a, b = (image_ops.color_jitter(colorful_image(), np.random.default_rng(3)) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_mocov2_augment_probabilities(monkeypatch):
    # Counting wrappers keep the real ops, so the draws are those of the real augmentation.
    calls = {"color_jitter": 0, "grayscale": 0, "gaussian_blur": []}

    def counted(name, op):
        def wrapper(image, *args, **kwargs):
            if name == "gaussian_blur":
                calls[name].append(args[0])
            else:
                calls[name] += 1
            return op(image, *args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(image_ops, name, counted(name, getattr(image_ops, name)))
    image = colorful_image(24)
    outputs = [image_ops.mocov2_augment(image, np.random.default_rng(s), 8) for s in range(1000)]
    assert all(o.shape == (8, 8, 3) and o.dtype == np.uint8 for o in outputs)
    # Binomial(1000, p): sd <= 16, bounds > 4 sd. Saturation factors >= 0.6 never make grey.
    assert abs(calls["color_jitter"] - 800) < 60
    assert abs(calls["grayscale"] - 200) < 60
    assert calls["grayscale"] == sum(bool((o == o[..., :1]).all()) for o in outputs)
    assert abs(len(calls["gaussian_blur"]) - 500) < 70
    assert min(calls["gaussian_blur"]) >= 0.1 and max(calls["gaussian_blur"]) <= 2.0
    again = image_ops.mocov2_augment(image, np.random.default_rng(7), 8)
    np.testing.assert_array_equal(again, outputs[7])


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


DECLIP_VIEWS = pipeline.Views(
    image_views=2, image_augment="mocov2", text_views=("plain", "mlm", "eda")
)


def make_train(
    tok, *, seed=0, num_workers=0, batch_size=8, views=None, context_length=CONTEXT_LENGTH
):
    """The test stream; `views=None` calls `train_dataset` without the argument."""
    data = ml_collections.ConfigDict(
        {"train": "shapes:40", "num_workers": num_workers, "crop_scale": (0.9, 1.0)}
    )
    return pipeline.train_dataset(
        data,
        tokenizer=tok,
        image_size=24,
        context_length=context_length,
        global_batch_size=batch_size,
        seed=seed,
        **({} if views is None else {"views": views}),
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


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


@pytest.mark.parametrize(
    "num_workers, views",
    [(0, None), (1, None), (0, DECLIP_VIEWS), (1, DECLIP_VIEWS)],
    ids=["0", "1", "views-0", "views-1"],
)
def test_train_iterator_resumes_from_state(tok, num_workers, views):
    iterator = iter(make_train(tok, num_workers=num_workers, views=views))
    try:
        take(iterator, 3)
        state = iterator.get_state()
        expected = take(iterator, 3)
    finally:
        iterator.close()
    restored = iter(make_train(tok, num_workers=num_workers, views=views))
    try:
        restored.set_state(state)
        assert_same_batches(take(restored, 3), expected)
    finally:
        restored.close()


def test_views_keys_shapes_and_contents(tok, monkeypatch):
    monkeypatch.setattr(pipeline.text_ops, "wordnet_lexicon", lambda: None)
    # Long enough for whole captions, so that EDA's words can be compared with the caption's.
    batch = next(iter(make_train(tok, views=DECLIP_VIEWS, context_length=48)))
    images, texts = ("image", "image_2"), ("text", "text_mlm", "mlm_labels", "text_eda")
    assert set(batch) == {*images, *texts}
    for key in images:
        assert batch[key].shape == (8, 24, 24, 3) and batch[key].dtype == np.float32
    for key in texts:
        assert batch[key].shape == (8, 48) and batch[key].dtype == np.int32
    assert (batch["text"][:, -1] == tok.pad_id).all()
    # Two independent augmentations of each image.
    assert all(not np.array_equal(a, b) for a, b in zip(*(batch[k] for k in images), strict=True))
    text, masked, labels = batch["text"], batch["text_mlm"], batch["mlm_labels"]
    # Masked captions are the captions except at the labelled positions, whose ids they hold.
    np.testing.assert_array_equal(np.where(labels != 0, labels, masked), text)
    np.testing.assert_array_equal(labels[labels != 0], text[labels != 0])
    assert ((labels != 0).sum(axis=1) >= 1).all()
    decoded = [tok.decode(row) for row in masked]
    assert sum("[MASK]" in caption for caption in decoded) >= 4, decoded
    for caption, eda in zip(text, batch["text_eda"], strict=True):
        words, eda_words = tok.decode(caption).split(), tok.decode(eda).split()
        # Without WordNet: a swap or deletions, so no new words.
        assert not collections.Counter(eda_words) - collections.Counter(words)
    assert (batch["text_eda"] != text).any()


def test_views_are_seeded_and_first_views_are_the_default_stream(tok):
    declip = take(iter(make_train(tok, views=DECLIP_VIEWS)), 2)
    assert_same_batches(declip, take(iter(make_train(tok, views=DECLIP_VIEWS)), 2))
    other = next(iter(make_train(tok, seed=1, views=DECLIP_VIEWS)))
    assert not np.array_equal(other["image_2"], declip[0]["image_2"])
    default = take(iter(make_train(tok)), 2)
    assert_same_batches(default, take(iter(make_train(tok, views=pipeline.Views())), 2))
    # The element's rng draws the first image view first: more views leave it as it was.
    more = take(iter(make_train(tok, views=pipeline.Views(2, "clip", ("plain", "mlm")))), 2)
    assert_same_batches(default, [{k: b[k] for k in ("image", "text")} for b in more])


def test_mlm_view_needs_a_mask_piece(tok):
    no_mask = type("NoMask", (tokenizer.Tokenizer,), {"mask_id": None})(tok.model_proto)
    with pytest.raises(ValueError) as error:
        make_train(no_mask, views=DECLIP_VIEWS)
    message = str(error.value)
    assert "config.data.tokenizer.path" in message and "'[MASK]'" in message
    assert "DeCLIP" in message
    make_train(no_mask, views=pipeline.Views(text_views=("plain", "eda")))  # no MLM: fine


def test_views_validation():
    assert pipeline.Views(text_views=["mlm", "eda"]).text_views == ("mlm", "eda")
    for bad in (
        {"image_views": 3},
        {"image_augment": "simclr"},
        {"text_views": ()},
        {"text_views": ("plain", "plain")},
        {"text_views": ("bert",)},
    ):
        with pytest.raises(ValueError, match="Views."):
            pipeline.Views(**bad)


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
