"""Tests for clipjax.data: shapes dataset, tokenizer, image ops and the Grain pipelines."""

import collections
import colorsys
import csv
import functools
import io
import logging
import os
import pickle
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import psutil
import pytest
from PIL import Image

from clipjax.data import (
    eval_input,
    image_ops,
    pipeline,
    records,
    shapes,
    skipping,
    sources,
    tokenizer,
)
from clipjax.objectives.base import Views

CONTEXT_LENGTH = 16


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


def test_shapes_contents_name_the_label_and_every_object_in_the_caption():
    source = shapes.ShapesSource("train", size=40)
    sizes = collections.Counter()
    for i in range(len(source)):
        example, contents = source[i], source.contents(i)
        sizes[len(contents)] += 1
        assert tuple(shapes.CLASS_NAMES[example["label"]].split()) in contents
        caption = example["caption"]
        for color, shape in contents:
            assert color in caption and shape in caption, (caption, contents)
    assert set(sizes) == {1, 2}  # one- and two-object scenes both occur


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
    with pytest.raises(ValueError) as error:
        tokenizer.load_or_train(tokenizer_config(missing), str(tmp_path), iter(()))
    message = str(error.value)
    assert message.startswith(f"no tokenizer at {missing!r}.")
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


@functools.cache
def photo_jpeg(width: int = 1200, height: int = 900) -> bytes:
    """A JPEG (quality 90) with detail at every scale, as a photo has: octaves of smooth noise
    from 6 to 600 cycles across, each channel its own mix."""
    rng = np.random.default_rng(0)
    pixels = np.full((height, width, 3), 128.0)
    for cycles, amplitude in [(6, 50), (24, 25), (96, 14), (300, 9), (600, 6)]:
        for channel in range(3):
            noise = rng.normal(size=(max(2, cycles * height // width), cycles)).astype(np.float32)
            smooth = Image.fromarray(noise).resize((width, height), Image.BICUBIC)
            pixels[..., channel] += amplitude * np.asarray(smooth)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_reduced_decoding_keeps_crop_boxes_sizes_and_draws(monkeypatch):
    """An `EncodedImage` gets the crops (boxes, output sizes, random draws) of its full decode."""
    data = photo_jpeg()
    full = records.decode({"image": data})["image"]
    boxes = []
    resize_box = image_ops._resize_box

    def recorded(image, box, size):
        boxes.append((type(image).__name__, box, size))
        return resize_box(image, box, size)

    monkeypatch.setattr(image_ops, "_resize_box", recorded)
    reductions = set()
    for seed, (recipe, scale, size) in enumerate(
        [("clip", (0.9, 1.0), 64), ("clip", (0.08, 1.0), 48), ("mocov2", (0.2, 1.0), 40)] * 3
    ):
        augment = image_ops.Augment(recipe, scale)
        encoded = records.decode({"image": data}, encoded=True)["image"]
        assert isinstance(encoded, records.EncodedImage) and encoded.shape == full.shape
        outputs, draws = [], []
        for image in (full, encoded):
            rng = np.random.default_rng(seed)
            outputs.append(augment(image, rng, size))
            draws.append(rng.random())
        assert outputs[0].shape == outputs[1].shape == (size, size, 3)
        assert outputs[1].dtype == np.uint8 and draws[0] == draws[1]
        (full_kind, *full_box), (encoded_kind, *encoded_box) = boxes[-2:]
        assert (full_kind, encoded_kind) == ("ndarray", "EncodedImage")
        assert full_box == encoded_box
        reductions |= set(encoded._decoded)
    assert reductions & {2, 4, 8}  # the crops were decoded smaller


def test_reduced_decoding_stays_within_a_level_of_the_full_decode():
    """Per channel, the mean absolute difference from cropping the full decode stays under 0.6
    levels of 255 for every crop (0.35 at most and 0.23 on average here; on scikit-learn's
    china.jpg upscaled to 1,536 × 1,025 px, 0.56 at most), whatever the reduction; a PNG,
    which has none, gives the same pixels."""
    data = photo_jpeg()
    full = records.decode({"image": data})["image"]
    reductions, differences = [], []
    for seed in range(12):
        size = (32, 64, 112)[seed % 3]
        rng = np.random.default_rng(seed)
        side = int(rng.integers(size, 900))
        left, top = int(rng.integers(0, 1200 - side)), int(rng.integers(0, 900 - side))
        box = (left, top, left + side, top + side)
        encoded = records.EncodedImage(data, "photo")
        reduced = encoded.region(box, size).astype(np.float64)
        reductions.append(encoded.reduction(box, size))
        reference = image_ops._resize_box(full, box, size).astype(np.float64)
        differences.append(np.abs(reduced - reference).mean(axis=(0, 1)))
    assert set(reductions) == {1, 2, 4, 8}
    assert np.max(differences) < 0.6 and np.mean(differences) < 0.3
    png = io.BytesIO()
    Image.fromarray(full[:300, :400]).save(png, "PNG")
    encoded = records.EncodedImage(png.getvalue(), "png")
    assert encoded.reduction((0, 0, 400, 300), 16) == 1
    np.testing.assert_array_equal(
        encoded.region((5, 7, 305, 287), 16),
        image_ops._resize_box(full[:300, :400], (5, 7, 305, 287), 16),
    )


def test_a_second_view_reuses_a_fine_enough_decode_and_a_truncated_jpeg_is_bad():
    data = photo_jpeg()
    encoded = records.EncodedImage(data, "photo")
    assert encoded.reduction((0, 0, 600, 600), 100) == 2  # 600 / 2 >= 2 · 100 > 600 / 4
    assert encoded.reduction((0, 0, 1024, 896), 32) == 8  # 896 / 8 >= 2 · 32
    encoded.region((0, 0, 600, 600), 100)
    encoded.region((0, 0, 1024, 896), 32)  # the finer decode serves
    assert list(encoded._decoded) == [2]
    encoded = records.EncodedImage(data, "photo")
    encoded.region((0, 0, 1024, 896), 32)
    encoded.region((0, 0, 600, 600), 100)  # too coarse: decoded again, finer
    assert sorted(encoded._decoded) == [2, 8]
    truncated = records.decode({"key": "t", "image": data[: len(data) // 2]}, encoded=True)
    with pytest.raises(records.BadRecord, match="truncated"):
        image_ops.resize(truncated["image"], 32)


def test_resize_takes_centre_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 200
    np.testing.assert_array_equal(image_ops.resize(image, 40), image[:, 10:50])


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
    mocov2 = image_ops.Augment("mocov2", (0.2, 1.0))
    outputs = [mocov2(image, np.random.default_rng(s), 8) for s in range(1000)]
    assert all(o.shape == (8, 8, 3) and o.dtype == np.uint8 for o in outputs)
    # Binomial(1000, p): sd <= 16, bounds > 4 sd. Saturation factors >= 0.6 never make grey.
    assert abs(calls["color_jitter"] - 800) < 60
    assert abs(calls["grayscale"] - 200) < 60
    assert calls["grayscale"] == sum(bool((o == o[..., :1]).all()) for o in outputs)
    assert abs(len(calls["gaussian_blur"]) - 500) < 70
    # MoCo v2's sigma range in pixels at 224 px, scaled to the 8-px output.
    low, high = 0.1 * 8 / 224, 2.0 * 8 / 224
    assert low <= min(calls["gaussian_blur"]) < 1.1 * low
    assert 0.9 * high < max(calls["gaussian_blur"]) <= high
    again = mocov2(image, np.random.default_rng(7), 8)
    np.testing.assert_array_equal(again, outputs[7])


def test_augment_flip_switch_and_validation():
    # An image whose left and right halves differ; crop scale (1, 1) keeps the whole image.
    image = colorful_image(24)
    whole = image_ops.resize(image, 12)
    mirrored = whole[:, ::-1]
    assert not np.array_equal(whole, mirrored)
    for flip in (True, False):
        augment = image_ops.Augment("clip", (1.0, 1.0), flip=flip)
        outputs = [augment(image, np.random.default_rng(s), 12) for s in range(200)]
        flipped = sum(np.array_equal(o, mirrored) for o in outputs)
        assert flipped + sum(np.array_equal(o, whole) for o in outputs) == 200
        assert (60 < flipped < 140) if flip else flipped == 0
    with pytest.raises(ValueError) as e:
        image_ops.Augment("simclr")
    assert str(e.value) == (
        "config.data.augment.recipe='simclr' is unknown; use one of clip, mocov2."
    )
    with pytest.raises(ValueError) as e:
        image_ops.Augment("clip", (0.0, 1.0))
    assert str(e.value) == (
        "config.data.augment.crop_scale=(0.0, 1.0) must be (low, high) area fractions with "
        "0 < low <= high <= 1, e.g. (0.9, 1.0)."
    )


# ---------------------------------------------------------------------------- pipeline


DECLIP_VIEWS = Views(image_views=2, text_views=("plain", "mlm", "eda"))
MOCOV2 = {"recipe": "mocov2", "crop_scale": (0.2, 1.0), "flip": True}


def make_train(
    tok,
    *,
    seed=0,
    num_workers=0,
    batch_size=8,
    views=None,
    context_length=CONTEXT_LENGTH,
    train="shapes:40",
    max_skipped_fraction=None,
    augment=MOCOV2,
    rows=None,
):
    """The test stream; `views=None` calls `train_dataset` without the argument, and
    `max_skipped_fraction=None` leaves the field out of the config (default 0.01)."""
    data = ml_collections.ConfigDict(
        {"train": train, "num_workers": num_workers, "augment": augment}
    )
    if max_skipped_fraction is not None:
        data.max_skipped_fraction = max_skipped_fraction
    return pipeline.train_dataset(
        data,
        tokenizer=tok,
        image_size=24,
        context_length=context_length,
        global_batch_size=batch_size,
        seed=seed,
        rows=rows,
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
    assert first[0]["image"].shape == (8, 24, 24, 3) and first[0]["image"].dtype == np.uint8
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
    assert set(batch) == {*images, *texts, "skipped"}
    assert batch["skipped"].dtype == np.int32 and (batch["skipped"] == 0).all()
    for key in images:
        assert batch[key].shape == (8, 24, 24, 3) and batch[key].dtype == np.uint8
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
    assert_same_batches(default, take(iter(make_train(tok, views=Views())), 2))
    # The element's rng draws the first image view first: more views leave it as it was.
    more = take(iter(make_train(tok, views=Views(2, ("plain", "mlm")))), 2)
    keys = ("image", "text", "skipped")
    assert_same_batches(default, [{k: b[k] for k in keys} for b in more])


def test_views_draw_one_caption_of_a_multi_caption_record(tok):
    make_views = pipeline._MakeViews(1, ("plain",), tok, 24, 48, image_ops.Augment())
    image = shapes.ShapesSource("train")[0]["image"]
    captions = ["a red circle", "a blue star near the top"]
    record = {"key": "k", "image": image, "captions": captions}
    drawn = [
        tok.decode(make_views.random_map(record, np.random.default_rng(seed))["text"])
        for seed in range(40)
    ]
    assert set(drawn) == set(captions)
    again = make_views.random_map(record, np.random.default_rng(3))
    assert tok.decode(again["text"]) == drawn[3]


def test_mlm_view_needs_a_mask_piece(tok):
    no_mask = type("NoMask", (tokenizer.Tokenizer,), {"mask_id": None})(tok.model_proto)
    with pytest.raises(ValueError) as error:
        make_train(no_mask, views=DECLIP_VIEWS)
    message = str(error.value)
    assert "config.data.tokenizer.path" in message and "'[MASK]'" in message
    assert "DeCLIP" in message
    make_train(no_mask, views=Views(text_views=("plain", "eda")))  # no MLM: fine


# ---------------------------------------------------------------------------- bad records


def write_csv(root, rows, name="data.csv") -> str:
    """A CSV of (image, caption) rows; an image given as bytes is written to root/<image>."""
    with open(root / name, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for image, caption, data in rows:
            if data is not None:
                (root / image).write_bytes(data)
            writer.writerow([image, caption])
    return f"csv:{root / name}"


def png(seed: int) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def distinct_captions() -> list[str]:
    return list(dict.fromkeys(shapes.ShapesSource("train").captions(500)))


def mixed_csv(root, captions, good: int, corrupt: int, missing: int, blank: int) -> tuple:
    """A CSV source with `good` usable rows and bad ones of three kinds; returns (spec, the
    good captions, {bad key: reason})."""
    rows, bad = [], {}
    for i in range(good):
        rows.append((f"g{i}.png", captions[i], png(i)))
    for i in range(corrupt):
        rows.append((f"c{i}.jpg", captions[good + i], b"\xff\xd8 not really a jpeg"))
        bad[f"c{i}.jpg"] = "cannot identify image file"
    for i in range(missing):
        rows.append((f"m{i}.png", captions[good + corrupt + i], None))
        bad[f"m{i}.png"] = "No such file or directory"
    for i in range(blank):
        rows.append((f"b{i}.png", " ", png(100 + i)))
        bad[f"b{i}.png"] = "empty caption"
    order = np.random.default_rng(0).permutation(len(rows))  # bad rows spread out
    return write_csv(root, [rows[i] for i in order]), captions[:good], bad


def test_drop_skipped_regroups_chunks_and_resumes():
    marker = skipping.Skipped
    values = [marker("a", "r"), 1, 2, marker("b", "r"), marker("c", "r"), 3, 4, marker("d", "r")]
    values += [marker("e", "r"), marker("f", "r"), marker("g", "r"), 5, 6, 7, 8, 9]
    elements = [v if isinstance(v, marker) else {"x": np.int32(v)} for v in values]

    def stream():
        # Chunks of 3 (two have no good element), batches of 2: batches span chunks.
        chunks = grain.MapDataset.source(elements).batch(3, batch_fn=skipping.chunk)
        return iter(skipping.DropSkipped(chunks.to_iter_dataset(), 2, "test", 16, 1.0))

    iterator, states, batches = stream(), [], []
    for _ in range(4):
        states.append(iterator.get_state())
        batches.append(next(iterator))
    assert [b["x"].tolist() for b in batches] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert [b["skipped"].tolist() for b in batches] == [[1, 0], [2, 0], [4, 0], [0, 0]]
    for b in batches:
        assert b["x"].dtype == b["skipped"].dtype == np.int32
    for start, state in enumerate(states):
        restored = stream()
        restored.set_state(state)
        assert_same_batches(take(restored, 4 - start), batches[start:])


def test_bad_records_are_skipped_counted_and_logged(tok, tmp_path, distinct_captions, caplog):
    spec, good, bad = mixed_csv(tmp_path, distinct_captions, 16, 4, 2, 2)
    caplog.set_level(logging.WARNING)
    streams = []
    for num_workers in (0, 1):
        iterator = iter(
            make_train(
                tok,
                train=spec,
                num_workers=num_workers,
                max_skipped_fraction=0.5,
                context_length=48,
            )
        )
        try:
            streams.append(take(iterator, 20))  # 16 good rows, batch 8: 10 epochs
        finally:
            iterator.close()
    assert_same_batches(*streams)  # one worker makes the in-process stream
    batches = streams[0]
    for batch in batches:
        assert batch["skipped"].shape == (8,) and batch["skipped"].dtype == np.int32
    # Each epoch (two batches) holds every good record once; each bad record is counted once
    # per epoch, attached to the next good one.
    for epoch in range(10):
        texts = np.concatenate([b["text"] for b in batches[2 * epoch : 2 * epoch + 2]])
        assert sorted(tok.decode(row) for row in texts) == sorted(good)
    cumulative = np.cumsum([int(b["skipped"].sum()) for b in batches])
    for epoch in range(1, 10):
        assert 8 * (epoch - 1) <= cumulative[2 * epoch - 1] <= 8 * epoch
        assert cumulative[2 * epoch] >= 8 * epoch
    logged = [r.getMessage() for r in caplog.records if "Skipped a bad record" in r.getMessage()]
    assert len(logged) == 5  # the first 5 (the worker process logs to its own stderr)
    for message in logged:
        key = next(k for k in bad if f": {k} (" in message)
        assert message == f"Skipped a bad record of {spec}: {key} ({bad[key]})."


def test_too_many_bad_records_error(tok, tmp_path, distinct_captions):
    spec = write_csv(
        tmp_path,
        [
            ("a.png", distinct_captions[0], png(0)),
            ("bad.jpg", "x", b"junk"),
            ("c.png", distinct_captions[1], png(1)),
            ("d.png", distinct_captions[2], png(2)),
        ],
    )
    # Chunks of 2: the fraction is judged after the second, when all 4 records were read.
    iterator = iter(make_train(tok, train=spec, batch_size=2, max_skipped_fraction=0.1))
    with pytest.raises(ValueError) as error:
        take(iterator, 2)
    assert str(error.value) == (
        f"source '{spec}': skipped 1 of 4 records (25.0%), more than "
        "config.data.max_skipped_fraction=0.1. First skipped: bad.jpg (cannot identify image "
        "file). Fix or remove those records, or raise config.data.max_skipped_fraction."
    )
    # The default threshold (0.01) applies when the config has no such field.
    with pytest.raises(ValueError, match="max_skipped_fraction=0.01"):
        take(iter(make_train(tok, train=spec, batch_size=2)), 2)


def test_skip_counts_resume_from_state(tok, tmp_path, distinct_captions):
    # 4 bad of 20 (20%) over a 19% limit: the error comes when 20 records have been read.
    spec = mixed_csv(tmp_path, distinct_captions, 16, 4, 0, 0)[0]

    def batches_until_error(iterator, limit=20):
        batches = []
        with pytest.raises(ValueError, match="skipped 4 of 20 records"):
            for _ in range(limit):
                batches.append(next(iterator))
        return batches

    def stream():
        return iter(make_train(tok, train=spec, batch_size=4, max_skipped_fraction=0.19))

    whole = batches_until_error(stream())
    assert len(whole) >= 3
    first = stream()
    head = take(first, 2)
    restored = stream()
    restored.set_state(first.get_state())
    assert_same_batches(head + batches_until_error(restored), whole)


def test_process_rows_of_a_global_batch_put_together_are_the_one_process_batch(tok):
    """Each process reads its rows of one global order: the rows of 2 or 4 processes, put
    together, are the 1-process batches, augmentations included; `start_at(k)` continues on
    global batch k."""
    views = Views(image_views=2, text_views=("plain", "mlm", "eda"))

    def batches(rows, n=3, start=0):
        data = make_train(tok, views=views, rows=rows)
        iterator = iter(data)
        if start:
            iterator.start_at(start)
        return take(iterator, n)

    whole = batches(None, 5)  # shapes:40 at global batch 8: the epoch turns at batch 5
    for parts in ([(0, 4), (4, 8)], [(0, 2), (2, 4), (4, 6), (6, 8)]):
        pieces = [batches(rows, 5) for rows in parts]
        for k, batch in enumerate(whole):
            for key in batch:
                together = np.concatenate([piece[k][key] for piece in pieces])
                np.testing.assert_array_equal(together, batch[key])
    assert_same_batches(
        batches((4, 8), 2, start=3),
        [{key: value[4:] for key, value in batch.items()} for batch in whole[3:]],
    )


def test_eval_arrays_captions_labels_and_skips(tok, tmp_path, distinct_captions):
    for name in ("1.png", "2.png", "3.png"):
        (tmp_path / name).write_bytes(png(len(name)))
    (tmp_path / "bad.png").write_bytes(b"junk")
    c = distinct_captions
    rows = [("1.png", 0, "cat"), ("2.png", 1, "dog"), ("1.png", 2, "cat"), ("bad.png", 3, "dog")]
    with open(tmp_path / "e.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        writer.writerows([(image, c[i], label) for image, i, label in rows + [("3.png", 4, "dog")]])
    kwargs = dict(tokenizer=tok, image_size=16, context_length=48, num_examples=-1)
    arrays = eval_input.eval_arrays(
        f"csv:{tmp_path}/e.csv?label=label", max_skipped_fraction=0.5, **kwargs
    )
    # One slot per record, the bad one's left blank; `valid` says which hold an image.
    assert arrays["image"].shape == (4, 16, 16, 3) and arrays["skipped"] == 1
    np.testing.assert_array_equal(arrays["valid"], [True, True, False, True])
    assert not arrays["image"][2].any()
    np.testing.assert_array_equal(arrays["label"], [0, 1, 1])
    assert arrays["class_names"] == ["cat", "dog"] and arrays["prompt_templates"] == []
    assert [tok.decode(row) for row in arrays["text"]] == [c[0], c[2], c[1], c[4]]
    np.testing.assert_array_equal(arrays["text_image"], [0, 0, 1, 2])
    reference = np.asarray(Image.open(tmp_path / "2.png").convert("RGB"))
    np.testing.assert_array_equal(arrays["image"][1], image_ops.resize(reference, 16))
    unlabelled = eval_input.eval_arrays(
        f"csv:{tmp_path}/e.csv", max_skipped_fraction=0.5, **{**kwargs, "num_examples": 2}
    )
    np.testing.assert_array_equal(unlabelled["label"], [-1, -1])
    assert unlabelled["class_names"] == [] and unlabelled["skipped"] == 0
    with pytest.raises(ValueError) as error:
        eval_input.eval_arrays(f"csv:{tmp_path}/e.csv", max_skipped_fraction=0.2, **kwargs)
    assert str(error.value) == (
        f"source 'csv:{tmp_path}/e.csv': skipped 1 of 4 records (25.0%), more than "
        "config.data.max_skipped_fraction=0.2. First skipped: bad.png (cannot identify image "
        "file). Fix or remove those records, or raise config.data.max_skipped_fraction."
    )


def test_eval_arrays(tok):
    arrays = eval_input.eval_arrays(
        "shapes",
        tokenizer=tok,
        image_size=24,
        context_length=48,
        num_examples=100,
        max_skipped_fraction=0.0,
    )
    assert arrays["image"].shape == (100, 24, 24, 3) and arrays["image"].dtype == np.uint8
    assert arrays["text"].shape == (100, 48) and arrays["text"].dtype == np.int32
    np.testing.assert_array_equal(arrays["text_image"], np.arange(100))
    np.testing.assert_array_equal(arrays["label"], np.arange(100) % len(shapes.CLASS_NAMES))
    assert arrays["class_names"] == shapes.CLASS_NAMES
    assert arrays["prompt_templates"] == shapes.PROMPT_TEMPLATES and arrays["skipped"] == 0
    source = shapes.ShapesSource("eval", size=2048)
    np.testing.assert_array_equal(arrays["image"][5], image_ops.resize(source[5]["image"], 24))
    assert tok.decode(arrays["text"][5]) == source[5]["caption"]
    # `?seed=` (and the `seed` argument) select another stream of the same split.
    kwargs = dict(tokenizer=tok, image_size=24, context_length=48, max_skipped_fraction=0.0)
    seeded = eval_input.eval_arrays("shapes:10?seed=1", num_examples=-1, **kwargs)
    np.testing.assert_array_equal(
        seeded["image"],
        eval_input.eval_arrays("shapes:10", num_examples=-1, seed=1, **kwargs)["image"],
    )
    assert seeded["image"].shape[0] == 10
    assert not np.array_equal(seeded["image"], arrays["image"][:10])


_WORKER_PROBE = """
import time
import ml_collections
import psutil
from absl import flags
from clipjax.data import pipeline, shapes, tokenizer

if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    tok = tokenizer.train(shapes.ShapesSource("train").captions(500), vocab_size=128)
    data = ml_collections.ConfigDict({"train": "shapes:200", "num_workers": 1,
        "augment": {"recipe": "clip", "crop_scale": (0.9, 1.0), "flip": True}})
    it = iter(pipeline.train_dataset(data, tokenizer=tok, image_size=16, context_length=16,
                                     global_batch_size=8, seed=0))
    for _ in range(20):
        next(it)
    print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
    time.sleep(120)
"""


def test_grain_workers_die_with_a_killed_trainer(tmp_path):
    """kill -9 of the training process leaves no Grain worker behind (PR_SET_PDEATHSIG)."""
    script = tmp_path / "probe.py"
    script.write_text(_WORKER_PROBE)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    probe = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        children = [psutil.Process(int(pid)) for pid in probe.stdout.readline().split()]
        assert children, "the pipeline started no worker process"
    finally:
        probe.kill()
        probe.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]


# ---------------------------------------------------------------------------- mixtures


class _Keys:
    """A source of `size` records that hold only their key, `name[i]`."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"key": f"{self.name}[{int(index)}]"}


def test_a_mixture_draws_each_source_by_its_weight_and_resumes_exactly(tok):
    """A mixture of 200 records weighted 3 and 300 weighted 1: over 10,000 examples of the
    global order the shares are within 2% of 0.75 and 0.25 (whatever the sources' sizes), every
    record of each source is drawn once per pass over it, and a restored iterator continues on
    the same batches."""
    parts = [_Keys("shapes", 200), _Keys("glyphs", 300)]  # records without images: fast
    mixture = sources.Mixture("mix", parts, ["shapes", "glyphs"], [3.0, 1.0])
    order = pipeline.shuffled_records(mixture, seed=0)
    keys = [order[i]["key"] for i in range(10_000)]
    share = sum(key.startswith("shapes[") for key in keys) / len(keys)
    assert abs(share - 0.75) < 0.02
    first_pass = [key for key in keys if key.startswith("glyphs[")][:300]
    assert sorted(first_pass) == sorted(f"glyphs[{i}]" for i in range(300))
    assert keys == [pipeline.shuffled_records(mixture, seed=0)[i]["key"] for i in range(10_000)]
    assert keys != [pipeline.shuffled_records(mixture, seed=1)[i]["key"] for i in range(10_000)]

    spec = "mix:shapes:40@1,glyphs:40@1"
    first = iter(make_train(tok, train=spec))
    head = take(first, 2)
    restored = iter(make_train(tok, train=spec))
    restored.set_state(first.get_state())
    assert_same_batches(take(restored, 2), take(first, 2))
    assert_same_batches(head, take(iter(make_train(tok, train=spec)), 2))
