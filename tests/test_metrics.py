"""metrics.jsonl and TensorBoard event files carry the same values; the progress line reads well."""

import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from clipjax.metrics import MetricsWriter, Progress, read_metrics


def _rows(workdir) -> list[dict]:
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]


def _read_events(path):
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            events.append(event_pb2.Event.FromString(f.read(length)))
            f.read(4)
    return events


def test_jsonl_and_tensorboard_agree(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"train/loss": 2.5, "train/lr": 1e-3})
    writer.write(2, {"train/loss": 2.25})
    writer.close()
    assert _rows(str(tmp_path)) == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"step": 2, "train/loss": 2.25},
    ]
    [event_file] = (tmp_path / "tensorboard").iterdir()
    scalars = {
        (e.step, v.tag): v.simple_value for e in _read_events(event_file) for v in e.summary.value
    }
    # TensorBoard stores float32.
    assert scalars == pytest.approx(
        {(1, "train/loss"): 2.5, (1, "train/lr"): 1e-3, (2, "train/loss"): 2.25}, rel=1e-7
    )


def test_jsonl_appends_across_writers(tmp_path):
    for step in (1, 2):
        writer = MetricsWriter(str(tmp_path))
        writer.write(step, {"train/loss": float(step)})
        writer.close()
    assert [row["step"] for row in _rows(str(tmp_path))] == [1, 2]


def test_a_last_line_cut_by_a_kill_is_dropped_before_appending(tmp_path):
    """A run killed mid-write leaves half a row; the next writer removes it, so its own rows
    are whole, and every reader sees only whole rows."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    writer = MetricsWriter(str(tmp_path))
    writer.write(2, {"train/loss": 1.5})
    writer.close()
    rows, malformed = read_metrics(str(path))
    assert rows == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    assert malformed == 0
    path.write_text('{"step": 1')  # nothing whole at all
    MetricsWriter(str(tmp_path)).close()
    assert path.read_text() == ""


def test_progress_line():
    progress = Progress(total_steps=1000, batch_size=64, first_step=0)
    line = progress.line(step=250, loss=1.23456, samples_per_s=1280.0, eta_s=3725.0)
    assert line == "step  250/1000  loss 1.2346  1,280 samples/s  ETA 1:02:05"


def test_progress_line_before_any_rate_is_measured():
    progress = Progress(total_steps=600, batch_size=128, first_step=1)
    # Logged at the step it was reset at (the first step is also a logging step).
    assert progress.rate(1) == (None, None)
    assert (
        progress.line(1, 5.0, None, None)
        == "step   1/600  loss 5.0000  (rate after the next steps)"
    )
