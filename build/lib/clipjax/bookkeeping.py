"""The host's side of the training loop, one step behind the device.

The trainer dispatches step t, then reads the few flags of step t-1 (non-finite, skipped
records, a stop signal, a timed save due), which are done or nearly: the device always has a
step queued, and the host never waits for the step it has just dispatched. Every decision
comes from flags that are totals over the global batch, so every process takes it at the
same step. Metrics other than the flags are fetched only for the rows that are logged.
"""

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

# The step metrics the host reads on every step; they decide for every process.
FLAGS = ("train/nonfinite", "data/skipped", "control/stop", "control/save")


@contextlib.contextmanager
def stop_signals():
    """While inside, SIGTERM and SIGINT only record their number in the yielded dict (`signal`);
    a second one acts as it would have. Signals reach only the main thread."""
    received = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def record(signum, frame):
        del frame
        received["signal"] = signum
        signal.signal(signum, previous[signum])

    for signum in previous:
        signal.signal(signum, record)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class Finished:
    """A step whose flags the host has read."""

    step: int
    metrics: dict  # its other metrics, still on the device until `Bookkeeper.row`
    nonfinite_run: int  # steps in a row, up to this one, whose update was not applied
    diverged: bool  # that run reached config.max_nonfinite_steps
    counts: tuple[int, int]  # skipped records and non-finite steps, in all, up to this one


class Bookkeeper:
    """Skipped records, runs of non-finite steps, signals and timed saves, from each step's
    flags, read one step late (see the module docstring).

    `signals` is the dict of `stop_signals`; `clock` gives seconds (time.monotonic)."""

    def __init__(
        self,
        *,
        max_nonfinite_steps: int,
        ckpt_every_secs: float,
        signals: dict,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._max_nonfinite, self._every_secs = max_nonfinite_steps, ckpt_every_secs
        self._signals, self._clock = signals, clock
        self._pending: tuple[int, dict] | None = None  # the dispatched step not read yet
        self._nonfinite_run = 0
        self._counts = (0, 0)  # skipped records and non-finite steps read, in all
        self._counts_logged = (0, 0)  # ... up to the last logged row
        self._last_save_time, self._last_save_step = clock(), -1
        self.stop_requested = False  # a finished step carried a stop signal of any process
        self.save_requested = False  # ... or a timed save due after the last save

    @property
    def signal(self) -> int:
        """The signal that stops the run: this process's, or SIGTERM for another's."""
        return self._signals["signal"] or signal.SIGTERM

    def control(self, rows: int) -> np.ndarray:
        """int32 (rows, 2) for the next step's batch: a stop signal was received; a timed save
        is due (`config.ckpt_every_secs` passed since the last save)."""
        due = bool(self._every_secs) and self._clock() - self._last_save_time >= self._every_secs
        return np.tile(np.array([self._signals["signal"] is not None, due], np.int32), (rows, 1))

    def dispatched(self, step: int, metrics: dict, *, wait: bool = False) -> list[Finished]:
        """Take step `step`'s metrics (device arrays) and read the flags of the step dispatched
        before it. This step's are read too where the host is about to wait for it anyway:
        with `wait` (an evaluation, a save, the last step), or when the flags read ask for a
        save or a stop. Returns the steps read, in order."""
        previous, self._pending = self._pending, (step, metrics)
        finished = [self._finish(*previous)] if previous else []
        if wait or self.save_requested or self.stop_requested:
            finished.append(self._finish(*self._pending))
            self._pending = None
        return finished

    def _finish(self, step: int, metrics: dict) -> Finished:
        metrics = dict(metrics)
        flags = jax.device_get({k: metrics.pop(k) for k in FLAGS if k in metrics})
        nonfinite = bool(flags.get("train/nonfinite", 0))
        skipped = int(flags.get("data/skipped", 0))
        self._counts = (self._counts[0] + skipped, self._counts[1] + nonfinite)
        self._nonfinite_run = self._nonfinite_run + 1 if nonfinite else 0
        self.stop_requested |= bool(flags.get("control/stop", 0))
        # A request made before the last save was served by it.
        self.save_requested |= bool(flags.get("control/save", 0)) and step > self._last_save_step
        diverged = self._nonfinite_run >= self._max_nonfinite
        return Finished(step, metrics, self._nonfinite_run, diverged, self._counts)

    def row(self, finished: Finished) -> dict:
        """The logged row of a finished step: its metrics fetched, with the skipped records and
        non-finite steps counted since the previous row."""
        row = jax.device_get(finished.metrics)
        since = [now - then for now, then in zip(finished.counts, self._counts_logged, strict=True)]
        row["data/skipped"], row["train/nonfinite_steps"] = since
        self._counts_logged = finished.counts
        return row

    def saved(self, step: int) -> None:
        """A checkpoint of `step` was started: the timed-save clock restarts."""
        self._last_save_time, self._last_save_step = self._clock(), step
        self.save_requested = False
