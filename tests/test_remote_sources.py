"""Training and evaluation data in a bucket: `csv:` (and the images it names), `folder:`,
`arrayrecord:`, `webdataset:` and the converter's input and output, all at `gs://` paths,
read exactly as the same files on a local disk are. The bucket is `tests.fake_gcs`: epath
reads it in memory, and array_record's own GCS reader reaches it over local HTTP."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from clipjax import paths
from clipjax.data import records, sources
from clipjax.tools import convert
from tests import fake_gcs
from tests.test_data import make_train, take
from tests.test_webdataset import keys, shapes_shards, stream


@pytest.fixture
def bucket(monkeypatch):
    fake_gcs.install()
    with fake_gcs.served() as endpoint:
        monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", endpoint)
        yield "gs://data"
    fake_gcs.FakeGCS.store.clear()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write(folder: str, name: str, data: bytes) -> None:
    target = paths.path(paths.join(folder, name))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def labelled_pairs(folder: str) -> None:
    """`pairs.csv` (image, caption, label; one image path absent) with its images beside it,
    and `classes/<class>/<image>`."""
    rows = [("images/a.png", "a red one", "red"), ("images/b.png", "a blue one", "blue")]
    rows += [("images/c.png", "another red one", "red"), ("images/gone.png", "absent", "red")]
    for seed, (image, _, label) in enumerate(rows[:3]):
        write(folder, image, png(seed))
        write(folder, f"classes/{label}/{seed}.png", png(seed))
    text = io.StringIO()
    csv.writer(text).writerows([("image", "caption", "label"), *rows])
    write(folder, "pairs.csv", text.getvalue().encode())


def decoded(source) -> list:
    out = []
    for index in range(len(source)):
        try:
            out.append(records.decode(source[index]))
        except records.BadRecord as e:
            out.append(e.reason)
    return out


def assert_same(remote: list, local: list) -> None:
    assert len(remote) == len(local)
    for a, b in zip(remote, local, strict=True):
        if isinstance(a, str) or isinstance(b, str):
            assert type(a) is type(b)
            continue
        assert a.keys() == b.keys()
        for key in a:
            if key != "key":
                np.testing.assert_array_equal(a[key], b[key])


def test_csv_and_folder_sources_read_from_a_bucket_as_from_a_disk(bucket, tmp_path):
    labelled_pairs(bucket)
    labelled_pairs(str(tmp_path))
    for spec, split in [("csv:{}/pairs.csv", "train"), ("csv:{}/pairs.csv", "eval")]:
        remote = sources.make_source(spec.format(bucket), split)
        local = sources.make_source(spec.format(tmp_path), split)
        assert remote[0]["image"] == f"{bucket}/images/a.png"
        assert_same(decoded(remote), decoded(local))
        assert isinstance(decoded(remote)[3], str)  # the absent image: a bad record
        assert remote.class_names == local.class_names
    remote = sources.make_source(f"folder:{bucket}/classes", "eval")
    local = sources.make_source(f"folder:{tmp_path}/classes", "eval")
    assert remote.class_names == local.class_names == ["blue", "red"]
    assert_same(decoded(remote), decoded(local))
    # The fingerprint reads the images in the bucket.
    before = sources.fingerprint(sources.make_source(f"csv:{bucket}/pairs.csv", "train"))
    write(bucket, "images/b.png", png(7))
    after = sources.fingerprint(sources.make_source(f"csv:{bucket}/pairs.csv", "train"))
    assert before["records"] == after["records"] and before["sample"] != after["sample"]


def test_converter_reads_and_writes_a_bucket_and_arrayrecord_reads_it(bucket, tmp_path):
    """Tars in the bucket, converted into the bucket; the shards then read by array_record's
    GCS reader equal a local conversion of the same tars."""
    shapes_shards(f"{bucket}/tars", 3, 5, bad={4})
    shapes_shards(str(tmp_path / "tars"), 3, 5, bad={4})
    index = convert.convert(f"{bucket}/tars/*.tar", f"{bucket}/converted")
    assert (index["records"], index["skipped"]) == (14, 1)
    assert paths.is_file(f"{bucket}/converted/index.json")
    convert.convert(str(tmp_path / "tars"), str(tmp_path / "converted"))
    remote = sources.make_source(f"arrayrecord:{bucket}/converted", "train")
    local = sources.make_source(f"arrayrecord:{tmp_path}/converted", "train")
    assert len(remote) == len(local) == 14
    assert [remote[i] for i in range(14)] == [local[i] for i in range(14)]
    assert sources.fingerprint(remote) == sources.fingerprint(local)
    # Rerun: every shard is in the index and in the bucket, so none is converted again.
    assert convert.convert(f"{bucket}/tars/*.tar", f"{bucket}/converted") == index


def test_webdataset_streams_from_a_bucket_as_from_a_disk(bucket, tmp_path, tok):
    shapes_shards(f"{bucket}/shards", 3, 6)
    shapes_shards(str(tmp_path / "shards"), 3, 6)
    remote = take(stream(f"{bucket}/shards"), 40)
    local = take(stream(str(tmp_path / "shards")), 40)
    assert keys(remote) == keys(local)
    assert [(r["image"], r["caption"]) for r in remote] == [
        (r["image"], r["caption"]) for r in local
    ]
    shards = "shard-{000..002}.tar"  # a range: three names, each looked up
    batches = [
        take(iter(make_train(tok, train=f"webdataset:{folder}/shards/{shards}?buffer=5")), 3)
        for folder in (bucket, tmp_path)
    ]
    for a, b in zip(*batches, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_arrayrecord_on_a_scheme_array_record_cannot_read_is_refused_in_one_line():
    with pytest.raises(ValueError) as raised:
        sources.make_source("arrayrecord:s3://bucket/shards", "train")
    assert str(raised.value) == (
        "source 'arrayrecord:s3://bucket/shards': array_record reads local and gs:// files, not "
        "s3://; copy the shards to a local disk or a gs:// bucket, or stream tar shards with "
        "'webdataset:'."
    )
