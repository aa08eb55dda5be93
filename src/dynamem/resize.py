"""One resize, timed end to end: request, host-side completion, guest-visible completion.

Host-side completion is the first poll (every `poll_interval_s`) at which QEMU's
authoritative state (query-balloon, query-memory-devices, qom-get size) shows the target;
QMP events are rate-limited hints and are not used as times. Guest-visible completion is
the arrival, on the same host monotonic clock, of the first sampler line from which the
guest's own view (MemTotal, or the balloon's page counters) stays at its final value. Its
uncertainty is the gap to the previous sample plus the channel's 95th-percentile round
trip, reported with each result.
"""

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamem.channel import Calibration, Sample
from dynamem.errors import DeadlineExceeded, UserError
from dynamem.mechanisms.base import CapabilityLimit, Mechanism, Request
from dynamem.parsers import hotplug_log_lines, parse_kmsg, parse_memblocks, summarize_memblocks
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
    poll_interval_s: float = 0.002,
    sample_interval_s: float = 0.002,
    full_interval_s: float = 0.02,
    calibration: Calibration | None = None,
) -> ResizeResult:
    """Perform one resize and measure it; failures of the mechanism become outcomes."""
    res = ResizeResult(
        mechanism=mech.name,
        variant=mech.variant,
        direction="grow" if delta > 0 else "shrink",
        requested_bytes=delta,
        mechanism_config=mech.describe(),
    )
    ch = vm.sampler
    ch.configure(
        vmstat=mech.vmstat_keys(),
        full_meminfo=MEMINFO_KEYS,
        full_vmstat=VMSTAT_KEYS,
        every=max(1, round(full_interval_s / sample_interval_s)),
    )
    cal = calibration or ch.calibrate(20)
    res.channel_rtt_median_s, res.channel_rtt_p95_s = cal.rtt_median, cal.rtt_p95
    log_before = kernel_log(vm)
    res.memory_blocks_before = _memblocks(vm)
    res.host_before_bytes = mech.host_bytes(vm)
    guest_before = ch.snapshot(list(GUEST_FILES))
    host_before = hostprobe.snapshot(vm.pid)
    host_sampler = hostprobe.HostSampler(vm.pid, full_interval_s).start()
    try:
        cpu_before = ch.cpu_seconds()
        mark, full_mark = ch.mark(), len(ch.full_samples)
        ch.set_interval(int(sample_interval_s * 1e9))
        _wait_samples(vm, mark, 3)
        req: Request | None = None
        mech.before_request(vm)
        start_bytes = mech.host_bytes(vm)
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
                vm, mech, req, res, poll_times, deadline_s, stall_s, poll_interval_s
            )
        _settle(vm, mech, mark, settle_s, deadline_s)
        if req is not None:
            mech.finish(vm, req)
        _settle_host(host_sampler, settle_s)
        ch.set_interval(0)
    finally:
        # A failure mid-resize (QEMU gone, guest stuck) must not leave threads sampling.
        host_sampler.stop()

    samples = ch.samples[mark:]
    res.samples = len(samples)
    res.sample_interval_s = sample_interval_s
    res.sampler_cpu_s = ch.cpu_seconds() - cpu_before
    if len(poll_times) > 1:
        res.poll_period_median_s = float(np.median(np.diff(poll_times))) / 1e9
    _guest_view(mech, ch.columns, samples, res, cal)
    guest_after = ch.snapshot(list(GUEST_FILES))
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


def _wait_samples(vm: "VM", mark: int, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(vm.sampler.samples) - mark < count:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"guest sampler sent no samples within {timeout:g} s")
        time.sleep(0.001)


def _poll_host(
    vm: "VM",
    mech: Mechanism,
    req: Request,
    res: ResizeResult,
    poll_times: list[int],
    deadline_s: float,
    stall_s: float,
    interval_s: float,
) -> tuple[Outcome, str]:
    start = time.monotonic_ns()
    last_bytes = req.start
    last_change = start
    period = int(interval_s * 1e9)
    next_poll = start
    while True:
        vm.check_health()  # a dead QEMU or a guest that reset itself is no resize outcome
        progress = mech.poll(vm, req)
        now = time.monotonic_ns()
        poll_times.append(now)
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
        next_poll += period
        pause = (next_poll - time.monotonic_ns()) / 1e9
        if pause > 0:
            time.sleep(pause)
        else:
            next_poll = time.monotonic_ns()


def _settle(vm: "VM", mech: Mechanism, mark: int, settle_s: float, deadline_s: float) -> None:
    """Keep sampling until the guest's view has not changed for `settle_s`."""
    ch = vm.sampler
    deadline = time.monotonic() + max(settle_s * 4, min(deadline_s, 30.0))
    while time.monotonic() < deadline:
        time.sleep(settle_s / 5)
        samples = ch.samples[mark:]
        signal = guest_signal(mech, ch.columns, samples)
        if len(signal) < 2:
            continue
        changed = np.nonzero(signal != signal[-1])[0]
        last_change_ns = (
            samples[int(changed[-1]) + 1].arrival_ns if len(changed) else samples[0].arrival_ns
        )
        if time.monotonic_ns() - last_change_ns > settle_s * 1e9:
            return


def _guest_view(
    mech: Mechanism,
    columns: tuple[str, ...],
    samples: list[Sample],
    res: ResizeResult,
    cal: Calibration,
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
    signal = guest_signal(mech, columns, samples)
    idx = completion_index(signal, first_after)
    if idx is not None:
        res.t_guest_done_ns = int(arrivals[idx])
        res.guest_latency_s = (res.t_guest_done_ns - res.t_request_ns) / 1e9
        gap = (arrivals[idx] - arrivals[idx - 1]) / 1e9 if idx > 0 else 0.0
        res.guest_bound_s = float(gap + cal.rtt_p95)


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
