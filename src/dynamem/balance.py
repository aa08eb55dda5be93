"""Deciding when and where guest memory moves: the balancing controller's pure half.

A case study (dynamem.cases) reads every guest's memory pressure through its in-guest
sampler once per control interval and asks a policy which moves to make. The policy sees
only numbers (this module does no I/O), so it is tested on readings captured from real
guests and can be swapped for another one without touching the runner.

The default policy, `TargetAvailable`, is the simple one the study's U-tube runtime stands
for: keep each guest's MemAvailable near a target; a guest under pressure (MemAvailable
below the low mark, memory PSI, or swap-ins in the last interval) gets memory, first from
the budget's free room, then from guests with slack above the target (swap-out and
major-fault rates count as pressure too: reclaim and thrashing show there before PSI's
10-second average rises); every move is a
multiple of the mechanism's unit, no guest goes below its floor or above its ceiling, and
the guests' sizes never add up to more than the budget (a grow only spends what is free
after the shrinks really completed, which the runner enforces).
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamem.parsers import parse_meminfo
from dynamem.probes.guestmem import parse_vmstat
from dynamem.units import MiB, format_size


@dataclass(frozen=True)
class Pressure:
    """One look at a guest's memory state (counters are cumulative since its boot)."""

    t_ns: int  # host monotonic, when the look arrived
    mem_total_kb: int
    mem_available_kb: int
    pswpin: int
    pswpout: int
    pgmajfault: int
    oom_kill: int
    psi_some_us: int  # /proc/pressure/memory "some total" (-1: no PSI in this guest)
    psi_some_avg10: float


def parse_psi(text: str) -> tuple[float, int]:
    """(some avg10 in %, some total in µs) of /proc/pressure/memory; (0, -1) if absent
    (a kernel without PSI, or booted without psi=1)."""
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "some":
            kv = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            return float(kv.get("avg10", 0.0)), int(kv.get("total", 0))
    return 0.0, -1


def parse_pressure(t_ns: int, meminfo: str, vmstat: str, psi: str) -> Pressure:
    """A look from the three files the sampler read; ValueError if meminfo is unusable."""
    mem, vm = parse_meminfo(meminfo), parse_vmstat(vmstat)
    if "MemTotal" not in mem or "MemAvailable" not in mem:
        raise ValueError("meminfo without MemTotal or MemAvailable")
    avg10, total = parse_psi(psi)
    return Pressure(
        t_ns=t_ns,
        mem_total_kb=mem["MemTotal"],
        mem_available_kb=mem["MemAvailable"],
        pswpin=vm.get("pswpin", 0),
        pswpout=vm.get("pswpout", 0),
        pgmajfault=vm.get("pgmajfault", 0),
        oom_kill=vm.get("oom_kill", 0),
        psi_some_us=total,
        psi_some_avg10=avg10,
    )


@dataclass
class GuestView:
    """What the controller knows of one guest when it decides."""

    name: str
    size: int  # bytes the mechanism says the guest has now
    floor: int
    ceiling: int
    now: Pressure
    before: Pressure | None = None  # the previous look (None on the first)
    received_at: int = -(10**9)  # the control round of its last grow
    gave_at: int = -(10**9)  # the control round of its last shrink

    @property
    def available(self) -> int:
        return self.now.mem_available_kb * 1024

    def rate(self, counter: str) -> float:
        """A counter's increase per second since the previous look (0 on the first)."""
        if self.before is None or self.now.t_ns <= self.before.t_ns:
            return 0.0
        change = getattr(self.now, counter) - getattr(self.before, counter)
        return float(change / ((self.now.t_ns - self.before.t_ns) / 1e9))

    @property
    def swap_in_rate(self) -> float:
        return self.rate("pswpin")


@dataclass(frozen=True)
class Move:
    """One request: grow or shrink `guest` by `size` bytes, and why."""

    guest: str
    kind: str  # "grow", "shrink", or "none" (under pressure, nothing to give it)
    size: int
    reason: str

    @property
    def delta(self) -> int:
        return {"grow": self.size, "shrink": -self.size}.get(self.kind, 0)


class Policy(Protocol):
    name: str

    def pressured(self, g: GuestView) -> str:
        """Why `g` is under pressure ('' if it is not)."""
        ...

    def decide(self, guests: list[GuestView], budget: int, unit: int, round_: int) -> list[Move]:
        """The moves of one control round: shrinks first, then grows."""
        ...

    def describe(self) -> dict[str, Any]: ...


