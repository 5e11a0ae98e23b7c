"""`webdataset:` tar shards streamed: the records of a tar, the split of shards over readers,
the shuffled blocks, exact resume (in the pipeline, with workers, and after kill -9 of
`python -m clipjax.main`), bad records and damaged shards, and one-line errors."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from clipjax import paths
from clipjax.data import shapes, sources, webdataset
from tests import tiny
from tests.test_data import assert_same_batches, make_train, take

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def shapes_shards(folder: str, shards: int, per_shard: int, bad: tuple = ()) -> dict:
    """`shards` tars of `per_shard` shapes pairs each (PNG and .txt) in `folder` (local or
    gs://); the records numbered in `bad` get bytes that are no image. Returns key ->
    caption of every record."""
    data = shapes.ShapesSource("train", size=shards * per_shard, seed=0)
    paths.path(folder).mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in range(shards):
        members = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            example, key = data[i], f"{shard:03d}/{i:05d}"
            image = io.BytesIO()
            Image.fromarray(example["image"]).save(image, format="PNG")
            image = b"no image" if i in bad else image.getvalue()
            members += [(f"{key}.png", image), (f"{key}.txt", example["caption"].encode())]
            captions[key] = example["caption"]
        paths.path(paths.join(folder, f"shard-{shard:03d}.tar")).write_bytes(tar_bytes(members))
    return captions


def keys(records) -> list[str]:
    return [record["key"].rpartition(":")[2] for record in records]


@pytest.fixture
def shards(tmp_path):
    """5 shards of 7 records."""
    return str(tmp_path), shapes_shards(str(tmp_path), 5, 7)


def stream(folder: str, reader=0, readers=1, seed=0, buffer=4):
    source = sources.make_source(f"webdataset:{folder}/*.tar?buffer={buffer}", "train")
    return iter(webdataset.ShardStream(source, seed, reader, readers))


def test_tar_records_group_members_by_key_read_gzip_and_skip(tmp_path):
    members = [
        ("a/1.jpg", b"J1"),
        ("a/1.txt", b"one"),
        ("a/1.json", json.dumps({"caption": "not this"}).encode()),
        ("2.PNG", b"P2"),
        ("2.json", json.dumps({"caption": "two"}).encode()),
        ("3.webp", b"W3"),
        ("3.cls", b"7"),
        ("4.txt", b"no image"),
        ("5.jpg", b"J5"),
        ("5.json", b"not json"),
    ]
    want = [
        {"key": "a/1", "image": b"J1", "caption": "one"},
        {"key": "2", "image": b"P2", "caption": "two"},
        {"key": "3", "image": b"W3", "caption": None},
        {"key": "4", "image": None, "caption": "no image"},
        {"key": "5", "image": b"J5", "caption": None},
    ]
    want = [{**r, "caption": r["caption"].encode() if r["caption"] else None} for r in want]
    want[1]["caption"] = "two"  # a .json caption is text; a .txt one, bytes
    (tmp_path / "plain.tar").write_bytes(tar_bytes(members))
    (tmp_path / "packed.tar.gz").write_bytes(gzip.compress(tar_bytes(members)))
    for name in ("plain.tar", "packed.tar.gz"):
        assert list(webdataset.tar_records(str(tmp_path / name))) == want
        assert list(webdataset.tar_records(str(tmp_path / name), skip=3)) == want[3:]


def test_a_damaged_tar_gives_its_records_before_the_damage(tmp_path):
    data = tar_bytes([(f"{i}.jpg", bytes(3000)) for i in range(4)])
    (tmp_path / "cut.tar").write_bytes(data[:5000])  # inside the second member
    got = []
    with pytest.raises(webdataset.DamagedShard) as raised:
        for record in webdataset.tar_records(str(tmp_path / "cut.tar")):
            got.append(record["key"])
    assert got == ["0"] and raised.value.records == 1


def test_each_epoch_reads_every_record_once_split_over_the_readers(shards):
    folder, captions = shards
    epoch_0 = []  # each reader's records of epoch 0, the position's epoch after each
    for reader in range(2):
        it, mine = stream(folder, reader, 2, buffer=7), []
        while (record := next(it)) and it.get_state()["epoch"] == 0:
            mine.append(record)
        epoch_0.append(keys(mine))
    assert sorted(epoch_0[0] + epoch_0[1]) == sorted(captions)
    shards_of = [{key[:3] for key in records} for records in epoch_0]
    assert not shards_of[0] & shards_of[1]  # whole shards, 3 and 2 of the 5
    assert sorted(len(names) for names in shards_of) == [2, 3]


def test_blocks_are_shuffled_from_the_seed_and_epochs_reorder_the_shards(shards):
    folder, captions = shards
    one_epoch = keys(take(stream(folder), 35))
    assert sorted(one_epoch) == sorted(captions)  # every record once
    assert one_epoch == keys(take(stream(folder), 35))  # deterministic
    assert one_epoch != keys(take(stream(folder, seed=1), 35))
    # Each block of 4 is a permutation of 4 consecutive records of the unshuffled stream
    # (blocks of 1), which reads the same shards in the same order; not every block keeps it.
    sequential = keys(take(stream(folder, buffer=1), 35))
    blocks = [(one_epoch[i : i + 4], sequential[i : i + 4]) for i in range(0, 32, 4)]
    assert all(sorted(got) == sorted(want) for got, want in blocks)
    assert any(got != want for got, want in blocks)
    # The second epoch reads the shards in another order.
    second = keys(take(stream(folder), 70)[35:])
    assert sorted(second) == sorted(captions) and second != one_epoch


@pytest.mark.parametrize("readers", [1, 2])
def test_the_position_restores_exactly_anywhere(shards, readers):
    folder, _ = shards
    reference = keys(take(stream(folder, 0, readers), 90))  # three epochs or more
    for count in range(0, 90, 7):
        it = stream(folder, 0, readers)
        take(it, count)
        resumed = stream(folder, 0, readers)
        resumed.set_state(it.get_state())
        assert keys(take(resumed, 90 - count)) == reference[count:], count


def test_a_position_saved_by_other_readers_is_refused_in_one_line(shards):
    folder, _ = shards
    state = stream(folder, 0, 2).get_state()
    with pytest.raises(ValueError, match=r"read by 2 readers .* this run has 1; resume with"):
        stream(folder, 0, 1).set_state(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pipeline_batches_resume_exactly_and_bad_records_are_counted(tmp_path, tok, num_workers):
    shapes_shards(str(tmp_path), 4, 10, bad={3, 17})
    spec = f"webdataset:{tmp_path}/shard-{{000..003}}.tar?buffer=6"
    make = lambda: make_train(tok, train=spec, num_workers=num_workers, batch_size=4)  # noqa: E731
    it = iter(make())
    reference = take(it, 14)
    it.close()
    for count in (3, 8):
        it = iter(make())
        take(it, count)
        state = it.get_state()
        it.close()
        resumed = iter(make())
        resumed.set_state(state)
        assert_same_batches(take(resumed, 14 - count), reference[count:])
        resumed.close()
    # 14 batches of 4 read 56 records or more: more than one epoch of 40, with 2 bad ones each.
    skipped = sum(int(batch["skipped"].sum()) for batch in reference)
    assert skipped in (2, 3, 4)
    assert all(batch["image"].shape == (4, 24, 24, 3) for batch in reference)


def test_damaged_shard_is_named_once_and_the_stream_goes_on(tmp_path, monkeypatch):
    shapes_shards(str(tmp_path), 2, 6)
    cut = tmp_path / "shard-001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    messages = []
    monkeypatch.setattr(
        webdataset.logging, "warning", lambda text, *args: messages.append(text % args)
    )
    got = keys(take(stream(str(tmp_path), buffer=100), 30))
    assert len([m for m in messages if "shard-001.tar is damaged after" in m]) == 1
    from_cut = {key for key in got if key.startswith("001")}
    assert 0 < len(from_cut) < 6  # its records before the damage, each epoch
    assert {key for key in got if key.startswith("000")} == {f"000/{i:05d}" for i in range(6)}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("webdataset:", "give the shards, e.g."),
        ("webdataset:{folder}/*.tar?buffer=0", "buffer must be a positive number of records"),
        ("webdataset:{folder}/nothing-*.tar", "no .tar shards match"),
        ("mix:webdataset:{folder}@1,shapes@1", "a mixture draws from random-access sources"),
    ],
)
def test_spec_errors_are_one_line(tmp_path, tok, spec, message):
    shapes_shards(str(tmp_path), 1, 2)
    spec = spec.format(folder=tmp_path)
    with pytest.raises(ValueError) as raised:
        sources.make_source(spec, "train")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="webdataset shards are streamed, for training"):
        sources.make_source(f"webdataset:{tmp_path}", "eval")
    with pytest.raises(ValueError) as raised:
        make_train(tok, train=f"webdataset:{tmp_path}", num_workers=2)
    assert str(raised.value) == (
        f"source 'webdataset:{tmp_path}': 1 shards cannot be split over 2 readers (1 processes "
        "× 2 workers, config.data.num_workers); lower config.data.num_workers or write more "
        "shards."
    )


def test_kill_9_and_resume_train_on_the_uninterrupted_runs_batches(tmp_path):
    """`python -m clipjax.main` on webdataset shards (with a Grain worker), killed twice with
    SIGKILL and restarted: its checkpoint and every logged loss bitwise equal the
    uninterrupted run's (`clipjax.tools.soak`)."""
    shapes_shards(str(tmp_path / "shards"), 4, 48)
    output = tmp_path / "soak"
    env = tiny.one_device_env()
    command = [sys.executable, "-m", "clipjax.tools.soak"]
    command += ["--config=tests/configs/tiny.py:clip_vitb32", "--signals=KILL"]
    command += ["--faults=2", "--steps=12", "--ckpt_every=3", f"--output={output}"]
    command += [f"--override=--config.data.train=webdataset:{tmp_path}/shards?buffer=40"]
    command += ["--override=--config.data.num_workers=1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["landed"] == 2 and report["equal"]
    assert {fault["signal"] for fault in report["faults"]} == {"SIGKILL"}
    assert not report["arrays_differ"] and not report["rows_differ"] and report["rows"] >= 12
    # Another number of workers would read other shards: refused in one line, before training.
    command = [sys.executable, "-m", "clipjax.main", "--config=tests/configs/tiny.py:clip_vitb32"]
    command += [f"--workdir={output / 'soaked'}", "--config.total_steps=15", "--config.evals={}"]
    command += [f"--config.data.train=webdataset:{tmp_path}/shards?buffer=40"]
    command += ["--config.data.num_workers=2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"clipjax: checkpoint {output}/soaked/checkpoints/12 was saved while 1 readers (processes "
        "× config.data.num_workers) streamed the webdataset shards, and this run has 2, which "
        "would read other shards; resume with the same processes and config.data.num_workers, "
        "or train in a new --workdir (--config.init_from=WORKDIR starts from its weights)."
    )
