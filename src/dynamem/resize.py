"""One resize, timed end to end: request, host-side completion, guest-visible completion.

Host-side completion is the first poll at which QEMU's authoritative state (query-balloon,
query-memory-devices, qom-get size) shows the target; QMP events are rate-limited hints and
are not used as times. Guest-visible completion is the arrival, on the same host monotonic
clock, of the first sampler line from which the guest's own view (MemTotal, or the
balloon's page counters) stays at its final value.

Both are late, never early: the host saw the target at a poll, so it was reached after the
poll before (`host_bound_s`); the guest changed after the sampler's previous look and
before this one, and the line then took at most a round trip to arrive (`guest_bound_s`,
the gap between the two looks on the guest's clock plus the 95th-percentile round trip of
pings taken while the sampler runs at the rate the resize starts with). How often the host
polls and the guest looks is the `Observer` (dynamem.observer), recorded with each result.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamem.channel import SNAP_MAX, Calibration, Sample
from dynamem.errors import UserError
from dynamem.mechanisms.base import CapabilityLimit, Mechanism, Request
from dynamem.observer import DEFAULT, Observer, bound_target, named
from dynamem.parsers import (
    hotplug_log_lines,
    parse_ftrace,
    parse_kmsg,
    parse_memblocks,
    summarize_memblocks,
)
from dynamem.probes import host as hostprobe
from dynamem.probes.cost import GUEST_FILES, MEMINFO_KEYS, VMSTAT_KEYS, guest_cost, host_cost
from dynamem.probes.guestmem import parse_vmstat
from dynamem.qemu.monitor import QMPCommandError
from dynamem.record import OUTCOMES, Outcome, ResizeCost
from dynamem.record import ResizeRecord as ResizeResult

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM

PAGE = 4096
__all__ = ["OUTCOMES", "ResizeResult", "resize"]
# How long the guest may take to show a first change after the host-side outcome before it
# is judged on what it shows. A DIMM grow is "done" for QEMU at device_add, and the guest
# then has to take the ACPI notification, add and online the memory: in `dynamem bench
# resize` on the 2-core TCG host its whole 256 MiB grow became visible a median 107 ms
# after the outcome idle and 55 ms beside stress 1500M (n=10 and 5). 5 s leaves a busy or
# slow host fifty times that before a guest that never reacts is judged as it is.
REACTION_S = 5.0
# The guest's function tracer (see the minimal guest's boot script): driver entries and the
# end of each memory block's onlining or offlining, stamped on the guest's CLOCK_MONOTONIC.
TRACE = "/sys/kernel/tracing/trace"


def guest_signal(mech: Mechanism, columns: tuple[str, ...], samples: list[Sample]) -> np.ndarray:
    """The guest's own view of the mechanism, in bytes, one value per sample.

    totalram: MemTotal. balloon: pages inflated minus deflated (grows as the guest shrinks).
    """
    if not samples:
        return np.zeros(0, dtype=np.int64)
    values = np.array([s.values for s in samples], dtype=np.int64)
    if mech.guest_signal == "balloon":
        inflate = values[:, columns.index("balloon_inflate")]
        deflate = values[:, columns.index("balloon_deflate")]
        return (inflate - deflate) * PAGE
    return values[:, columns.index("totalram_kb")] * 1024


def completion_index(signal: np.ndarray, after: int) -> int | None:
    """First index >= `after` from which the signal stays at its final value; None if the
    signal never left its value at `after - 1` (nothing changed)."""
    if len(signal) == 0 or after >= len(signal):
        return None
    final = signal[-1]
    if after > 0 and np.all(signal[after - 1 :] == final):
        return None
    differs = np.nonzero(signal[after:] != final)[0]
    return after if len(differs) == 0 else after + int(differs[-1]) + 1


def _memblocks(vm: "VM") -> dict[str, int]:
    return summarize_memblocks(parse_memblocks(vm.sampler.snapshot(["memblocks"])["memblocks"]))


def _balloon_pages(vmstat: str) -> int:
    """Pages in the guest's balloon, from the kernel's own counters."""
    counters = parse_vmstat(vmstat)
    return counters.get("balloon_inflate", 0) - counters.get("balloon_deflate", 0)


def _settle_host(sampler: hostprobe.HostSampler, settle_s: float, limit_s: float = 10.0) -> None:
    """Keep sampling QEMU's RSS until it has not moved by more than 1 MiB for `settle_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(settle_s / 5)
        t = np.array(sampler.t_ns[-200:])
        rss = np.array(sampler.rss_kb[-200:])
        if len(t) < 2:
            continue
        recent = rss[t >= t[-1] - settle_s * 1e9]
        if t[-1] - t[0] >= settle_s * 1e9 and recent.max() - recent.min() <= 1024:
            return


