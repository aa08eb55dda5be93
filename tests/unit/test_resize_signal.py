import json
from pathlib import Path

import numpy as np
import pytest

from dynamem.channel import BASE_COLUMNS, Calibration, Sample
from dynamem.mechanisms import Balloon, VirtioMem
from dynamem.resize import (
    Instant,
    ResizeResult,
    _guest_view,
    completion_index,
    first_change_index,
    guest_signal,
    late_bound,
    settle_state,
)


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


FIXTURES = Path(__file__).parents[1] / "fixtures"

# -- when the watch may end (issue 12, item 8) ------------------------------------------------

MS = 1_000_000


def same(*ms):
    """Instants where the guest's clock runs with the host's (wall-clock TCG, KVM)."""
    return [Instant(m * MS, m * MS) for m in ms]


def test_a_guest_that_has_not_reacted_yet_has_not_settled():
    """A DIMM grow is done for QEMU at device_add; a guest slow to start onlining shows no
    change for a while. Counting quiet from before the request judged it settled."""
    signal = np.array([100, 100, 100])
    looks = same(0, 10, 20)
    (outcome,) = same(5)
    assert not settle_state(signal, looks, *same(900), outcome, settle_s=0.5, reaction_s=5.0)
    assert settle_state(signal, looks, *same(5_006), outcome, settle_s=0.5, reaction_s=5.0)


def test_quiet_counts_from_the_last_change_once_the_guest_reacted():
    signal = np.array([100, 100, 120, 140, 140])
    looks = same(0, 10, 1_000, 1_200, 1_300)
    (outcome,) = same(5)
    assert not settle_state(signal, looks, *same(1_600), outcome, 0.5, 5.0)
    assert settle_state(signal, looks, *same(1_701), outcome, 0.5, 5.0)


def test_without_an_expected_change_the_watch_ends_a_quiet_period_after_the_outcome():
    signal = np.array([100, 100])
    looks = same(0, 10)
    (outcome,) = same(0)
    assert not settle_state(signal, looks, *same(400), outcome, settle_s=0.5, reaction_s=0.0)
    assert settle_state(signal, looks, *same(501), outcome, settle_s=0.5, reaction_s=0.0)


def test_quiet_must_last_on_the_guests_clock_too():
    """icount, busy guest: 2 s of host time after the last change were 100 ms of guest time,
    not enough for a virtio-mem grow's second block to be added and onlined."""
    signal = np.array([100, 100, 228])
    looks = [Instant(0, 0), Instant(10 * MS, 1 * MS), Instant(500 * MS, 25 * MS)]
    outcome = Instant(400 * MS, 20 * MS)
    assert not settle_state(signal, looks, Instant(2_500 * MS, 125 * MS), outcome, 0.5, 5.0)
    assert settle_state(signal, looks, Instant(11_000 * MS, 526 * MS), outcome, 0.5, 5.0)
    # an idle guest's clock jumps ahead in icount mode: then the host's binds
    assert not settle_state(signal, looks, Instant(900 * MS, 9_000 * MS), outcome, 0.5, 5.0)


def test_first_change_is_against_the_baseline():
    assert first_change_index(np.array([5, 5, 7, 5])) == 2
    assert first_change_index(np.array([5, 5])) is None
    assert first_change_index(np.array([], dtype=np.int64)) is None


# -- how late a guest-visible stamp can be (issue 12, item 10) --------------------------------


def sparse(rows):
    """Sampler lines as an on-change observer sends them: (arrival, look, guest_ns,
    prev_guest_ns, cause, totalram_kB)."""
    return [Sample(a, k, g, (kb, 1, 0), p, c) for a, k, g, p, c, kb in rows]


