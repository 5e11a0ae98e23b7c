"""A `gs://` workdir through the one path layer: every file the trainer keeps beside its
checkpoints is written and read through etils.epath, here backed by an in-memory fsspec
filesystem that stands in for Google Cloud Storage (no network). Orbax takes the same
epath.Path for the checkpoints and writes their arrays with tensorstore, which reaches GCS
itself; that part needs a bucket."""

import json
import os

import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from clipjax import config as config_lib
from clipjax import paths, train
from clipjax.data import shapes
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.errors import ConfigError
from clipjax.lock import workdir_lock
from clipjax.metrics import MetricsWriter, read_metrics
from tests import tiny
from tests.fake_gcs import FakeGCS, install


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://bucket/run`, in memory; the test runs in an empty local folder, which must stay
    empty (the old code wrote a remote workdir under `./gs:/`)."""
    install()
    monkeypatch.chdir(tmp_path)
    yield "gs://bucket/run"
    assert os.listdir(tmp_path) == []
    FakeGCS.store.clear()


def stored() -> set[str]:
    return set(FakeGCS.store)


def test_metrics_and_tensorboard_go_to_the_bucket(bucket):
    writer = MetricsWriter(bucket)
    writer.write(1, {"train/loss": 2.5})
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    rows, malformed = read_metrics(f"{bucket}/metrics.jsonl")
    assert rows == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0}]
    assert malformed == 0
    # A resumed run appends to what is there.
    writer = MetricsWriter(bucket)
    writer.write(3, {"train/loss": 1.5})
    writer.close()
    assert [r["step"] for r in read_metrics(f"{bucket}/metrics.jsonl")[0]] == [1, 2, 3]
    values = {}
    for events in epath.Path(bucket, "tensorboard").iterdir():  # one file per writer
        data = events.read_bytes()
        while data:  # TFRecord framing: length (8), its crc (4), the event, its crc (4)
            length = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12 : 12 + length])
            values.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
            data = data[16 + length :]
    assert values == {(1, "train/loss"): 2.5, (2, "train/loss"): 2.0, (3, "train/loss"): 1.5}


def test_config_tokenizer_and_lock_go_to_the_bucket(bucket):
    config = tiny.tiny_config()
    config_lib._check_workdir(bucket)
    train._save_config(config, bucket)
    assert config_lib.load_saved(bucket).model.embed_dim == config.model.embed_dim
    trained = tokenizer_lib.load_or_train(
        config.data.tokenizer, bucket, shapes.ShapesSource("train").captions(300)
    )
    assert tokenizer_lib.saved_in(bucket)
    again = tokenizer_lib.load_or_train(config.data.tokenizer, bucket, [])  # no captions needed
    assert again.model_proto == trained.model_proto
    with workdir_lock(bucket):
        holder = json.loads(epath.Path(bucket, "lock").read_text())
        assert holder["pid"] == os.getpid()
        in_use = pytest.raises(ConfigError, match=f"--workdir={bucket} is in use by pid")
        with in_use, workdir_lock(bucket):
            pass
    assert stored() == {
        "/bucket/run/config.json",
        "/bucket/run/tokenizer.model",
    }


def test_local_paths_are_absolute_and_remote_ones_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.path("run")) == os.path.join(tmp_path, "run")
    assert os.fspath(paths.path("gs://b/run")) == "gs://b/run"
    paths.write_atomic(paths.path("f"), b"whole")
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"whole"
