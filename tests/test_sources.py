"""Tests for clipjax.data.sources (spec schemes) and clipjax.data.records (decoding, format)."""

import io
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from clipjax.data import glyphs, records, shapes, sources


def image_bytes(seed: int, size=(12, 9), fmt: str = "PNG") -> tuple[bytes, np.ndarray]:
    """Encoded bytes of a random RGB image, and its pixels (exact for PNG)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue(), pixels


def write_images(root, names) -> dict[str, np.ndarray]:
    """PNG files at root/name for each name; returns name -> pixels."""
    pixels = {}
    for seed, name in enumerate(names):
        data, pixels[name] = image_bytes(seed)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return pixels


def error_of(spec: str, split: str = "train") -> str:
    with pytest.raises(ValueError) as error:
        sources.make_source(spec, split)
    return str(error.value)


# ---------------------------------------------------------------------------- specs


def test_parse_spec_options_follow_the_last_question_mark():
    assert sources.parse_spec("shapes") == ("shapes", "", {})
    assert sources.parse_spec("shapes:4096?seed=1") == ("shapes", "4096", {"seed": "1"})
    assert sources.parse_spec("csv:/d/a?b.csv?image=x&caption=y") == (
        "csv",
        "/d/a?b.csv",
        {"image": "x", "caption": "y"},
    )
    # No '=' after the last '?': part of the path.
    assert sources.parse_spec("csv:/d/why?.csv") == ("csv", "/d/why?.csv", {})
    assert sources.parse_spec("tfds:cifar10:train[:10%]") == ("tfds", "cifar10:train[:10%]", {})


def test_spec_errors_are_one_line_and_name_the_spec(tmp_path):
    assert error_of("parquet:/data/x") == (
        "unknown data source 'parquet:/data/x'; known schemes: arrayrecord, csv, folder, "
        "glyphs, mix, shapes, tfds, webdataset (e.g. 'shapes:50000', 'csv:/data/train.csv' or "
        "'arrayrecord:/data/cc3m')."
    )
    assert error_of("shapes?size=3") == (
        "source 'shapes?size=3': unknown option 'size'; a shapes source takes only seed "
        "(e.g. 'shapes:50000')."
    )
    assert error_of("arrayrecord:/x?a=1") == (
        "source 'arrayrecord:/x?a=1': unknown option 'a'; a arrayrecord source takes no options "
        "(e.g. 'arrayrecord:/data/cc3m')."
    )
    assert error_of("shapes?seed=1&seed") == (
        "source 'shapes?seed=1&seed': option 'seed' is not key=value; write options as "
        "'?key=value&key=value'."
    )
    assert error_of("shapes:many") == (
        "source 'shapes:many': N must be a positive integer, e.g. 'shapes:50000'."
    )
    assert error_of("glyphs:0") == (
        "source 'glyphs:0': N must be a positive integer, e.g. 'glyphs:50000'."
    )
    assert error_of("shapes?seed=-1") == (
        "source 'shapes?seed=-1': seed must be a non-negative integer, e.g. 'shapes?seed=1'."
    )
    missing = tmp_path / "nope.csv"
    assert error_of(f"csv:{missing}") == (
        f"source 'csv:{missing}': no such file '{missing}'; give the path of a .csv or .tsv "
        "file (relative to the working directory, or absolute)."
    )
    pattern = str(tmp_path / "*.arrayrecord")
    assert error_of(f"arrayrecord:{tmp_path}") == (
        f"source 'arrayrecord:{tmp_path}': no ArrayRecord shards match '{pattern}'; write them "
        "with `python -m clipjax.tools.convert --input=... --output=DIR`."
    )
    (tmp_path / "index.json").write_text("{}")
    assert error_of(f"arrayrecord:{tmp_path}/*") == (
        f"source 'arrayrecord:{tmp_path}/*': no ArrayRecord shards match '{tmp_path}/*' (only "
        "index.json); write them with `python -m clipjax.tools.convert --input=... --output=DIR`."
    )
    assert error_of(f"folder:{tmp_path}") == (
        f"source 'folder:{tmp_path}': a folder of class subfolders has labels but no captions, "
        "so it cannot be a training source; use it for evaluations, and train on 'csv:', "
        "'arrayrecord:' or 'tfds:' image-caption pairs."
    )
    assert error_of(f"folder:{tmp_path}", "eval") == (
        f"source 'folder:{tmp_path}': no images in subfolders of '{tmp_path}' (extensions "
        ".jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff); put each class's images in its "
        "own subfolder."
    )
    assert error_of("shapes", "test") == (
        "source 'shapes': split 'test' is not one of ('train', 'eval')."
    )


def test_shapes_sizes_seeds_and_captions():
    assert len(sources.make_source("shapes", "train")) == 100_000
    assert len(sources.make_source("shapes", "eval")) == 2048
    assert len(sources.make_source("shapes:300", "eval")) == 300
    source = sources.make_source("shapes:3", "train")
    record = source[1]
    assert record["key"] == "shapes[1]" and set(record) == {"key", "image", "caption"}
    assert list(sources.captions("shapes:3")) == [source[i]["caption"] for i in range(3)]
    held_out = sources.make_source("shapes:4", "eval")
    assert held_out.class_names == shapes.CLASS_NAMES and int(held_out[3]["label"]) == 3
    # `?seed=` selects another stream, the same as the `seed` argument.
    other = sources.make_source("shapes:4?seed=1", "eval")
    same = sources.make_source("shapes:4", "eval", seed=1)
    np.testing.assert_array_equal(other[0]["image"], same[0]["image"])
    assert not np.array_equal(other[0]["image"], held_out[0]["image"])
    assert [int(other[i]["label"]) for i in range(4)] == [0, 1, 2, 3]


def test_glyphs_are_deterministic_balanced_and_captioned():
    source = sources.make_source("glyphs:50", "train")
    again = sources.make_source("glyphs:50", "train")
    record = source[7]
    assert record["key"] == "glyphs[7]" and set(record) == {"key", "image", "caption"}
    assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"], again[7]["image"])
    assert list(sources.captions("glyphs:50")) == [source[i]["caption"] for i in range(50)]
    held_out = sources.make_source("glyphs:72", "eval")
    assert held_out.class_names == glyphs.CLASS_NAMES and len(glyphs.CLASS_NAMES) == 36
    labels = [int(held_out[i]["label"]) for i in range(72)]
    assert labels == list(range(36)) * 2
    # Every caption names its character: "letter K" / "capital K", or a digit by word or numeral.
    dataset = glyphs.GlyphsSource("eval", size=72)
    for i in range(72):
        char = glyphs.CHARACTERS[labels[i]]
        caption = dataset[i]["caption"]
        if char.isalpha():
            assert f"letter {char}" in caption or f"capital {char}" in caption, caption
        else:
            word = glyphs.DIGIT_WORDS[int(char)]
            assert any(n in caption for n in (f"digit {word}", f"number {word}", f"number {char}"))
    # The glyph is drawn: its pixels differ from the background, and images differ by class.
    image = held_out[0]["image"].astype(int)
    assert (np.abs(image - image[0, 0]).sum(-1) > 100).mean() > 0.02
    assert not np.array_equal(held_out[0]["image"], held_out[1]["image"])


# ---------------------------------------------------------------------------- csv


def test_csv_train_relative_and_absolute_paths(tmp_path, monkeypatch):
    pixels = write_images(tmp_path / "data", ["img/a.png", "img/b.png"])
    other = write_images(tmp_path / "elsewhere", ["c.png"])
    absolute = str(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "data" / "train.csv").write_text(
        f'image,caption\nimg/a.png,a red thing\nimg/b.png,"b, with a comma "\n{absolute},  \n'
    )
    monkeypatch.chdir(tmp_path)  # the CSV's own folder anchors its relative paths
    source = sources.make_source("csv:data/train.csv", "train")
    assert len(source) == 3 and source.class_names is None
    decoded = [records.decode(pickle.loads(pickle.dumps(source))[i]) for i in range(2)]
    assert [d["key"] for d in decoded] == ["img/a.png", "img/b.png"]
    assert [d["caption"] for d in decoded] == ["a red thing", "b, with a comma"]
    np.testing.assert_array_equal(decoded[0]["image"], pixels["img/a.png"])
    np.testing.assert_array_equal(decoded[1]["image"], pixels["img/b.png"])
    assert source[2]["image"] == absolute
    with pytest.raises(records.BadRecord) as error:
        records.decode(source[2])  # its caption is blank
    assert (error.value.key, error.value.reason) == (absolute, "empty caption")
    np.testing.assert_array_equal(
        records.decode({**source[2], "caption": "c"})["image"], other["c.png"]
    )
    # Tokenizer captions skip the unusable one.
    assert list(source.captions(5)) == ["a red thing", "b, with a comma"]
    assert list(sources.captions("csv:data/train.csv", 1)) == ["a red thing"]


def test_fingerprint_follows_the_records_their_count_and_their_image_files(tmp_path):
    names = [f"{i}.png" for i in range(40)]
    write_images(tmp_path, names)

    def csv_source(count: int, caption: str = "a thing"):
        lines = [f"{name},{caption} {i}" for i, name in enumerate(names[:count])]
        (tmp_path / "train.csv").write_text("image,caption\n" + "\n".join(lines) + "\n")
        return sources.make_source(f"csv:{tmp_path}/train.csv", "train")

    before = sources.fingerprint(csv_source(40))
    assert before == sources.fingerprint(csv_source(40))  # deterministic
    assert before["records"] == 40
    cut = sources.fingerprint(csv_source(20))
    assert cut["records"] == 20 and cut["sample"] != before["sample"]
    # The same rows with other captions; then the same rows with the first image redrawn.
    assert sources.fingerprint(csv_source(40, "another"))["sample"] != before["sample"]
    image_bytes_, _ = image_bytes(99)
    (tmp_path / names[0]).write_bytes(image_bytes_)
    redrawn = sources.fingerprint(csv_source(40))
    assert redrawn["records"] == 40 and redrawn["sample"] != before["sample"]
    # Built-in datasets: their size and seed are their content.
    shapes50 = sources.fingerprint(sources.make_source("shapes:50", "train"))
    assert shapes50 == sources.fingerprint(sources.make_source("shapes:50", "train"))
    assert shapes50 != sources.fingerprint(sources.make_source("shapes:50?seed=1", "train"))
    assert sources.fingerprint(sources.make_source("shapes:51", "train"))["records"] == 51


MIX_EXAMPLE = "'mix:shapes:50000@3,csv:/data/pairs.csv@1'."
NOT_SPEC_AT_WEIGHT = "is not SPEC@WEIGHT with a positive weight; write " + MIX_EXAMPLE


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mix:", f"name the sources and their weights, e.g. {MIX_EXAMPLE}"),
        ("mix:shapes@x", f"'shapes@x' {NOT_SPEC_AT_WEIGHT}"),
        ("mix:shapes@0,glyphs@1", f"'shapes@0' {NOT_SPEC_AT_WEIGHT}"),
        (
            "mix:shapes:10@1,foo:1@1",
            "unknown data source 'foo:1'; known schemes: arrayrecord, csv, folder, glyphs, mix, "
            "shapes, tfds, webdataset (e.g. 'shapes:50000', 'csv:/data/train.csv' or "
            "'arrayrecord:/data/cc3m').",
        ),
        ("mix:mix:shapes@1@1", "a mixture cannot hold another mixture."),
    ],
)
def test_mixture_spec_errors_are_one_line(spec, message):
    assert error_of(spec) == f"source {spec!r}: {message}"


def test_mixture_shares_captions_and_fingerprint():
    mixture = sources.make_source("mix:shapes:200@3,glyphs:300?seed=2@1", "train")
    assert mixture.weights == [0.75, 0.25] and len(mixture) == 500
    assert mixture.specs == ["shapes:200", "glyphs:300?seed=2"]  # options stay with their part
    captions = list(mixture.captions(8))
    assert captions[:6] == list(sources.make_source("shapes:200", "train").captions(6))
    assert captions[6:] == list(sources.make_source("glyphs:300?seed=2", "train").captions(2))
    print_ = sources.fingerprint(mixture)
    assert print_["records"] == 500
    reweighted = sources.make_source("mix:shapes:200@1,glyphs:300?seed=2@1", "train")
    assert sources.fingerprint(reweighted)["sample"] != print_["sample"]
    assert error_of("mix:shapes@1", "eval") == (
        "source 'mix:shapes@1': a mixture is a training source; evaluate on each of its sources."
    )


def test_tsv_default_and_named_columns(tmp_path):
    write_images(tmp_path, ["x.png", "y.png"])
    (tmp_path / "a.tsv").write_text("filepath\ttitle\nx.png\ta title, not split\n")
    record = sources.make_source(f"csv:{tmp_path}/a.tsv", "train")[0]
    assert record == {
        "key": "x.png",
        "image": str(tmp_path / "x.png"),
        "caption": "a title, not split",
    }
    (tmp_path / "b.csv").write_text("pic,text,alt\ny.png,the text,the alt\n")
    assert sources.make_source(f"csv:{tmp_path}/b.csv?image=pic", "train")[0]["caption"] == (
        "the text"
    )
    named = sources.make_source(f"csv:{tmp_path}/b.csv?image=pic&caption=alt", "train")
    assert named[0]["caption"] == "the alt"
    assert error_of(f"csv:{tmp_path}/b.csv") == (
        f"source 'csv:{tmp_path}/b.csv': no image column (looked for 'image', 'filepath'; the "
        "columns are pic, text, alt); name it with '?image=COLUMN'."
    )
    assert error_of(f"csv:{tmp_path}/b.csv?image=pic&caption=title") == (
        f"source 'csv:{tmp_path}/b.csv?image=pic&caption=title': no column 'title' (option "
        "caption=); the columns are pic, text, alt."
    )
    (tmp_path / "c.csv").write_text("image,label\ny.png,dog\n")
    assert error_of(f"csv:{tmp_path}/c.csv") == (
        f"source 'csv:{tmp_path}/c.csv': a caption column is needed (looked for 'caption', "
        "'title', 'text'; the columns are image, label); name it with '?caption=COLUMN'."
    )


def test_csv_eval_groups_captions_and_labels(tmp_path):
    write_images(tmp_path, ["1.png", "2.png", "3.png"])
    (tmp_path / "e.csv").write_text(
        "image,caption,label\n"
        "1.png,one a,zebra\n2.png,two a,ant\n1.png,one b,zebra\n"
        "3.png,three,ant\n1.png,one c,zebra\n"
    )
    source = sources.make_source(f"csv:{tmp_path}/e.csv?label=label", "eval")
    assert len(source) == 3 and source.class_names == ["ant", "zebra"]
    assert source[0] == {
        "key": "1.png",
        "image": str(tmp_path / "1.png"),
        "captions": ["one a", "one b", "one c"],
        "label": 1,
    }
    assert [source[i]["label"] for i in range(3)] == [1, 0, 0]
    assert source[2]["captions"] == ["three"]
    unlabelled = sources.make_source(f"csv:{tmp_path}/e.csv", "eval")
    assert unlabelled.class_names is None and "label" not in unlabelled[0]
    (tmp_path / "l.csv").write_text("image,class\n1.png,zebra\n2.png,\n")
    assert error_of(f"csv:{tmp_path}/l.csv?label=class", "eval") == (
        f"source 'csv:{tmp_path}/l.csv?label=class': line 3 has an empty 'class'; every row of "
        "a labelled source needs a class name."
    )
    (tmp_path / "l2.csv").write_text("image,class\n1.png,zebra\n2.png,ant\n")
    labels_only = sources.make_source(f"csv:{tmp_path}/l2.csv?label=class", "eval")
    assert labels_only.class_names == ["ant", "zebra"]
    assert labels_only[1] == {"key": "2.png", "image": str(tmp_path / "2.png"), "label": 0}


# ---------------------------------------------------------------------------- folder


def test_folder_labels_follow_sorted_class_folders(tmp_path):
    pixels = write_images(
        tmp_path, ["tabby_cat/2.png", "tabby_cat/1.jpg.png", "ant/z.png", "ant/notes.txt"]
    )
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    source = sources.make_source(f"folder:{tmp_path}", "eval")
    assert source.class_names == ["ant", "tabby cat"] and source.prompt_templates is None
    keys = [source[i]["key"] for i in range(len(source))]
    assert keys == ["ant/z.png", "tabby_cat/1.jpg.png", "tabby_cat/2.png"]
    assert [source[i]["label"] for i in range(3)] == [0, 1, 1]
    decoded = records.decode(pickle.loads(pickle.dumps(source))[2])
    np.testing.assert_array_equal(decoded["image"], pixels["tabby_cat/2.png"])


# ---------------------------------------------------------------------------- arrayrecord


def write_arrayrecord(path, items) -> None:
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for item in items:
        writer.write(records.pack(item))
    writer.close()


def test_arrayrecord_reads_packed_records_from_glob_or_directory(tmp_path):
    items = [
        {"key": f"k{i}", "image": image_bytes(i, fmt="JPEG")[0], "caption": f"caption {i}"}
        for i in range(5)
    ]
    write_arrayrecord(tmp_path / "b.arrayrecord", items[3:])
    write_arrayrecord(tmp_path / "a.arrayrecord", items[:3])
    (tmp_path / "a.arrayrecord.tmp").write_bytes(b"an unfinished shard")  # not matched
    (tmp_path / "index.json").write_text("{}")  # the converter's index: not a shard
    specs = [f"arrayrecord:{tmp_path}", f"arrayrecord:{tmp_path}/*.arrayrecord"]
    for spec in [*specs, f"arrayrecord:{tmp_path}/*"]:
        source = pickle.loads(pickle.dumps(sources.make_source(spec, "train")))
        assert len(source) == 5
        assert [source[i] for i in range(5)] == items  # files in sorted name order
        assert list(source.captions(2)) == ["caption 0", "caption 1"]
    only_b = sources.make_source(f"arrayrecord:{tmp_path}/b.*", "eval")
    assert [only_b[i]["key"] for i in range(len(only_b))] == ["k3", "k4"]


# ---------------------------------------------------------------------------- tfds


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.make_source("tfds:cifar10", "eval")  # default split: test
        assert len(source) == 6
        assert source.class_names == tfds.builder("cifar10").info.features["label"].names
        direct = tfds.data_source("cifar10", split="test")
        for i in range(6):
            record = records.decode(source[i])
            assert record["key"] == f"tfds:cifar10[{i}]"
            np.testing.assert_array_equal(record["image"], direct[i]["image"])
            assert record["label"] == int(direct[i]["label"])
        copy = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(copy[2]["image"], source[2]["image"])
        sliced = sources.make_source("tfds:cifar10:train[:3]?data_dir=/tmp/unused", "eval")
        assert len(sliced) == 6  # mock data ignores the slice, but the spec parses
        # Grey images become RGB.
        mnist = records.decode(sources.make_source("tfds:mnist", "eval")[0])
        assert mnist["image"].shape == (28, 28, 3)
        assert (mnist["image"][..., 0] == mnist["image"][..., 2]).all()
        assert error_of("tfds:cifar10") == (
            "source 'tfds:cifar10': a caption feature is needed (looked for 'caption', 'text', "
            "'captions/text'; features: id, image, label); name it with '?caption=FEATURE'."
        )
        assert error_of("tfds:cifar10?image=picture", "eval") == (
            "source 'tfds:cifar10?image=picture': no image feature 'picture' (features: id, "
            "image, label); name it with '?image=FEATURE'."
        )
        assert error_of("tfds:cifar10?label=fine", "eval") == (
            "source 'tfds:cifar10?label=fine': no feature 'fine' (option label=; features: id, "
            "image, label)."
        )
        # A text feature named as the caption makes it a training source.
        train = sources.make_source("tfds:cifar10?caption=id", "train")
        assert train[0]["caption"] == direct[0]["id"] and "label" not in train[0]
        assert list(train.captions(2)) == [
            tfds.data_source("cifar10", split="train")[i]["id"] for i in range(2)
        ]
    message = error_of("tfds:no_such_dataset_xyz", "eval")
    assert message.startswith(
        "source 'tfds:no_such_dataset_xyz': TFDS cannot open split 'test' of 'no_such_dataset_xyz' "
        "(Dataset no_such_dataset_xyz not found.); prepare it as ArrayRecord"
    )
    assert "\n" not in message


# ---------------------------------------------------------------------------- records


def test_decode_images_of_every_kind(tmp_path):
    png, pixels = image_bytes(0)
    (tmp_path / "a.png").write_bytes(png)
    for image in (png, str(tmp_path / "a.png"), pixels):
        decoded = records.decode({"key": "k", "image": image, "caption": b" caf\xc3\xa9 "})
        np.testing.assert_array_equal(decoded["image"], pixels)
        assert decoded["caption"] == "café" and decoded["image"].dtype == np.uint8
    grey = pixels[..., 0]
    for image in (grey, grey[..., None]):
        rgb = records.decode({"key": "k", "image": image})["image"]
        np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=-1))
    rgba = np.concatenate([pixels, np.full((*grey.shape, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(records.decode({"key": "k", "image": rgba})["image"], pixels)
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, format="PNG")
    np.testing.assert_array_equal(
        records.decode({"key": "k", "image": out.getvalue()})["image"], pixels
    )
    multi = records.decode({"key": "k", "image": pixels, "captions": ["a ", "b"], "label": 3})
    assert multi["captions"] == ["a", "b"] and multi["label"] == 3


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"image": b"not an image", "caption": "c"}, "cannot identify image file"),
        ({"image": "/nonexistent/x.jpg", "caption": "c"}, "No such file or directory"),
        ({"caption": "c"}, "missing image"),
        ({"image": "PNG", "caption": None}, "missing caption"),
        ({"image": "PNG", "caption": " \n"}, "empty caption"),
        ({"image": "PNG", "caption": b"\xff\xfe"}, "caption is not UTF-8 text"),
        ({"image": "PNG", "caption": 3.5}, "caption of type float"),
        ({"image": "PNG", "captions": ["fine", ""]}, "empty caption"),
        ({"image": "PNG", "captions": []}, "captions is not a non-empty list"),
        ({"image": np.zeros((0, 4, 3), np.uint8)}, "empty image"),
    ],
)
def test_decode_bad_records(record, reason):
    png = image_bytes(0)[0]
    if isinstance(record.get("image"), str) and record["image"] == "PNG":
        record["image"] = png
    with pytest.raises(records.BadRecord) as error:
        records.decode({"key": "the/key", **record})
    assert (error.value.key, error.value.reason) == ("the/key", reason)
    assert str(error.value) == f"the/key ({reason})"


def test_truncated_jpeg_is_bad():
    jpeg = image_bytes(1, size=(64, 64), fmt="JPEG")[0]
    with pytest.raises(records.BadRecord) as error:
        records.decode({"key": "t", "image": jpeg[: len(jpeg) // 2], "caption": "c"})
    assert "truncated" in error.value.reason


def test_pack_unpack_round_trip_and_foreign_bytes():
    record = {"key": "00042", "image": image_bytes(3, fmt="JPEG")[0], "caption": "ünïcode ok"}
    assert records.unpack(records.pack(record)) == record
    with pytest.raises(ValueError, match="not a clipjax msgpack record"):
        records.unpack(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="not a clipjax record"):
        records.unpack(b"\x92\x01\x02")  # a msgpack list


def test_sources_pickle_small(tmp_path):
    # Workers receive sources pickled: a CSV source does not carry its rows.
    write_images(tmp_path, ["x.png"])
    (tmp_path / "big.csv").write_text("image,caption\n" + "x.png,a long enough caption\n" * 5000)
    source = sources.make_source(f"csv:{tmp_path}/big.csv", "train")
    data = pickle.dumps(source)
    assert len(data) < 2000
    copy = pickle.loads(data)
    assert len(copy) == 5000 and copy[4999] == source[4999]
    assert os.path.samefile(copy[0]["image"], tmp_path / "x.png")