def test_the_bound_is_the_gap_between_looks_on_the_guest_clock_plus_a_round_trip():
    # baseline look, then silence (looks that changed nothing are not sent), then the
    # look after a memory-block uevent shows the new MemTotal.
    samples = sparse(
        [
            (1_000 * MS, 1, 500 * MS, 500 * MS, 2, 1_000_000),
            (1_480 * MS, 40, 980 * MS, 972 * MS, 1, 1_131_072),
        ]
    )
    res = ResizeResult("virtio-mem", "sbm", "grow", 128 << 20, t_request_ns=1_010 * MS)
    cal = Calibration(0.001, 0.003, 0.004, 20)
    _guest_view(VirtioMem(), BASE_COLUMNS, samples, res, cal, timed=True)
    assert res.guest_latency_s == pytest.approx(0.47)
    assert res.guest_look_gap_s == pytest.approx(0.008)
    assert res.guest_bound_s == pytest.approx(0.008 + 0.003) == late_bound(0.008, cal)
    assert res.guest_bound_target_s == pytest.approx(0.005)
    assert res.guest_reaction_s == pytest.approx(0.47)
    assert res.guest_memtotal_delta_bytes == 131_072 * 1024


def test_the_control_arm_reports_memtotal_but_no_guest_latency():
    samples = sparse(
        [
            (1_000 * MS, 1, 500 * MS, 500 * MS, 2, 1_000_000),
            (1_900 * MS, 2, 1_400 * MS, 1_400 * MS, 2, 1_131_072),
        ]
    )
    res = ResizeResult("virtio-mem", "sbm", "grow", 128 << 20, t_request_ns=1_010 * MS)
    _guest_view(VirtioMem(), BASE_COLUMNS, samples, res, None, timed=False)
    assert res.guest_memtotal_delta_bytes == 131_072 * 1024
    assert res.guest_latency_s is None and res.guest_bound_s is None


def test_a_real_virtio_mem_shrink_under_stress_reads_back_as_recorded():
    """Lines the guest sampler sent during a 512 MiB virtio-mem shrink beside stress 1500M
    (TCG): only looks that changed something were sent, each with the look before."""
    meta = json.loads((FIXTURES / "series-virtio-mem-stress-shrink.json").read_text())
    s = np.load(FIXTURES / "series-virtio-mem-stress-shrink.npz")
    columns = ("totalram_kb", "freeram_kb", "freeswap_kb")
    samples = [
        Sample(
            int(a), int(k), int(g), tuple(int(s[f"guest_{c}"][i]) for c in columns), int(p), int(c)
        )
        for i, (a, k, g, p, c) in enumerate(
            zip(
                s["guest_t_ns"],
                s["guest_look"],
                s["guest_clock_ns"],
                s["guest_prev_clock_ns"],
                s["guest_cause"],
                strict=True,
            )
        )
    ]
    assert meta["samples"] == len(samples) < meta["sampler_checks"]  # silence is not sent
    res = ResizeResult("virtio-mem", "sbm", "shrink", meta["requested_bytes"])
    res.t_request_ns = int(s["t_request_ns"])
    cal = Calibration(meta["channel_rtt_median_s"], meta["channel_rtt_p95_s"], 0.05, 20)
    _guest_view(VirtioMem(), BASE_COLUMNS, samples, res, cal, timed=True)
    assert res.guest_latency_s == pytest.approx(meta["guest_latency_s"])
    assert res.guest_look_gap_s == pytest.approx(meta["guest_look_gap_s"])
    assert res.guest_bound_s == pytest.approx(meta["guest_bound_s"])
    assert res.guest_reaction_s == pytest.approx(meta["guest_reaction_s"])
    assert res.guest_memtotal_delta_bytes == meta["guest_memtotal_delta_bytes"] == -(512 << 20)
    # one-sided: the completing look is after the look before it, both after the request
    done = samples[-1]
    assert done.prev_guest_ns < done.guest_ns


# -- the guest-side duration from the driver's entry (issue 14) --------------------------------


