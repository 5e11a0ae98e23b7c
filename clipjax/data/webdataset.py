"""webdataset tar shards, as img2dataset writes them: their records (`tar_records`), and the
`webdataset:GLOB` training source streamed from them (`WebDatasetSource`, `ShardStream`).

A shard is a tar whose members sharing a key (the member name up to the first '.' of its base
name) form one record: an image (`.jpg`, `.jpeg`, `.png`, `.webp`) and its caption (`.txt`, or
the "caption" of a `.json`). Shards are read in one pass through the path layer, so a bucket
(`gs://`, `s3://`) is read as it streams, and never seeked.

The stream (`ShardStream`): the R readers (processes × Grain workers per process) split each
epoch's shards, which are shuffled anew every epoch from the seed; reader r takes shards r,
r + R, r + 2R, ... of that order. Each reader shuffles its records in blocks of `buffer`:
it reads a block, permutes it with a generator seeded by (seed, reader, block number), and
hands it out. Its position is the block's first record (epoch, shard, record), the block's
number and how much of it was handed out, so restoring reads that block again and skips the
part handed out: the batches after a resume equal those of an uninterrupted run.
"""

import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterator

import grain
import numpy as np
from absl import logging

from clipjax import paths
from clipjax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_BUFFER = 5000  # records per shuffled block, per reader
_FINGERPRINT_SHARDS = 16  # shards whose sizes the fingerprint reads


class DamagedShard(Exception):
    """A tar that ends early or does not parse, after `records` good records."""

    def __init__(self, path: str, records: int, reason: str):
        super().__init__(f"{path} is damaged after {records} records ({reason})")
        self.path, self.records, self.reason = path, records, reason


def _record(key: str, members: dict) -> dict:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members.get("txt")
    if caption is None and "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
    return {"key": key, "image": image, "caption": caption}


def tar_records(path: str, skip: int = 0) -> Iterator[dict]:
    """The raw records (`key`, `image` bytes or None, `caption` or None) of the tar at `path`
    (local or remote; gzip or not), in their order in it, after the first `skip`. Raises
    `DamagedShard` where the tar stops parsing or ends early, after yielding the records
    before it (the one being read there, perhaps incomplete, is dropped)."""
    key, members, count = None, {}, 0
    try:
        with paths.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                extension = extension.lower()
                if extension not in (*IMAGE_EXTENSIONS, "txt", "json"):
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key and members:
                    if count >= skip:
                        yield _record(key, members)
                    count += 1
                    members = {}
                key = member_key
                members[extension] = tar.extractfile(member).read()
            # tarfile ends quietly at a cut header; a whole tar ends with zero blocks, of
            # which the last header read took one whole (`fileobj.pos`: bytes it read).
            if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("it ends without the end-of-archive blocks")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DamagedShard(path, count, str(e) or type(e).__name__) from None
    if members and count >= skip:
        yield _record(key, members)


class WebDatasetSource:
    """`webdataset:GLOB`: tar shards read as streams; a training source only. `shards`, sorted;
    `buffer`, the records each reader shuffles together."""

    class_names = None
    prompt_templates = None

    def __init__(self, spec: str, shards: list[str], buffer: int):
        self.spec, self.shards, self.buffer = spec, shards, buffer

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.spec!r}, shards={len(self.shards)})"

    def records(self) -> Iterator[dict]:
        """Every record of every shard, in order (a damaged shard's good records, then the
        next shard)."""
        for shard in self.shards:
            try:
                yield from tar_records(shard)
            except DamagedShard as e:
                logging.warning("Skipped the rest of a webdataset shard: %s.", e)

    def captions(self, num: int) -> Iterator[str]:
        return records.first_usable((record["caption"] for record in self.records()), num)

    def fingerprint(self) -> dict:
        """`{"shards": their number, "sample": a hash of every shard's name and the sizes of
        _FINGERPRINT_SHARDS of them, evenly spaced}`: the listing, not the contents, so that
        it costs a few requests however large the set."""
        digest = hashlib.sha256("\n".join(self.shards).encode())
        count = len(self.shards)
        for index in sorted(set(np.linspace(0, count - 1, _FINGERPRINT_SHARDS).astype(int))):
            digest.update(str(paths.path(self.shards[index]).stat().length).encode())
        return {"shards": count, "sample": digest.hexdigest()[:16]}


