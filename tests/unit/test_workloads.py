"""What the impact probe's log says about one resize window (pure)."""

import numpy as np
import pytest

from dynamem.workloads import impact_during

MS = 1_000_000


def log(times_ms, rate_per_ms=10):
    t = np.array(times_ms, dtype=np.int64) * MS
    return {"impact_guest_ns": t, "impact_pages": (t // MS) * rate_per_ms}


def test_a_stall_inside_the_window_is_measured():
    times = [*range(0, 1200, 10), 1300, *range(1310, 2000, 10)]  # 1190 -> 1300 stalled
    out = impact_during(log(times), 0, 1100 * MS, 1500 * MS)
    assert out.longest_stall_ms == pytest.approx(110)


def test_a_stall_crossing_the_window_edges_counts_whole():
    # The probe stalls from 950 ms to 1250 ms; the resize runs from 1000 ms to 1100 ms.
    times = [*range(0, 960, 10), 1250, *range(1260, 2000, 10)]
    out = impact_during(log(times), 0, 1000 * MS, 1100 * MS)
    assert out.longest_stall_ms == pytest.approx(300)  # not cut at the edges, not lost


def test_a_stall_covering_the_whole_window_is_measured_not_dropped():
    # No log line at all inside the window: the old code returned no stall (None).
    times = [*range(0, 910, 10), 1500, *range(1510, 2000, 10)]
    out = impact_during(log(times), 0, 1000 * MS, 1200 * MS)
    assert out.longest_stall_ms == pytest.approx(600)
    assert out.throughput_during_pps is not None


def test_a_log_that_stops_inside_the_window_is_a_stall_until_its_end():
    out = impact_during(log(range(0, 1050, 10)), 0, 1000 * MS, 1500 * MS)
    assert out.longest_stall_ms == pytest.approx(460)


def test_throughput_and_slowdown_and_the_clock_offset():
    times = list(range(0, 3000, 10))
    pages = np.array(times) * 10
    pages[150:] += 0  # same rate throughout
    offset = 5_000 * MS  # host = guest + 5 s
    out = impact_during(
        {"impact_guest_ns": np.array(times) * MS, "impact_pages": pages},
        offset, offset + 1500 * MS, offset + 2000 * MS,
    )  # fmt: skip
    assert out.throughput_before_pps == pytest.approx(10_000)
    assert out.slowdown == pytest.approx(1.0)
    assert out.longest_stall_ms == pytest.approx(10)
    assert impact_during(log([0]), 0, 0, 10) is None