def test_the_guest_tracer_spans_the_drivers_work():
    """The minimal guest's `trace` file after a virtio-mem grow (the preparation) and a
    measured 256 MiB shrink, and after a DIMM grow of two 128 MiB DIMMs (tcg-icount)."""
    from dynamem.mechanisms import Dimm
    from dynamem.parsers import parse_ftrace
    from dynamem.resize import DriverSpan, driver_span

    text = (FIXTURES / "guest-ftrace-virtio-mem.txt").read_text()
    events = parse_ftrace(text)
    assert len(events) == 10 and events[0][:2] == (23_132_003_000, "virtio_mem_config_changed")
    # the request came after the preparation: its entry, and the last block's MEM_OFFLINE
    span = driver_span(VirtioMem(), text, after_ns=100 * 10**9)
    assert (span.entry_ns, span.done_ns) == (132_652_003_000, 132_718_074_000)
    assert span.lines[1].endswith("memory_notify <-offline_pages")
    dimm = driver_span(Dimm(), (FIXTURES / "guest-ftrace-dimm.txt").read_text(), after_ns=0)
    # two DIMMs, two ACPI notifications: the first starts the span
    assert (dimm.entry_ns, dimm.done_ns) == (2_927_875_000, 2_946_262_000)
    # the balloon has no kernel stamp of its end, and there is no balloon request here
    assert driver_span(Balloon(), text, after_ns=0) == DriverSpan()
    assert driver_span(VirtioMem(), "", after_ns=0) == DriverSpan()  # no tracer


def test_the_driver_duration_ends_at_the_kernels_stamp_or_else_at_the_look():
    from dynamem.resize import DriverSpan

    samples = sparse(
        [
            (1_000 * MS, 1, 500 * MS, 500 * MS, 2, 1_000_000),
            (1_480 * MS, 40, 980 * MS, 972 * MS, 1, 1_131_072),
        ]
    )

    def view(span: DriverSpan | None) -> ResizeResult:
        res = ResizeResult("virtio-mem", "sbm", "grow", 128 << 20, t_request_ns=1_010 * MS)
        _guest_view(VirtioMem(), BASE_COLUMNS, samples, res, None, timed=True, span=span)
        return res

    res = view(DriverSpan(900 * MS, 975 * MS))
    assert res.guest_driver_s == pytest.approx(0.075) and res.guest_driver_end == "kernel"
    assert res.guest_clock_s == pytest.approx(0.008)  # from the last look that saw nothing
    res = view(DriverSpan(900 * MS, None))
    assert res.guest_driver_s == pytest.approx(0.080) and res.guest_driver_end == "look"
    # nothing traced: no number made up
    assert view(DriverSpan()).guest_driver_s is None and view(None).guest_driver_s is None


def test_looks_deferred_to_the_outcome_are_bounded_from_the_last_look_before_the_request():
    """A DIMM grow: baseline look (cause 2), the stop's look (3), nothing during the request,
    then the schedule restarts at the host-side outcome (2) and a uevent look (1)."""
    from dynamem.mechanisms import Dimm
    from dynamem.resize import previous_looks

    samples = sparse(
        [
            (1_000 * MS, 1, 500 * MS, 500 * MS, 2, 1_000_000),
            (1_002 * MS, 2, 502 * MS, 500 * MS, 3, 1_000_000),
            (1_030 * MS, 3, 530 * MS, 530 * MS, 2, 1_065_536),  # names itself as before
            (1_090 * MS, 9, 590 * MS, 588 * MS, 1, 1_131_072),
        ]
    )
    assert previous_looks(samples) == [500 * MS, 500 * MS, 502 * MS, 588 * MS]
    res = ResizeResult("dimm", "default", "grow", 128 << 20, t_request_ns=1_010 * MS)
    _guest_view(Dimm(), BASE_COLUMNS, samples, res, None, timed=True)
    assert res.guest_clock_s == pytest.approx(0.088)  # 590 - 502: the first change is late
    assert res.guest_look_gap_s == pytest.approx(0.002)
    assert Dimm().host_first(128 << 20) and not Dimm().host_first(-(128 << 20))
    assert not VirtioMem().host_first(128 << 20)