class ShardStream(grain.IterDataset):
    """The raw records of process `reader` of `readers`, endless (see the module docstring).
    Grain's worker processes slice it in place (`set_slice`): worker w of W is reader
    `reader * W + w` of `readers * W`. A reader needs a shard (`pipeline.train_dataset`
    checks)."""

    def __init__(self, source: WebDatasetSource, seed: int, reader: int, readers: int):
        super().__init__()
        self._source, self._seed = source, seed
        self._reader, self._readers = reader, readers
        self._worker, self._workers = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self._worker, self._workers = sl.start or 0, sl.step or 1

    def __iter__(self) -> "_ShardStreamIterator":
        reader = self._reader * self._workers + self._worker
        return _ShardStreamIterator(self._source, self._seed, reader, self._readers * self._workers)

    def __str__(self) -> str:
        return f"ShardStream({self._source.spec!r}, reader={self._reader}/{self._readers})"


class _ShardStreamIterator(grain.DatasetIterator):
    def __init__(self, source: WebDatasetSource, seed: int, reader: int, readers: int):
        super().__init__()
        self._source, self._seed = source, seed
        self._reader, self._readers = reader, readers
        # The current block: where it began reading, its number, how much was handed out.
        self._start, self._block, self._offset = (0, 0, 0), 0, 0
        self._records, self._next = None, None  # the block's records; where reading goes on
        self._reading = None  # (position, generator) reading on from that position
        self._damaged = set()  # shards already named in a warning

    def _shards(self, epoch: int) -> list[str]:
        """This reader's shards in `epoch`, in the order it reads them."""
        shards = self._source.shards
        order = np.random.default_rng([self._seed, epoch]).permutation(len(shards))
        return [shards[i] for i in order[self._reader :: self._readers]]

    def _read_from(self, position: tuple) -> Iterator[tuple[dict, tuple]]:
        """(record, the position after it) from `position` = (epoch, shard, record) to the end
        of that epoch's shards."""
        epoch, shard, record = position
        mine = self._shards(epoch)
        for index in range(shard, len(mine)):
            count = record if index == shard else 0
            try:
                for raw in tar_records(mine[index], skip=count):
                    count += 1
                    yield {**raw, "key": f"{mine[index]}:{raw['key']}"}, (epoch, index, count)
            except DamagedShard as e:
                if mine[index] not in self._damaged:
                    self._damaged.add(mine[index])
                    logging.warning("Skipped the rest of a webdataset shard: %s.", e)

    def _fill(self) -> None:
        """Reads the block that starts at `self._start`, up to `buffer` records and never past
        its epoch, and shuffles it."""
        block, position = [], self._start
        while len(block) < self._source.buffer:
            if self._reading is None or self._reading[0] != position:
                self._reading = (position, self._read_from(position))
            item = next(self._reading[1], None)
            if item is None:  # the epoch's shards are read
                if position[1:] == (0, 0):
                    raise ValueError(
                        f"source {self._source.spec!r}: reader {self._reader} of "
                        f"{self._readers} found no records in its shards of epoch "
                        f"{position[0]}; check that the tar files hold webdataset records."
                    )
                position, self._reading = (position[0] + 1, 0, 0), None
                if block:
                    break
                self._start = position  # a block that found its epoch read begins the next
                continue
            raw, position = item
            block.append(raw)
            self._reading = (position, self._reading[1])
        seed = [self._seed, self._reader, self._readers, self._block]
        order = np.random.default_rng(seed).permutation(len(block))
        self._records, self._next = [block[i] for i in order], position

    def __next__(self) -> dict:
        if self._records is None:
            self._fill()
        if self._offset == len(self._records):
            self._start, self._block, self._offset = self._next, self._block + 1, 0
            self._fill()
        self._offset += 1
        return self._records[self._offset - 1]

    def get_state(self) -> dict:
        epoch, shard, record = self._start
        return {
            "epoch": epoch,
            "shard": shard,
            "record": record,
            "block": self._block,
            "offset": self._offset,
            "readers": self._readers,
        }

    def set_state(self, state: dict) -> None:
        if state["readers"] != self._readers:
            raise ValueError(
                f"source {self._source.spec!r}: the saved position was read by "
                f"{state['readers']} readers (processes × config.data.num_workers), this run "
                f"has {self._readers}; resume with the same numbers, or start a new --workdir."
            )
        self._start = (state["epoch"], state["shard"], state["record"])
        self._block, self._offset = state["block"], state["offset"]
        self._records, self._reading = None, None