def _series(
    ch: Any, samples: list[Sample], full: list[Sample], host: hostprobe.HostSampler
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if samples:
        fast = np.array([s.values for s in samples], dtype=np.int64)
        out["guest_t_ns"] = np.array([s.arrival_ns for s in samples], dtype=np.int64)
        out["guest_clock_ns"] = np.array([s.guest_ns for s in samples], dtype=np.int64)
        out["guest_prev_clock_ns"] = np.array([s.prev_guest_ns for s in samples], dtype=np.int64)
        out["guest_cause"] = np.array([s.cause for s in samples], dtype=np.int64)
        out["guest_look"] = np.array([s.seq for s in samples], dtype=np.int64)
        for i, name in enumerate(ch.columns):
            out[f"guest_{name}"] = fast[:, i]
    if full:
        slow = np.array([s.values for s in full], dtype=np.int64)
        out["full_t_ns"] = np.array([s.arrival_ns for s in full], dtype=np.int64)
        for i, name in enumerate(ch.full_columns):
            out[f"full_{name}"] = slow[:, i]
    out.update(host.arrays())
    return out


def kernel_log(vm: "VM") -> list[str]:
    """The guest kernel log, read by the sampler (an SSH `dmesg` would allocate guest memory
    that a following unplug might have to migrate)."""
    return parse_kmsg(vm.sampler.snapshot(["kmsg"])["kmsg"])


def resize(
    vm: "VM",
    mech: Mechanism,
    delta: int,
    *,
    deadline_s: float = 120.0,
    stall_s: float = 30.0,
    settle_s: float = 0.5,
    reaction_s: float = REACTION_S,
    observer: "Observer | str" = DEFAULT,
    calibration: Calibration | None = None,
) -> ResizeResult:
    """Perform one resize and measure it; failures of the mechanism become outcomes.

    `observer` is how closely it is watched (dynamem.observer: "adaptive", the
    default; "minimal", the control arm without guest-visible latency; "dense", the fixed
    500 Hz of earlier versions), recorded with the result.
    """
    obs = named(observer)
    res = ResizeResult(
        mechanism=mech.name,
        variant=mech.variant,
        direction="grow" if delta > 0 else "shrink",
        requested_bytes=delta,
        mechanism_config=mech.describe(),
        observer=obs.name,
        observer_config=obs.describe(),
        cpu_model=vm.config.cpu_model,
        reaction_allowance_s=reaction_s,
        settle_quiet_s=settle_s,
        sample_interval_s=obs.checks.floor_s,
    )
    ch = vm.sampler
    ch.configure(
        vmstat=mech.vmstat_keys(),
        full_meminfo=MEMINFO_KEYS,
        full_vmstat=VMSTAT_KEYS,
        onchange=obs.onchange,
        uevents=obs.uevents,
        cpu_budget=obs.cpu_budget,
    )
    log_before = kernel_log(vm)
    res.memory_blocks_before = _memblocks(vm)
    res.host_before_bytes = mech.host_bytes(vm)
    guest_before = ch.snapshot(list(GUEST_FILES))
    host_before = hostprobe.snapshot(vm.pid)
    cal = calibration
    if cal is None and obs.watch_during:
        # The round trip bounds how late a line arrives: measure it with the sampler looking
        # at the rate the resize starts with, and with the workload running.
        ch.start(obs.checks)
        cal = ch.calibrate(20)
    if cal is not None:
        res.channel_rtt_median_s, res.channel_rtt_p95_s = cal.rtt_median, cal.rtt_p95
        res.channel_rtt_max_s, res.channel_rtt_n = cal.rtt_max, cal.n
    host_sampler = hostprobe.HostSampler(vm.pid, backoff=obs.host_rss)
    # The guest is watched from the request on, or (control arm, or a mechanism whose host
    # side finishes before the guest starts) only from the host-side outcome on.
    look_in_window = obs.watch_during and not mech.host_first(delta)
    res.guest_looks_from = "request" if look_in_window else "outcome"
    try:
        mark, full_mark = ch.mark(), len(ch.full_samples)
        first = ch.start(obs.checks, obs.full)  # the baseline look, arrived
        if obs.watch_during:
            host_sampler.start()
        if not look_in_window:
            ch.stop()
        req: Request | None = None
        mech.before_request(vm)
        start_bytes = mech.host_bytes(vm)
        # charged from here, like the sampler's budget: the baseline look precedes the request
        cpu_before, clock_before = ch.cpu_and_clock()
        t_req = time.monotonic_ns()
        res.t_request_ns = t_req
        poll_times: list[int] = []
        try:
            req = mech.request(vm, delta, start_bytes)
        except QMPCommandError as exc:
            res.outcome, res.message = "refused", str(exc)
        except CapabilityLimit as exc:
            res.outcome, res.message = "unsupported", str(exc)
        except UserError as exc:
            res.outcome, res.message = "refused", str(exc)
        if req is not None:
            res.outcome, res.message = _poll_host(
                vm, mech, req, res, poll_times, deadline_s, stall_s, obs
            )
        t_outcome = time.monotonic_ns()
        cpu_outcome, clock_outcome = ch.cpu_and_clock()
        res.sampler_request_cpu_s = cpu_outcome - cpu_before
        res.sampler_request_window_s = (clock_outcome - clock_before) / 1e9
        if res.sampler_request_window_s > 0:
            res.sampler_request_share = res.sampler_request_cpu_s / res.sampler_request_window_s
        if not obs.watch_during:
            host_sampler.start()
        if not look_in_window:
            ch.start(obs.checks, obs.full)
        expect_change = req is not None and mech.host_bytes(vm) != start_bytes
        allowance = reaction_s if expect_change else 0.0
        _settle(vm, mech, mark, settle_s, allowance, Instant(t_outcome, clock_outcome), deadline_s)
        if req is not None:
            mech.finish(vm, req)
        _settle_host(host_sampler, settle_s)
        last = ch.stop()
    finally:
        # A failure mid-resize (QEMU gone, guest stuck) must not leave threads sampling.
        host_sampler.stop()

    samples = ch.samples[mark:]
    res.samples = len(samples)
    res.sampler_checks = last.checks - first.checks + 1
    res.sampler_uevent_checks = sum(1 for s in samples if s.cause == 1)
    res.sampler_uevent_looks = last.uevent_checks - first.uevent_checks
    res.sampler_cpu_s = ch.cpu_seconds() - cpu_before
    res.sampler_window_s = (last.guest_ns - clock_before) / 1e9
    if res.sampler_window_s > 0:
        res.sampler_cpu_share = res.sampler_cpu_s / res.sampler_window_s
    if len(poll_times) > 1:
        res.poll_period_median_s = float(np.median(np.diff(poll_times))) / 1e9
    if res.t_host_done_ns is not None:
        # The target was reached after the previous poll read QEMU's state (or the request).
        res.host_bound_s = (res.t_host_done_ns - ([t_req, *poll_times])[-2]) / 1e9
    guest_after = ch.snapshot([*GUEST_FILES, TRACE])
    trace = guest_after.pop(TRACE)
    # a trace cut at the sampler's buffer lacks its newest lines: no span rather than a wrong one
    span = driver_span(mech, trace, clock_before) if len(trace) < SNAP_MAX else DriverSpan()
    res.guest_driver_trace = span.lines
    _guest_view(mech, ch.columns, samples, res, cal, obs.watch_during, span)
    host_after = hostprobe.snapshot(vm.pid)
    if mech.name == "balloon":
        res.guest_balloon_delta_bytes = (
            _balloon_pages(guest_after["/proc/vmstat"])
            - _balloon_pages(guest_before["/proc/vmstat"])
        ) * PAGE
    res.series = _series(ch, samples, ch.full_samples[full_mark:], host_sampler)
    res.cost = ResizeCost(
        guest=guest_cost(guest_before, guest_after),
        host=host_cost(host_before, host_after, res.series, t_req),
    )
    res.host_after_bytes = mech.host_bytes(vm)
    res.host_done_bytes = res.host_after_bytes - res.host_before_bytes
    if res.t_host_done_ns is not None:
        res.host_latency_s = (res.t_host_done_ns - t_req) / 1e9
    res.memory_blocks_after = _memblocks(vm)
    new_lines = kernel_log(vm)[len(log_before) :]
    res.kernel_log = hotplug_log_lines("\n".join(new_lines))
    _judge(mech, res)
    return res


def _poll_host(
    vm: "VM",
    mech: Mechanism,
    req: Request,
    res: ResizeResult,
    poll_times: list[int],
    deadline_s: float,
    stall_s: float,
    obs: Observer,
) -> tuple[Outcome, str]:
    start = time.monotonic_ns()
    last_bytes = req.start
    last_change = start
    while True:
        poll_start = time.monotonic_ns()
        poll_times.append(poll_start)  # the state read below is at least this recent
        vm.check_health()  # a dead QEMU or a guest that reset itself is no resize outcome
        progress = mech.poll(vm, req)
        now = time.monotonic_ns()
        res.polls += 1
        if progress.host_bytes != last_bytes:
            last_bytes, last_change = progress.host_bytes, now
        if progress.done:
            if progress.host_bytes == req.target:
                res.t_host_done_ns = now
                return "ok", ""
            reasons = "; ".join(progress.refused) or "stopped short of the target"
            return ("partial" if progress.host_bytes != req.start else "refused"), reasons
        if now - start > deadline_s * 1e9 or now - last_change > stall_s * 1e9:
            what = (
                "deadline" if now - start > deadline_s * 1e9 else f"no progress for {stall_s:g} s"
            )
            done = progress.host_bytes - req.start
            msg = f"{what}: host reports {done:+d} of {req.target - req.start:+d} bytes"
            return ("partial" if done else "timeout"), msg
        next_poll = poll_start + obs.host_poll.interval((now - start) / 1e9) * 1e9
        pause = (next_poll - time.monotonic_ns()) / 1e9
        if pause > 0:
            time.sleep(pause)


def first_change_index(signal: np.ndarray) -> int | None:
    """Index of the first sample whose signal differs from the first (the baseline)."""
    if len(signal) == 0:
        return None
    differs = np.nonzero(signal != signal[0])[0]
    return int(differs[0]) if len(differs) else None


@dataclass(frozen=True)
class Instant:
    """One moment on both clocks: the host's monotonic and the guest's."""

    host_ns: int
    guest_ns: int


def settle_state(
    signal: np.ndarray,
    looks: list[Instant],
    now: Instant,
    outcome: Instant,
    settle_s: float,
    reaction_s: float,
) -> bool:
    """Whether the watch may end: the guest's view has not changed for `settle_s` since its
    last change, counted from its first change, not from before the request (a guest slow
    to react has not settled, it has not started). Without any change yet it may end once
    `reaction_s` has passed since the host-side outcome (0 when no change is expected).

    Quiet must last on both clocks: in icount mode a busy guest's clock runs many times
    slower than the host's, and half a second of host time can be a few milliseconds of
    guest work (a virtio-mem grow beside stress was judged partial after one of its two
    blocks); an idle guest's clock jumps ahead, and then the host's is the one that binds.
    `looks[i]` is when the sampler looked for `signal[i]`; `now` how far it has looked."""

    def quiet(since: Instant, seconds: float) -> bool:
        wait = seconds * 1e9
        return now.host_ns - since.host_ns > wait and now.guest_ns - since.guest_ns > wait

    first = first_change_index(signal)
    if first is None:
        return quiet(outcome, max(reaction_s, settle_s))
    changed = np.nonzero(signal[1:] != signal[:-1])[0]
    return quiet(looks[int(changed[-1]) + 1], settle_s)


def _settle(
    vm: "VM",
    mech: Mechanism,
    mark: int,
    settle_s: float,
    reaction_s: float,
    outcome: Instant,
    deadline_s: float,
) -> None:
    """Keep watching until the guest's view has settled (settle_state) or a deadline."""
    ch = vm.sampler
    deadline = time.monotonic() + reaction_s + max(settle_s * 4, min(deadline_s, 30.0))
    while time.monotonic() < deadline:
        time.sleep(settle_s / 5)
        pong = ch.barrier()  # every look sent so far has arrived
        now = Instant(time.monotonic_ns() - int(pong.rtt_s * 1e9), pong.last_check_ns)
        samples = ch.samples[mark:]
        signal = guest_signal(mech, ch.columns, samples)
        looks = [Instant(s.arrival_ns, s.guest_ns) for s in samples]
        if len(signal) and settle_state(signal, looks, now, outcome, settle_s, reaction_s):
            return


def _guest_view(
    mech: Mechanism,
    columns: tuple[str, ...],
    samples: list[Sample],
    res: ResizeResult,
    cal: Calibration | None,
    timed: bool,
    span: "DriverSpan | None" = None,
) -> None:
    if not samples:
        return
    arrivals = np.array([s.arrival_ns for s in samples], dtype=np.int64)
    total_kb = np.array([s.values[columns.index("totalram_kb")] for s in samples])
    assert res.t_request_ns is not None
    first_after = int(np.searchsorted(arrivals, res.t_request_ns, side="right"))
    base = max(first_after - 1, 0)
    res.guest_memtotal_before_kb = int(total_kb[base])
    res.guest_memtotal_after_kb = int(total_kb[-1])
    res.guest_memtotal_delta_bytes = int(total_kb[-1] - total_kb[base]) * 1024
    if not timed:
        return  # the control arm did not watch the guest while the request was in flight
    signal = guest_signal(mech, columns, samples)
    prev = previous_looks(samples)
    first = first_change_index(signal[base:])
    if first is not None:
        res.guest_reaction_s = (int(arrivals[base + first]) - res.t_request_ns) / 1e9
    idx = completion_index(signal, first_after)
    if idx is not None and first is not None:
        # On the guest's own clock: from the last look that saw nothing yet to the look
        # that saw completion. Under tcg-icount this counts the guest's instructions (and
        # its idle waits, which jump to its next timer), not the host's work.
        res.guest_clock_s = (samples[idx].guest_ns - prev[base + first]) / 1e9
    if idx is not None and span is not None and span.entry_ns is not None:
        # ends at the kernel's stamp of the end of its work where the mechanism has one
        # (the look that saw it only confirms it), else at the look that saw completion
        end = span.done_ns if span.done_ns is not None else samples[idx].guest_ns
        if end > span.entry_ns:
            res.guest_driver_s = (end - span.entry_ns) / 1e9
            res.guest_driver_end = "kernel" if span.done_ns is not None else "look"
    if idx is not None:
        res.t_guest_done_ns = int(arrivals[idx])
        res.guest_latency_s = (res.t_guest_done_ns - res.t_request_ns) / 1e9
        res.guest_look_gap_s = (samples[idx].guest_ns - prev[idx]) / 1e9
        if cal is not None:
            res.guest_bound_s = late_bound(res.guest_look_gap_s, cal)
        res.guest_bound_target_s = bound_target(res.guest_latency_s)


def previous_looks(samples: list[Sample]) -> list[int]:
    """The guest time of the look before each sample's. A schedule's first look (cause 2)
    names itself as its predecessor; when the sampler was stopped before it (looks deferred
    to the host-side outcome), the look before is the last one received."""
    return [
        samples[i - 1].guest_ns if s.cause == 2 and i > 0 else s.prev_guest_ns
        for i, s in enumerate(samples)
    ]


@dataclass(frozen=True)
class DriverSpan:
    """What the guest's function tracer saw of one request (guest clock, ns): the driver's
    first entry after the request and the last `driver_done` call after it, with their
    trace lines; None where nothing was traced (no tracer, no request, no such function)."""

    entry_ns: int | None = None
    done_ns: int | None = None
    lines: list[str] = field(default_factory=list)


def driver_span(mech: Mechanism, trace: str, after_ns: int) -> DriverSpan:
    events = [e for e in parse_ftrace(trace) if e[0] > after_ns]
    entry = next((e for e in events if e[1] == mech.driver_entry), None)
    if entry is None:
        return DriverSpan()
    done = [e for e in events if e[1] == mech.driver_done and e[0] > entry[0]]
    if not mech.driver_done or not done:
        return DriverSpan(entry[0], None, [entry[2]])
    return DriverSpan(entry[0], done[-1][0], [entry[2], done[-1][2]])


def late_bound(look_gap_s: float, cal: Calibration) -> float:
    """How late a guest-visible stamp can be: the change happened after the previous look
    and before this one, and the line took at most about a round trip to arrive."""
    return look_gap_s + cal.rtt_p95


def _judge(mech: Mechanism, res: ResizeResult) -> None:
    """Refine the host-side outcome with what the guest saw."""
    if res.outcome != "ok":
        return
    if mech.name == "balloon":
        seen = -(res.guest_balloon_delta_bytes or 0)
        what = "in its balloon"
    else:
        seen = res.guest_memtotal_delta_bytes or 0
        what = "in MemTotal"
    if seen != res.host_done_bytes:
        res.outcome = "partial"
        res.message = (
            f"QEMU reports {res.host_done_bytes:+d} bytes but the guest sees {seen:+d} {what}"
        )
