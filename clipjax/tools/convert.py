r"""Convert image-caption data to clipjax's ArrayRecord shards (the `arrayrecord:` source).

  python -m clipjax.tools.convert --input='/data/cc3m/*.tar' --output=/data/cc3m_ar --workers=8
  python -m clipjax.tools.convert --input=/data/train.csv --output=/data/train_ar \
      --caption_column=title --max_side=512

Inputs: webdataset tar shards as img2dataset writes them (members `<key>.jpg|png|webp` with
`<key>.txt`, or `<key>.json` holding a "caption"; members grouped by key;
`webdataset.tar_records`), one output shard per tar; or a CSV/TSV read as the `csv:` source
reads it, `--records_per_shard` rows per output shard. Input and output may be in a bucket
(`gs://...`; `clipjax.paths`): a remote shard is written locally, then uploaded whole.
Records are `records.pack({"key", "image": encoded bytes, "caption"})`; images keep their
bytes unless `--max_side` shrinks them (JPEG quality 95; PNG stays PNG).

Bad records (an image that does not decode, a missing or empty caption) are skipped, counted
and the first few named in the log; a damaged tar keeps the records before the damage, and
its index entry says why it ended ("damaged"). Each shard is written to a temporary name and
renamed, and `index.json` ({"shards": [{"file", "source", "records", "skipped"}], "records",
"skipped"}) is rewritten after each shard, so an interrupted run resumes where it stopped: rerun
the command.
"""

import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags, logging
from array_record.python import array_record_module
from PIL import Image

from clipjax import paths
from clipjax.data import records, sources, webdataset

INDEX = "index.json"
# Random access needs one record per chunk; JPEG/PNG/WebP bytes do not compress further.
WRITER_OPTIONS = "group_size:1,uncompressed"
_NAMED_BAD = 10  # bad records named in the log, over the whole run


