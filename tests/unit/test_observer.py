"""The observer's schedules and what they promise (pure)."""

import math

import pytest

from dynamem.errors import UserError
from dynamem.observer import (
    ADAPTIVE,
    DENSE,
    MINIMAL,
    OBSERVERS,
    Backoff,
    bound_target,
    named,
)


def test_interval_is_a_share_of_elapsed_between_floor_and_cap():
    b = Backoff(0.002, 0.050, 0.01)
    assert b.interval(0.0) == 0.002
    assert b.interval(0.1) == 0.002  # 1% of 100 ms is below the floor
    assert b.interval(1.0) == pytest.approx(0.010)
    assert b.interval(4.0) == pytest.approx(0.040)
    assert b.interval(60.0) == 0.050


def test_looks_grow_logarithmically_with_the_duration():
    b = Backoff(0.002, 0.050, 0.01)
    # 100 looks at the floor up to 0.2 s, then about 100 * ln(T / 0.2) more, until the cap
    for duration in (1.0, 4.0):
        expected = 100 + 100 * math.log(duration / 0.2)
        assert abs(len(b.times(duration)) - expected) < 0.03 * expected
    assert len(b.times(0.1)) in (50, 51)  # 0, 2, ..., 100 ms, give or take rounding
    times = b.times(30.0)
    gaps = [t2 - t1 for t1, t2 in zip(times, times[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.002) and max(gaps) == pytest.approx(0.050)
    # every gap is at most 1% of the time elapsed at its start, or the floor
    assert all(g <= max(0.002, 0.01 * t) + 1e-12 for t, g in zip(times, gaps, strict=False))


def test_a_fixed_rate_is_a_backoff_without_share():
    assert DENSE.checks.times(0.01) == pytest.approx([0, 0.002, 0.004, 0.006, 0.008, 0.010])


def test_sampler_arguments_are_floor_cap_in_ns_and_share_in_ppm():
    assert Backoff(0.002, 0.05, 0.01).sampler_args() == "2000000 50000000 10000"
    assert Backoff(0.02, 0.02).sampler_args() == "20000000 20000000 0"


@pytest.mark.parametrize("floor,cap,share", [(0, 1, 0), (0.01, 0.005, 0), (0.01, 0.01, -1)])
def test_impossible_schedules_are_refused(floor, cap, share):
    with pytest.raises(ValueError):
        Backoff(floor, cap, share)


def test_settings_by_name_and_unknown_names():
    assert named("adaptive") is ADAPTIVE and named(MINIMAL) is MINIMAL
    assert set(OBSERVERS) == {"adaptive", "minimal", "dense", "sparse"}
    with pytest.raises(UserError, match="choose from adaptive, minimal, dense, sparse"):
        named("quiet")


def test_the_control_arm_does_not_watch_while_the_request_is_in_flight():
    assert not MINIMAL.watch_during and ADAPTIVE.watch_during
    assert MINIMAL.host_poll == ADAPTIVE.host_poll  # it differs in the guest only
    assert ADAPTIVE.describe()["checks"] == {"floor_s": 0.002, "cap_s": 0.05, "fraction": 0.01}


def test_bound_target_is_5ms_or_1_percent():
    assert bound_target(0.1) == 0.005
    assert bound_target(2.0) == pytest.approx(0.02)


def test_the_adaptive_setting_has_a_budget_below_the_promise_and_dense_has_none():
    assert 0 < ADAPTIVE.cpu_budget < 0.05 and DENSE.cpu_budget == 0
    assert MINIMAL.cpu_budget == ADAPTIVE.cpu_budget  # what it does after the outcome
