"""data.prefetch.DevicePrefetch: batches placed ahead, the position of the batch handed out."""

import grain
import numpy as np
import pytest

from clipjax.data.prefetch import DevicePrefetch


def _batches():
    return iter(grain.MapDataset.range(20).batch(2).to_iter_dataset())


@pytest.mark.parametrize("size", [0, 1, 2])
def test_same_batches_placed_ahead(size):
    placed = []

    def place(batch):
        placed.append(int(batch[0]))
        return batch * 10

    prefetch = DevicePrefetch(_batches(), place, size)
    for k in range(1, 4):
        np.testing.assert_array_equal(next(prefetch), [20 * (k - 1), 20 * (k - 1) + 10])
        assert len(placed) == k + size  # the next `size` are on their way
    assert placed == list(range(0, 2 * (3 + size), 2))


def test_state_is_the_position_after_the_batch_handed_out():
    plain, prefetch = _batches(), DevicePrefetch(_batches(), lambda b: b, 2)
    assert prefetch.get_state() == plain.get_state()
    for _ in range(3):
        next(plain), next(prefetch)
        assert prefetch.get_state() == plain.get_state()
    state = prefetch.get_state()
    want = [next(prefetch) for _ in range(4)]
    resumed = DevicePrefetch(_batches(), lambda b: b, 2)
    resumed.set_state(state)
    for expected in want:
        np.testing.assert_array_equal(next(resumed), expected)
    restarted = DevicePrefetch(_batches(), lambda b: b, 2)
    next(restarted)
    restarted.set_state(state)  # drops what it had placed ahead
    np.testing.assert_array_equal(next(restarted), want[0])


def test_a_finite_iterator_ends_after_its_last_batch():
    prefetch = DevicePrefetch(_batches(), lambda b: b, 2)
    assert len(list(prefetch)) == 10


def test_negative_size_is_one_line():
    with pytest.raises(ValueError, match=r"config.data.device_prefetch=-1 must be at least 0."):
        DevicePrefetch(_batches(), lambda b: b, -1)
