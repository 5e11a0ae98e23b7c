"""Batches placed on the devices ahead of the step that uses them.

`DevicePrefetch` keeps the next `size` batches of a host iterator already transferred (by
`place`, e.g. `sharding.to_global`), so the transfer of batch t+1 overlaps step t. Its state is
the wrapped iterator's position after the last batch handed out, never after those it holds
ahead: a checkpoint taken after step t resumes on batch t+1.
"""

import collections
from collections.abc import Callable

import grain


class DevicePrefetch(grain.DatasetIterator):
    """`place(batch)` for each batch of `iterator`, `size` of them ahead (0: none ahead).

    `iterator` must have `get_state` and `set_state` (a Grain iterator); `close` closes it."""

    def __init__(self, iterator, place: Callable, size: int = 2):
        super().__init__()
        self._iterator, self._place, self._size = iterator, place, size
        self._ahead = collections.deque()  # (placed batch, the iterator's state after it)
        if size < 0:
            raise ValueError(f"config.data.device_prefetch={size} must be at least 0.")
        self._state = iterator.get_state()

    def _fill(self, count: int) -> None:
        """Place batches until `count` are ahead, or the iterator ends."""
        while len(self._ahead) < count:
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            self._ahead.append((self._place(batch), self._iterator.get_state()))

    def __next__(self):
        self._fill(1)
        if not self._ahead:
            raise StopIteration
        batch, self._state = self._ahead.popleft()
        self._fill(self._size)  # transfers start now, while the caller's step runs
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._ahead.clear()
        self._iterator.set_state(state)
        self._state = state

    def close(self) -> None:
        self._ahead.clear()
        if hasattr(self._iterator, "close"):
            self._iterator.close()