def _shrink(image: Image.Image, max_side: int) -> bytes:
    """Resized so that the longer side is `max_side`; PNG re-encoded as PNG, others as JPEG."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    if image.format == "PNG":
        image.resize(size, Image.BICUBIC).save(out, format="PNG")
    else:
        image.convert("RGB").resize(size, Image.BICUBIC).save(out, format="JPEG", quality=95)
    return out.getvalue()


def prepare(raw: dict, max_side: int = 0) -> bytes:
    """A raw record (`key`, `image` bytes or file path, `caption`) -> one packed record.

    Raises `records.BadRecord` if the image does not decode or the caption is missing or
    empty. With `max_side` > 0, a larger image is shrunk to that longer side."""
    key = str(raw["key"])
    caption = records.clean_caption(raw.get("caption"), key)
    data = raw.get("image")
    if isinstance(data, str):
        try:
            data = paths.read_bytes(data)
        except OSError as e:
            raise records.BadRecord(key, e.strerror or str(e)) from None
    if data is None:
        raise records.BadRecord(key, "missing image")
    image = records.load_image(data, key)
    if max_side and max(image.size) > max_side:
        data = _shrink(image, max_side)
    return records.pack({"key": key, "image": data, "caption": caption})


def _convert_shard(task: tuple) -> dict:
    """Writes one output shard; returns its index entry plus `bad`: the first (key, reason)s.

    `task` = (output dir, file name, source description, max_side, raw records or a tar
    path). A remote shard is written to a local temporary file, then uploaded whole."""
    output, name, source, max_side, raws = task
    if isinstance(raws, str):
        raws = webdataset.tar_records(raws)
    target = paths.join(output, name)
    remote = paths.is_remote(target)
    if remote:
        handle, local = tempfile.mkstemp(suffix=".arrayrecord.tmp")
        os.close(handle)
    else:
        local = target + ".tmp"
    count, bad, skipped, damaged = 0, [], 0, None
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    try:
        for raw in raws:
            try:
                writer.write(prepare(raw, max_side))
                count += 1
            except records.BadRecord as e:
                skipped += 1
                if len(bad) < _NAMED_BAD:
                    bad.append((e.key, e.reason))
    except webdataset.DamagedShard as e:  # its records up to the damage are kept
        damaged = e.reason
    finally:
        writer.close()
    if remote:
        try:
            with open(local, "rb") as f, paths.path(target).open("wb") as out:
                shutil.copyfileobj(f, out, length=1 << 24)
        finally:
            os.remove(local)
    else:
        os.replace(local, target)
    entry = {"file": name, "source": source, "records": count, "skipped": skipped, "bad": bad}
    if damaged is not None:
        entry["damaged"] = damaged
    return entry


def _write_index(output: str, entries: dict) -> dict:
    shards = [entries[name] for name in sorted(entries)]
    index = {
        "shards": shards,
        "records": sum(s["records"] for s in shards),
        "skipped": sum(s["skipped"] for s in shards),
    }
    paths.write_atomic(paths.path(output) / INDEX, json.dumps(index, indent=1).encode())
    return index


def _read_index(output: str) -> dict:
    index = paths.path(output) / INDEX
    if not index.exists():
        return {}
    return {entry["file"]: entry for entry in json.loads(index.read_text())["shards"]}


def _stem(path: str) -> str:
    base = path.rpartition("/")[2]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def plan(
    input_: str, *, records_per_shard: int, image_column=None, caption_column=None
) -> list[tuple[str, str, object]]:
    """The output shards of `input_`: (file name, source description, tar path or raw
    records). Raises ValueError for an input that matches nothing."""
    if input_.lower().endswith((".csv", ".tsv")):
        options = {"image": image_column, "caption": caption_column}
        query = "&".join(f"{k}={v}" for k, v in options.items() if v)
        source = sources.make_source(f"csv:{input_}" + (f"?{query}" if query else ""), "train")
        stem = _stem(input_).rsplit(".", 1)[0]
        shards = []
        for start in range(0, len(source), records_per_shard):
            stop = min(start + records_per_shard, len(source))
            name = f"{stem}-{start // records_per_shard:05d}.arrayrecord"
            raws = [source[i] for i in range(start, stop)]
            shards.append((name, f"{os.fspath(paths.path(input_))}[{start}:{stop}]", raws))
        return shards
    pattern = paths.local(input_)
    if paths.is_dir(pattern):
        pattern = paths.join(pattern, "*.tar")
    tars = paths.glob(pattern)
    if not tars:
        raise ValueError(
            f"--input={input_}: no files match {pattern!r}; pass a glob of webdataset .tar "
            "shards (quoted, e.g. '/data/cc3m/*.tar'), a directory of them, or a .csv/.tsv file."
        )
    names = [f"{_stem(p)}.arrayrecord" for p in tars]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[0]
        raise ValueError(
            f"--input={input_}: two inputs would both write {twice}; convert them into "
            "different --output directories."
        )
    tars = [os.fspath(paths.path(p)) for p in tars]  # absolute, as the index records them
    return [(name, p, p) for name, p in zip(names, tars, strict=True)]


def _progress(done: int, total: int, count: int, start: float, done_at_start: int) -> None:
    """One updating line on stderr: shards done, records written, their rate, time left."""
    elapsed = time.monotonic() - start
    rate = count / elapsed if elapsed > 0 else 0.0
    new = done - done_at_start
    eta = "?"
    if new:
        minutes, seconds = divmod(int(elapsed / new * (total - done)), 60)
        eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    print(
        f"\rshards {done}/{total}  records {count}  {rate:.0f} records/s  ETA {eta}",
        end="" if done < total else "\n",
        file=sys.stderr,
        flush=True,
    )


def convert(
    input_: str,
    output: str,
    *,
    max_side: int = 0,
    records_per_shard: int = 10_000,
    workers: int = 1,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> dict:
    """Converts `input_` (see the module docstring) into shards in `output`; returns the index.

    Shards already listed in `output/index.json` with the same source and present on disk are
    kept, not rewritten."""
    if records_per_shard < 1:
        raise ValueError(f"--records_per_shard={records_per_shard} must be at least 1.")
    shards = plan(
        input_,
        records_per_shard=records_per_shard,
        image_column=image_column,
        caption_column=caption_column,
    )
    output = paths.local(output)
    paths.path(output).mkdir(parents=True, exist_ok=True)
    entries = _read_index(output)
    todo = []
    for name, source, raws in shards:
        entry = entries.get(name)
        if entry is not None and entry["source"] != source:
            raise ValueError(
                f"{paths.join(output, name)} was converted from {entry['source']}, not "
                f"{source}; convert into another --output directory."
            )
        if entry is None or not paths.is_file(paths.join(output, name)):
            todo.append((output, name, source, max_side, raws))
    done_at_start = len(shards) - len(todo)
    if done_at_start:
        logging.info(
            "%d of %d shards were already converted; skipping them.", done_at_start, len(shards)
        )
    start, count, named = time.monotonic(), 0, 0
    _progress(done_at_start, len(shards), 0, start, done_at_start)
    # Spawned, not forked: forking a process that has started threads can deadlock.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        written = pool.imap_unordered(_convert_shard, todo) if pool else map(_convert_shard, todo)
        for done, entry in enumerate(written, start=done_at_start + 1):
            for key, reason in entry.pop("bad")[: max(0, _NAMED_BAD - named)]:
                logging.warning("Skipped %s in %s: %s.", key, entry["source"], reason)
                named += 1
            if "damaged" in entry:
                logging.warning(
                    "%s is damaged after %d records (%s); kept those records.",
                    entry["source"],
                    entry["records"] + entry["skipped"],
                    entry["damaged"],
                )
            entries[entry["file"]] = entry
            _write_index(output, entries)
            count += entry["records"]
            _progress(done, len(shards), count, start, done_at_start)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return _write_index(output, entries)


def _define_flags() -> None:
    # Defined here, not on import, so that importing this module adds no global flags.
    flags.DEFINE_string("input", None, "Glob of webdataset .tar shards, a folder, or a CSV/TSV.")
    flags.DEFINE_string("output", None, "Directory for the .arrayrecord shards and index.json.")
    flags.DEFINE_integer("max_side", 0, "Shrink images whose longer side exceeds this; 0 keeps.")
    flags.DEFINE_integer("records_per_shard", 10_000, "CSV input: records per output shard.")
    flags.DEFINE_integer("workers", 1, "Processes converting shards in parallel.")
    flags.DEFINE_string("image_column", None, "CSV input: image column (image, filepath).")
    flags.DEFINE_string("caption_column", None, "CSV input: caption column (caption, title, text).")
    flags.mark_flags_as_required(["input", "output"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        index = convert(
            FLAGS.input,
            FLAGS.output,
            max_side=FLAGS.max_side,
            records_per_shard=FLAGS.records_per_shard,
            workers=FLAGS.workers,
            image_column=FLAGS.image_column,
            caption_column=FLAGS.caption_column,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(
        f"{index['records']} records in {len(index['shards'])} shards "
        f"({index['skipped']} skipped) in {FLAGS.output}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
