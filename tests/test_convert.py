"""Tests for clipjax.tools.convert: webdataset tars and CSVs to ArrayRecord shards."""

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipjax.data import records, sources
from clipjax.tools import convert


def encoded(seed: int, size=(30, 40), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def webdataset_shard(path, shard: int) -> dict[str, tuple[bytes, str]]:
    """A tar as img2dataset writes it, with a corrupt jpg and an empty caption among its
    records; returns the good records, key -> (image bytes, caption)."""
    key = lambda i: f"{shard:05d}{i:04d}"  # noqa: E731
    good = {
        key(0): (encoded(10 * shard), "a jpeg with a .txt caption"),
        key(1): (encoded(10 * shard + 1, fmt="PNG"), "a png whose caption is in its .json"),
        key(4): (encoded(10 * shard + 4, fmt="WEBP"), "  a webp, spaces around  "),
    }
    members = [
        (f"{key(0)}.jpg", good[key(0)][0]),
        (f"{key(0)}.txt", good[key(0)][1].encode()),
        (f"{key(0)}.json", json.dumps({"url": "http://x", "caption": "not this one"}).encode()),
        (f"{key(1)}.png", good[key(1)][0]),
        (f"{key(1)}.json", json.dumps({"caption": good[key(1)][1], "width": 40}).encode()),
        (f"{key(2)}.jpg", b"\xff\xd8\xff\xe0 truncated nonsense"),
        (f"{key(2)}.txt", b"a corrupt image"),
        (f"{key(3)}.jpg", encoded(99)),
        (f"{key(3)}.txt", b"   "),
        (f"{key(4)}.webp", good[key(4)][0]),
        (f"{key(4)}.txt", good[key(4)][1].encode()),
        (f"{key(4)}.json", b"{}"),
    ]
    write_tar(path, members)
    return {k: (image, caption.strip()) for k, (image, caption) in good.items()}


def read_back(output) -> dict[str, tuple[bytes, str]]:
    source = sources.make_source(f"arrayrecord:{output}", "train")
    items = [source[i] for i in range(len(source))]
    assert all(set(item) == {"key", "image", "caption"} for item in items)
    return {item["key"]: (item["image"], item["caption"]) for item in items}


def test_webdataset_tars_round_trip_with_counts_and_resume(tmp_path, monkeypatch):
    expected = {}
    for shard in (0, 1):
        expected |= webdataset_shard(tmp_path / f"{shard:05d}.tar", shard)
    output = tmp_path / "out"
    index = convert.convert(str(tmp_path / "*.tar"), str(output))
    assert read_back(output) == expected  # image bytes unchanged, captions stripped
    assert index == json.loads((output / "index.json").read_text())
    assert index == {
        "shards": [
            {
                "file": f"{s:05d}.arrayrecord",
                "source": str(tmp_path / f"{s:05d}.tar"),
                "records": 3,
                "skipped": 2,
            }
            for s in (0, 1)
        ],
        "records": 6,
        "skipped": 4,
    }
    assert sorted(os.listdir(output)) == ["00000.arrayrecord", "00001.arrayrecord", "index.json"]

    # A rerun converts nothing; with a shard lost, only that one is rewritten.
    original, converted = convert._convert_shard, []

    def counted(task):
        converted.append(task[1])
        return original(task)

    monkeypatch.setattr(convert, "_convert_shard", counted)
    assert convert.convert(str(tmp_path / "*.tar"), str(output)) == index
    assert converted == []
    (output / "00001.arrayrecord").unlink()
    assert convert.convert(str(tmp_path), str(output)) == index  # a directory of tars
    assert converted == ["00001.arrayrecord"] and read_back(output) == expected


def test_a_cut_tar_keeps_its_records_before_the_cut_and_says_so(tmp_path):
    expected = webdataset_shard(tmp_path / "00000.tar", 0)
    data = (tmp_path / "00000.tar").read_bytes()
    # Cut inside the last record's members: its first three good records stay.
    (tmp_path / "00000.tar").write_bytes(data[: data.rfind(expected["000000004"][0][:64])])
    index = convert.convert(str(tmp_path / "00000.tar"), str(tmp_path / "out"))
    (entry,) = index["shards"]
    assert entry["damaged"] == "unexpected end of data"
    assert (entry["records"], entry["skipped"]) == (2, 2)
    kept = read_back(tmp_path / "out")
    assert kept == {key: expected[key] for key in ("000000000", "000000001")}


def test_parallel_workers_write_the_same_shards(tmp_path):
    for shard in range(3):
        webdataset_shard(tmp_path / f"{shard:05d}.tar", shard)
    one = convert.convert(str(tmp_path / "*.tar"), str(tmp_path / "one"))
    two = convert.convert(str(tmp_path / "*.tar"), str(tmp_path / "two"), workers=2)
    assert one == two and read_back(tmp_path / "one") == read_back(tmp_path / "two")


def test_max_side_shrinks_jpeg_and_keeps_png_lossless(tmp_path):
    y, x = np.mgrid[:200, :300]
    smooth = np.stack([x * 255 // 300, y * 255 // 200, (x + y) * 255 // 500], -1)
    out = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(out, format="JPEG", quality=95)
    big_jpeg, big_png, small = out.getvalue(), encoded(2, (90, 60), "PNG"), encoded(3)
    write_tar(
        tmp_path / "a.tar",
        [
            ("big.jpg", big_jpeg),
            ("big.txt", b"wide"),
            ("tall.png", big_png),
            ("tall.txt", b"tall"),
            ("small.jpg", small),
            ("small.txt", b"small"),
        ],
    )
    convert.convert(str(tmp_path / "a.tar"), str(tmp_path / "out"), max_side=50)
    back = read_back(tmp_path / "out")
    assert back["small"][0] == small  # within the limit: the original bytes
    wide = Image.open(io.BytesIO(back["big"][0]))
    assert wide.format == "JPEG" and wide.size == (50, 33)
    reference = Image.open(io.BytesIO(big_jpeg)).convert("RGB").resize((50, 33), Image.BICUBIC)
    assert np.abs(np.asarray(wide, float) - np.asarray(reference, float)).mean() < 1  # q95
    tall = Image.open(io.BytesIO(back["tall"][0]))
    assert tall.format == "PNG" and tall.size == (33, 50)
    reference = Image.open(io.BytesIO(big_png)).resize((33, 50), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(tall), np.asarray(reference))


def test_csv_input_in_chunks_with_column_options(tmp_path):
    rows, expected = [], {}
    for i in range(5):
        data = encoded(i, fmt="PNG")
        (tmp_path / f"{i}.png").write_bytes(data)
        rows.append((f"{i}.png", f"picture number {i}"))
        expected[f"{i}.png"] = (data, f"picture number {i}")
    rows.append(("missing.png", "no file"))
    rows.append(("0.png", ""))
    with open(tmp_path / "list.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["path", "alt"])
        writer.writerows(rows)
    index = convert.convert(
        str(tmp_path / "list.tsv"),
        str(tmp_path / "out"),
        records_per_shard=3,
        image_column="path",
        caption_column="alt",
    )
    source = str(tmp_path / "list.tsv")
    assert index["shards"] == [
        {"file": "list-00000.arrayrecord", "source": f"{source}[0:3]", "records": 3, "skipped": 0},
        {"file": "list-00001.arrayrecord", "source": f"{source}[3:6]", "records": 2, "skipped": 1},
        {"file": "list-00002.arrayrecord", "source": f"{source}[6:7]", "records": 0, "skipped": 1},
    ]
    assert (index["records"], index["skipped"]) == (5, 2)
    assert read_back(tmp_path / "out") == expected


def test_input_errors(tmp_path):
    with pytest.raises(ValueError) as error:
        convert.convert(str(tmp_path / "*.tar"), str(tmp_path / "out"))
    assert str(error.value) == (
        f"--input={tmp_path}/*.tar: no files match '{tmp_path}/*.tar'; pass a glob of "
        "webdataset .tar shards (quoted, e.g. '/data/cc3m/*.tar'), a directory of them, or a "
        ".csv/.tsv file."
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "a" / "x.tar", [("k.jpg", encoded(0)), ("k.txt", b"c")])
    write_tar(tmp_path / "b" / "x.tar", [("k.jpg", encoded(0)), ("k.txt", b"c")])
    with pytest.raises(ValueError, match="two inputs would both write x.arrayrecord"):
        convert.convert(str(tmp_path / "*" / "x.tar"), str(tmp_path / "out"))
    convert.convert(str(tmp_path / "a" / "x.tar"), str(tmp_path / "out"))
    with pytest.raises(ValueError) as error:
        convert.convert(str(tmp_path / "b" / "x.tar"), str(tmp_path / "out"))
    assert str(error.value) == (
        f"{tmp_path}/out/x.arrayrecord was converted from {tmp_path}/a/x.tar, not "
        f"{tmp_path}/b/x.tar; convert into another --output directory."
    )
    with pytest.raises(ValueError, match="no such file"):
        convert.convert(str(tmp_path / "nope.csv"), str(tmp_path / "out"))


def test_prepare_rejects_bad_records():
    cases = [
        ({"key": "k", "image": b"junk", "caption": "c"}, "cannot identify image file"),
        ({"key": "k", "image": encoded(0), "caption": None}, "missing caption"),
        ({"key": "k", "image": None, "caption": "c"}, "missing image"),
        ({"key": "k", "image": encoded(0), "caption": b"\xff"}, "caption is not UTF-8 text"),
    ]
    for raw, reason in cases:
        with pytest.raises(records.BadRecord) as error:
            convert.prepare(raw)
        assert error.value.reason == reason