def _down(x: int, unit: int) -> int:
    return max(0, x // unit * unit)


def _up(x: int, unit: int) -> int:
    return max(0, -(-x // unit) * unit)


@dataclass
class TargetAvailable:
    """Keep MemAvailable near `target`; `low` (or PSI, or swap-ins) marks pressure.

    A donor keeps `target` plus one unit of margin and gives nothing for `cooldown` rounds
    after it received memory (memory that just arrived is often not yet in use)."""

    target: int = 256 * MiB
    low: int = 128 * MiB
    psi_avg10: float = 10.0  # % of the last 10 s with some task stalled on memory
    swap_in_rate: float = 64.0  # pages/s
    swap_out_rate: float = 256.0  # pages/s (1 MiB/s): reclaim pushing anonymous memory out
    major_fault_rate: float = 64.0  # per second: pages read back from disk on access
    cooldown: int = 3
    name: str = field(default="target-available", init=False)

    def pressured(self, g: GuestView) -> str:
        reasons = []
        if g.available < self.low:
            reasons.append(f"MemAvailable {format_size(g.available)} < {format_size(self.low)}")
        if g.now.psi_some_avg10 >= self.psi_avg10:
            reasons.append(f"PSI some avg10 {g.now.psi_some_avg10:.1f}%")
        if g.swap_in_rate >= self.swap_in_rate:
            reasons.append(f"swap-in {g.swap_in_rate:.0f} pages/s")
        if (out := g.rate("pswpout")) >= self.swap_out_rate:
            reasons.append(f"swap-out {out:.0f} pages/s")
        if (faults := g.rate("pgmajfault")) >= self.major_fault_rate:
            reasons.append(f"major faults {faults:.0f}/s")
        return ", ".join(reasons)

    def _want(self, g: GuestView, unit: int) -> int:
        need = max(self.target - g.available, unit if self.pressured(g) else 0)
        return min(_up(need, unit), _down(g.ceiling - g.size, unit))

    def _spare(self, g: GuestView, unit: int, round_: int) -> int:
        if self.pressured(g) or g.swap_in_rate > 0 or round_ - g.received_at <= self.cooldown:
            return 0
        return min(_down(g.available - self.target - unit, unit), _down(g.size - g.floor, unit))

    def decide(self, guests: list[GuestView], budget: int, unit: int, round_: int) -> list[Move]:
        needy = sorted(
            (g for g in guests if self.pressured(g) and self._want(g, unit) > 0),
            key=lambda g: g.available / max(g.size, 1),
        )
        if not needy:
            return []
        free = _down(budget - sum(g.size for g in guests), unit)
        spare = {g.name: self._spare(g, unit, round_) for g in guests if g not in needy}
        shrinks: dict[str, int] = {}
        grows: list[Move] = []
        for g in needy:
            want, got = self._want(g, unit), 0
            take = min(free, want)
            free, got = free - take, take
            for donor in sorted(spare, key=lambda n: -spare[n]):
                if got >= want:
                    break
                give = min(spare[donor], want - got)
                if give > 0:
                    spare[donor] -= give
                    shrinks[donor] = shrinks.get(donor, 0) + give
                    got += give
            if got:
                grows.append(Move(g.name, "grow", got, self.pressured(g)))
            else:  # logged, so a starved guest shows in the decisions, not only its pressure
                grows.append(
                    Move(g.name, "none", 0, f"{self.pressured(g)}; no free budget, no slack")
                )
        by_name = {g.name: g for g in guests}
        return [
            Move(
                n,
                "shrink",
                s,
                f"slack: MemAvailable {format_size(by_name[n].available)} > target "
                f"{format_size(self.target)}",
            )
            for n, s in shrinks.items()
        ] + grows

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "low": self.low,
            "psi_avg10": self.psi_avg10,
            "swap_in_rate": self.swap_in_rate,
            "swap_out_rate": self.swap_out_rate,
            "major_fault_rate": self.major_fault_rate,
            "cooldown": self.cooldown,
        }


POLICIES = {"target-available": TargetAvailable}


def make_policy(name: str, **options: Any) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    policy: Policy = POLICIES[name](**options)
    return policy
