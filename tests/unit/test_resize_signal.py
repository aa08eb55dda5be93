import numpy as np

from dynamem.channel import BASE_COLUMNS, Sample
from dynamem.mechanisms import Balloon, VirtioMem
from dynamem.resize import completion_index, guest_signal


def test_completion_is_the_first_sample_that_stays_final():
    signal = np.array([5, 5, 5, 6, 7, 8, 8, 8])
    assert completion_index(signal, 2) == 5


def test_a_transient_excursion_is_not_completion():
    signal = np.array([5, 5, 8, 6, 8, 8])
    assert completion_index(signal, 1) == 4


def test_nothing_changed_gives_no_completion():
    assert completion_index(np.array([5, 5, 5, 5]), 2) is None
    assert completion_index(np.array([], dtype=np.int64), 0) is None


def test_already_final_at_the_first_sample_after_the_request():
    assert completion_index(np.array([5, 8, 8]), 1) == 1


def samples(rows):
    return [Sample(i * 1000, i, i * 1000, tuple(r)) for i, r in enumerate(rows)]


def test_guest_signal_memtotal_in_bytes():
    s = samples([(1000, 1, 0), (1128, 1, 0)])
    assert list(guest_signal(VirtioMem(), BASE_COLUMNS, s)) == [1000 * 1024, 1128 * 1024]


def test_guest_signal_balloon_pages_with_deflate_on_oom():
    columns = BASE_COLUMNS + ("balloon_inflate", "balloon_deflate")
    s = samples([(1000, 1, 0, 0, 0), (1000, 1, 0, 300, 44)])
    assert list(guest_signal(Balloon(deflate_on_oom=True), columns, s)) == [0, 256 * 4096]
