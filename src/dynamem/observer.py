"""How closely a resize is watched, and what that watching may cost the guest (pure).

Under TCG every wake-up of the guest costs about half a millisecond of emulated time, and
the host's own polling competes with the vCPU threads for the host's cores. A fixed fast
rate therefore slows the very resize it times (at 500 Hz the in-guest sampler used about
30% of a vCPU). Watching backs off instead: the interval between looks is a fixed share of
the time elapsed since the request, so a completion seen after t seconds is late by at most
about that share of t, whatever t is, and a long resize is not paid for with thousands of
wake-ups. Every setting is a named, recorded condition; the cheapest one ("minimal") is the
control arm that measures what the others cost.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

from dynamem.errors import UserError


@dataclass(frozen=True)
class Backoff:
    """Intervals clamp(fraction * elapsed, floor, cap): `floor` while the change is young,
    a relative resolution of `fraction` later, never sparser than `cap`."""

    floor_s: float
    cap_s: float
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.cap_s or self.fraction < 0:
            raise ValueError(f"invalid back-off {self}")

    def interval(self, elapsed_s: float) -> float:
        return min(self.cap_s, max(self.floor_s, self.fraction * elapsed_s))

    def times(self, duration_s: float) -> list[float]:
        """When the looks fall in [0, duration], each an interval after the one before."""
        out = [0.0]
        while (t := out[-1] + self.interval(out[-1])) <= duration_s:
            out.append(t)
        return out

    def sampler_args(self) -> str:
        """The guest sampler's `schedule`/`full` arguments: floor_ns cap_ns ppm."""
        return f"{round(self.floor_s * 1e9)} {round(self.cap_s * 1e9)} {round(self.fraction * 1e6)}"


@dataclass(frozen=True)
class Observer:
    """One way of watching a resize.

    `checks`: the guest sampler's looks at MemTotal (and the balloon's counters).
    `full`: the sampler's full meminfo/vmstat records for the time-series figures.
    `cpu_budget`: the most of one vCPU the sampler may use from the request on (0: none).
    `watch_during`: False leaves the guest alone until the host-side outcome is in (no
    guest-visible latency then; the sampler only watches the guest settle afterwards).
    `onchange`: a look is sent to the host only when what it watches changed.
    `uevents`: memory-block uevents (DIMM, virtio-mem) wake the sampler at once.
    `host_poll`: QMP polling of QEMU's authoritative state. `host_rss`: QEMU's RSS.
    """

    name: str
    checks: Backoff
    full: Backoff
    cpu_budget: float
    watch_during: bool
    onchange: bool
    uevents: bool
    host_poll: Backoff
    host_rss: Backoff

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# Looks every 2 ms at first, then 1% of the elapsed time, at least every 50 ms, within 4% of
# a vCPU (a point below the 5% the harness promises, for the pings and commands around a
# resize). Where a wake-up is cheap (KVM; TCG in icount mode, where a look is about 7,000
# guest instructions) the schedule rules; under wall-clock TCG a wake-up costs the guest
# 0.65 ms idle and about 2.5 ms beside a busy workload (`dynamem selfbench sampler`), so the
# budget spaces the looks 16-60 ms apart until 1% of the elapsed time is more. Full
# records, for the time-series figures, from every 100 ms to every second.
ADAPTIVE = Observer(
    name="adaptive",
    checks=Backoff(0.002, 0.050, 0.01),
    full=Backoff(0.100, 1.000, 0.10),
    cpu_budget=0.04,
    watch_during=True,
    onchange=True,
    uevents=True,
    host_poll=Backoff(0.010, 0.050, 0.01),
    host_rss=Backoff(0.020, 0.200, 0.02),
)
# Host polls at least 10 ms apart: one poll through qemu.qmp (check_health and the
# mechanism's query) costs the host 0.5-0.8 ms of CPU (a raw socket 0.15 ms), taken from the
# vCPU threads on a 2-core host; 10 ms keeps it under 8% of a core while the change is young.
# The bare script polls on the same schedule, so both have the same resolution.
# The control arm: no guest wake-up of the harness's own while the request is in flight.
MINIMAL = replace(ADAPTIVE, name="minimal", watch_during=False, uevents=False)
# dynamem up to issue 13, kept to measure what the back-off saves: 500 Hz looks, every one
# sent, full records at 50 Hz, QMP every 2 ms, RSS every 20 ms, no budget.
DENSE = Observer(
    name="dense",
    checks=Backoff(0.002, 0.002),
    full=Backoff(0.020, 0.020),
    cpu_budget=0.0,
    watch_during=True,
    onchange=False,
    uevents=False,
    host_poll=Backoff(0.002, 0.002),
    host_rss=Backoff(0.020, 0.020),
)
# The fewest looks that still time the guest: uevents (DIMM, virtio-mem) and every 50 ms,
# full records every second. The baseline of the deterministic mode's perturbation
# measure (`dynamem selfbench determinism`): the guest-side duration watched as usual over
# the same watched as little as possible.
SPARSE = replace(ADAPTIVE, name="sparse", checks=Backoff(0.050, 0.050), full=Backoff(1.000, 1.000))
OBSERVERS = {o.name: o for o in (ADAPTIVE, MINIMAL, DENSE, SPARSE)}
DEFAULT = ADAPTIVE.name


def named(name: "str | Observer") -> Observer:
    """The setting called `name` (an Observer passes through)."""
    if isinstance(name, Observer):
        return name
    try:
        return OBSERVERS[name]
    except KeyError:
        raise UserError(f"unknown observer {name!r} (choose from {', '.join(OBSERVERS)})") from None


def bound_target(latency_s: float) -> float:
    """What a guest-visible completion time should be good to: 5 ms, or 1% of a long one."""
    return max(0.005, 0.01 * latency_s)
