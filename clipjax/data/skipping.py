"""Bad records in the input: markers that stand in for them, batches regrouped without them, and
the check that too many were bad. Shared by the training stream (`pipeline`) and evaluation's
arrays (`eval_input`)."""

import dataclasses

import grain
import numpy as np
from absl import logging

# How many skipped records are named in logs and in the threshold error.
NAMED_SKIPS = 5
# The skipped fraction is judged once this many records (or the whole source) were read.
MIN_ATTEMPTED = 1000


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the stream for a record that `records.decode` rejected."""

    key: str
    reason: str


def check_skipped(
    spec: str, attempted: int, skipped: int, named: list, size: int, max_fraction: float
) -> None:
    """ValueError if more than `max_fraction` of the records were bad, once `attempted` reaches
    min(1000, size). `named` holds (key, reason) of the first skipped records."""
    if attempted < min(MIN_ATTEMPTED, size) or skipped <= max_fraction * attempted:
        return
    first = ", ".join(f"{key} ({reason})" for key, reason in named)
    first += ", ..." if skipped > len(named) else "."
    raise ValueError(
        f"source {spec!r}: skipped {skipped} of {attempted} records "
        f"({100 * skipped / attempted:.1f}%), more than config.data.max_skipped_fraction="
        f"{max_fraction}. First skipped: {first} Fix or remove those records, or raise "
        "config.data.max_skipped_fraction."
    )


def chunk(elements: list) -> dict:
    """`MapDataset.batch`'s batch_fn: the good elements stacked (`examples`), and the bad ones
    counted: `skipped` int32 (n_good,), the markers just before each good element; `trailing`,
    those after the last one; `bad`, every marker's (key, reason); `size`, all elements."""
    good, skipped, bad, run = [], [], [], 0
    for element in elements:
        if isinstance(element, Skipped):
            bad.append((element.key, element.reason))
            run += 1
        else:
            good.append(element)
            skipped.append(run)
            run = 0
    examples = {key: np.stack([g[key] for g in good]) for key in good[0]} if good else {}
    return {
        "examples": examples,
        "skipped": np.array(skipped, np.int32),
        "trailing": run,
        "bad": bad,
        "size": len(elements),
    }


class DropSkipped(grain.IterDataset):
    """Chunks (see `chunk`) -> batches of exactly `batch_size` good examples, each with
    `skipped` int32 (batch_size,): the bad records dropped just before it. Logs the first bad
    records, and raises the `check_skipped` ValueError when too many are bad.

    Work stays in whole chunks up to here (Grain's per-element overhead is a large part of a
    small image's cost); when no record is bad, a chunk is passed on as the batch. The
    iterator's state is its parent's state before the current chunk, the examples of that chunk
    already used, and the counts before it: restoring re-reads the chunk."""

    def __init__(self, parent, batch_size: int, spec: str, size: int, max_fraction: float):
        super().__init__(parent)
        self._args = (batch_size, spec, size, max_fraction)

    def __iter__(self) -> "DropSkippedIterator":
        return DropSkippedIterator(self._parent.__iter__(), *self._args)


class DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, spec: str, size: int, max_fraction: float):
        super().__init__(parent)
        self._batch_size, self._spec = batch_size, spec
        self._size, self._max_fraction = size, max_fraction
        # Counts over the chunks read; `pending`: bad records after the last good one.
        self._counts = {"attempted": 0, "skipped": 0, "named": [], "pending": 0}
        self._before = None  # (parent state, counts) before the current chunk
        self._examples, self._skipped, self._offset = {}, np.zeros(0, np.int32), 0

    def _read_chunk(self) -> None:
        counts = self._counts
        self._before = (self._parent.get_state(), {**counts, "named": list(counts["named"])})
        chunk = next(self._parent)
        counts["attempted"] += chunk["size"]
        counts["skipped"] += len(chunk["bad"])
        for key, reason in chunk["bad"]:
            if len(counts["named"]) < NAMED_SKIPS and key not in (k for k, _ in counts["named"]):
                counts["named"].append([key, reason])
                logging.warning("Skipped a bad record of %s: %s (%s).", self._spec, key, reason)
        skipped = chunk["skipped"]
        if len(skipped):
            skipped[0] += counts["pending"]
            counts["pending"] = chunk["trailing"]
        else:
            counts["pending"] += chunk["trailing"]
        check_skipped(
            self._spec,
            counts["attempted"],
            counts["skipped"],
            counts["named"],
            self._size,
            self._max_fraction,
        )
        self._examples, self._skipped, self._offset = chunk["examples"], skipped, 0

    def __next__(self) -> dict:
        parts, need = [], self._batch_size  # (examples, skipped, start, stop)
        while need:
            if self._offset == len(self._skipped):
                self._read_chunk()
                continue
            take = min(need, len(self._skipped) - self._offset)
            parts.append((self._examples, self._skipped, self._offset, self._offset + take))
            self._offset += take
            need -= take
        if len(parts) == 1 and parts[0][2] == 0 and parts[0][3] == len(parts[0][1]):
            return {**parts[0][0], "skipped": parts[0][1]}  # a whole chunk: no copies
        batch = {
            key: np.concatenate([examples[key][a:b] for examples, _, a, b in parts])
            for key in parts[0][0]
        }
        batch["skipped"] = np.concatenate([skipped[a:b] for _, skipped, a, b in parts])
        return batch

    def get_state(self) -> dict:
        if self._before is None:  # no chunk read yet
            return {"parent": self._parent.get_state(), "offset": 0, **self._counts}
        parent, counts = self._before
        return {"parent": parent, "offset": self._offset, **counts}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {key: state[key] for key in ("attempted", "skipped", "pending")}
        self._counts["named"] = [list(n) for n in state["named"]]
        self._before, self._examples, self._skipped = None, {}, np.zeros(0, np.int32)
        self._offset = 0
        if state["offset"]:
            self._read_chunk()
            self._offset = state["offset"]
