"""The host's bookkeeping of the loop: flags read one step late, runs of non-finite steps,
stop signals and timed saves."""

import signal

import jax.numpy as jnp
import numpy as np

from clipjax.bookkeeping import Bookkeeper


def _metrics(nonfinite=0, skipped=0, stop=0, save=0, loss=1.0):
    return {
        "train/loss": jnp.float32(loss),
        "train/nonfinite": jnp.int32(nonfinite),
        "data/skipped": jnp.int32(skipped),
        "control/stop": jnp.int32(stop),
        "control/save": jnp.int32(save),
    }


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _book(max_nonfinite=3, every_secs=0.0, signals=None, clock=None):
    return Bookkeeper(
        max_nonfinite_steps=max_nonfinite,
        ckpt_every_secs=every_secs,
        signals={"signal": None} if signals is None else signals,
        clock=clock or Clock(),
    )


def test_each_step_is_read_once_the_next_is_dispatched():
    book = _book()
    assert book.dispatched(1, _metrics()) == []
    assert [f.step for f in book.dispatched(2, _metrics())] == [1]
    assert [f.step for f in book.dispatched(3, _metrics(), wait=True)] == [2, 3]
    assert [f.step for f in book.dispatched(4, _metrics())] == []  # 3 was read already
    finished = book.dispatched(5, _metrics())
    assert [f.step for f in finished] == [4]
    assert set(finished[0].metrics) == {"train/loss"}  # the flags are the host's


def test_runs_of_nonfinite_steps_and_the_counts_of_each_row():
    book = _book(max_nonfinite=3)
    flags = [(1, 2), (1, 0), (0, 5), (1, 0), (1, 1), (1, 0)]  # (non-finite, skipped)
    finished = [
        f
        for step, (nonfinite, skipped) in enumerate(flags, 1)
        for f in book.dispatched(step, _metrics(nonfinite, skipped), wait=step == len(flags))
    ]
    assert [(f.step, f.nonfinite_run, f.diverged) for f in finished] == [
        (1, 1, False),
        (2, 2, False),
        (3, 0, False),
        (4, 1, False),
        (5, 2, False),
        (6, 3, True),
    ]
    # Each row counts up to its own step, however many steps were read since.
    row = book.row(finished[2])
    assert row == {"train/loss": 1.0, "data/skipped": 7, "train/nonfinite_steps": 2}
    row = book.row(finished[5])  # counted since the previous row
    assert (row["data/skipped"], row["train/nonfinite_steps"]) == (1, 3)


def test_a_stop_signal_is_sent_and_read_back_a_step_later():
    signals = {"signal": None}
    book = _book(signals=signals)
    np.testing.assert_array_equal(book.control(2), [[0, 0], [0, 0]])
    book.dispatched(1, _metrics())
    signals["signal"] = signal.SIGINT
    np.testing.assert_array_equal(book.control(1), [[1, 0]])
    book.dispatched(2, _metrics(stop=1))
    assert not book.stop_requested  # step 2's flags are not read yet
    finished = book.dispatched(3, _metrics(stop=1))
    # Stopping: the host waits for step 3 too, so that its row and checkpoint agree.
    assert [f.step for f in finished] == [2, 3] and book.stop_requested
    assert book.signal == signal.SIGINT


def test_another_processs_signal_stops_this_one_with_sigterm():
    book = _book()
    book.dispatched(1, _metrics(stop=1))
    book.dispatched(2, _metrics())
    assert book.stop_requested and book.signal == signal.SIGTERM


def test_timed_saves_are_due_on_the_clock_and_served_once():
    clock = Clock()
    book = _book(every_secs=10.0, clock=clock)
    assert book.control(1)[0, 1] == 0
    clock.now = 10.0
    assert book.control(1)[0, 1] == 1
    book.dispatched(1, _metrics(save=1))
    finished = book.dispatched(2, _metrics(save=1))  # sent before step 1's request was read
    assert [f.step for f in finished] == [1, 2] and book.save_requested
    book.saved(2)
    assert not book.save_requested and book.control(1)[0, 1] == 0
    book.dispatched(3, _metrics())
    book.dispatched(4, _metrics())
    assert not book.save_requested
    # A request of a step before the last save was served by it.
    book.saved(5)
    book.dispatched(5, _metrics(save=1), wait=True)
    assert not book.save_requested


def test_no_timed_saves_without_ckpt_every_secs():
    clock = Clock()
    book = _book(every_secs=0.0, clock=clock)
    clock.now = 1e9
    assert book.control(1)[0, 1] == 0
