"""`dynamem selfbench determinism`: what the deterministic mode (tcg-icount) buys, measured.

Under tcg-icount the guest's clock counts the instructions it ran, so a resize's guest-side
duration should repeat across fresh boots where wall-clock times wander by tens of percent.
This bench boots every mechanism's guest afresh `repeats` times (mechanisms interleaved,
so host drift lands on all of them), does one unmeasured shrink and grow (the first plug's
housekeeping is not what is timed), then a measured shrink and grow under each observer
setting in a rotating order. It reports, per mechanism and direction, the coefficient of
variation of the guest-clock duration beside that of the wall-clock host-side latency of
the same resizes, and the harness's perturbation two ways: accounted (with one vCPU every
instruction the sampler ran in the request's window is one the resize waited for, so
the duration grows by 1 / (1 - its share)), and side by side, the guest-clock duration
watched as usual over the same watched as little as possible (`sparse`), as the median of
the per-boot ratios with its order-statistic interval. The side-by-side ratio is only as
fine as the coarser arm's looks: a duration is stamped from the last look that saw no
change, so a look every 50 ms adds up to 50 ms to the baseline. Each resize also gets the
duration from the driver's entry to the end of its work, stamped by the guest's function
tracer (for the balloon, to the look that saw completion); where every boot has it, the
side-by-side ratio uses it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dynamem.errors import VMError
from dynamem.units import format_size

DIRECTIONS = ("shrink", "grow")


@dataclass
class DeterminismBench:
    mechanism: str
    size: int
    kernel_args: tuple[str, ...]
    accel: str
    observers: tuple[str, ...]
    # observer -> direction -> one value per fresh boot
    guest_clock: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # the same from the driver's entry (the guest's function tracer) instead of the last look
    driver: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    wall: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # observer -> direction -> the sampler's CPU from the request to the host-side outcome,
    # seconds on the guest's clock (under tcg-icount: instructions / 1e9)
    sampler_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # ... and that window's length on the guest's clock
    sampler_window: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, table: dict[str, dict[str, list[float]]], arm: str, direction: str,
            value: float | None) -> None:  # fmt: skip
        if value is not None:
            table.setdefault(arm, {}).setdefault(direction, []).append(value)


def cv(values: list[float]) -> float:
    """Sample standard deviation over the mean (nan below two values)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1) / x.mean()) if len(x) > 1 and x.mean() else float("nan")


def bench_determinism(
    mechanisms: list[str],
    repeats: int,
    size: int,
    memory: int,
    report: Callable[[str], None],
    *,
    observers: tuple[str, ...] = ("adaptive", "sparse"),
    kernel_args: tuple[str, ...] = (),
    out: dict[str, DeterminismBench] | None = None,
    **vm_options: object,
) -> dict[str, DeterminismBench]:
    """`repeats` fresh guests of each mechanism, mechanisms interleaved (host drift lands on
    all of them), each guest measured under every observer in an order rotating per boot.
    Results accumulate in `out` as they are measured, so a caller keeps them when a later
    boot fails."""
    from dynamem.observer import named

    for o in observers:
        named(o)  # an unknown name fails before anything boots
    out = {} if out is None else out
    for i in range(repeats):
        for mechanism in mechanisms:
            _boot(out, mechanism, i, repeats, size, memory, report, observers, kernel_args,
                  vm_options)  # fmt: skip
    return out


def _boot(
    out: dict[str, DeterminismBench],
    mechanism: str,
    i: int,
    repeats: int,
    size: int,
    memory: int,
    report: Callable[[str], None],
    observers: tuple[str, ...],
    kernel_args: tuple[str, ...],
    vm_options: dict[str, object],
) -> None:
    """One fresh guest of `mechanism`: an unmeasured shrink and grow, then each observer's."""
    from dynamem import mechanisms
    from dynamem.cell import plan_for
    from dynamem.qemu.machine import VM
    from dynamem.resize import resize
    from dynamem.selfbench import _arm_order

    plugs_first = mechanism == "dimm"
    steps = [(-size, "shrink"), (size, "grow")]
    if plugs_first:  # a DIMM guest can only remove what it plugged
        steps.reverse()
    mech = mechanisms.make(mechanism)
    mplan = mech.plan(memory - size if plugs_first else memory, steps[0][0], None, None)
    mech = mech.with_plan(mplan)
    plan = plan_for(mech, mplan, kernel_args=kernel_args, **vm_options)
    b = out.setdefault(
        mechanism, DeterminismBench(mechanism, size, kernel_args, plan.accel.accel, observers)
    )
    with VM(plan.config) as vm:
        vm.start()
        if mplan.prepare:
            resize(vm, mech, mplan.prepare, observer="minimal")
        for delta, _ in steps:  # warm-up, unmeasured
            resize(vm, mech, delta, observer="minimal")
        for arm in _arm_order(list(observers), i):
            for delta, direction in steps:
                r = resize(vm, mech, delta, observer=arm)
                if r.outcome != "ok":
                    raise VMError(f"{mechanism} {arm} {direction}: {r.outcome} {r.message}")
                b.add(b.guest_clock, arm, direction, r.guest_clock_s)
                b.add(b.driver, arm, direction, r.guest_driver_s)
                b.add(b.wall, arm, direction, r.host_latency_s)
                b.add(b.sampler_cpu, arm, direction, r.sampler_request_cpu_s)
                b.add(b.sampler_window, arm, direction, r.sampler_request_window_s)
                clock, drv = (
                    "-" if v is None else f"{v * 1e3:.3f}"
                    for v in (r.guest_clock_s, r.guest_driver_s)
                )
                report(
                    f"boot {i + 1}/{repeats} {mechanism:10} {arm:8} {direction:6} guest clock "
                    f"{clock} ms (from the driver {drv} ms), wall "
                    f"{(r.host_latency_s or 0) * 1e3:.1f} ms"
                )


def determinism_lines(b: DeterminismBench) -> list[str]:
    from dynamem.selfbench import median_ratio

    args = f", kernel {' '.join(b.kernel_args)}" if b.kernel_args else ""
    lines = [f"{b.mechanism}, {format_size(b.size)} ({b.accel}{args}):"]
    for arm in b.observers:
        for d in DIRECTIONS:
            g, w = b.guest_clock.get(arm, {}).get(d, []), b.wall.get(arm, {}).get(d, [])
            if not g:
                lines.append(f"  {arm:8} {d:6} no guest-clock duration")
                continue
            cpu = b.sampler_cpu.get(arm, {}).get(d, [])
            win = b.sampler_window.get(arm, {}).get(d, [])
            sampler = ""
            if cpu:
                sampler = (
                    f"; sampler {np.median(cpu) * 1e3:.3f} ms ({np.median(cpu) * 1e3:.2f} M instr)"
                )
            if cpu and len(win) == len(cpu):
                # One vCPU: every instruction the sampler ran in the request's window is one
                # the resize waited for, so duration / (duration - sampler) is its cost.
                share = np.median(np.asarray(cpu) / np.asarray(win))
                sampler += f", {share:.2%} of the window: x{1 / (1 - share):.4f}"
            lines.append(
                f"  {arm:8} {d:6} guest clock median {np.median(g) * 1e3:9.3f} ms, CV "
                f"{cv(g):6.2%} (n={len(g)}) | wall median {np.median(w) * 1e3:8.1f} ms, CV "
                f"{cv(w):6.2%}{sampler}"
            )
            if dr := b.driver.get(arm, {}).get(d, []):
                lines.append(
                    f"  {'':8} {'':6} from the driver {np.median(dr) * 1e3:9.3f} ms, CV "
                    f"{cv(dr):6.2%} (n={len(dr)})"
                )
    base = b.observers[-1]
    # the side-by-side ratio from the driver's entry where every boot traced it: the coarser
    # arm's looks then stretch only the end of its durations, not the start as well
    table, what = b.guest_clock, "guest-clock"
    if all(len(b.driver.get(a, {}).get(d, [])) == len(b.guest_clock.get(a, {}).get(d, []))
           for a in b.observers for d in DIRECTIONS):  # fmt: skip
        table, what = b.driver, "driver-entry"
    for arm in b.observers[:-1]:
        for d in DIRECTIONS:
            a, c = table.get(arm, {}).get(d, []), table.get(base, {}).get(d, [])
            if len(a) != len(c) or not a:
                continue
            r = median_ratio([x / y for x, y in zip(a, c, strict=True)])
            # Two-sided: a coarser baseline's looks stretch its own durations (a sparse
            # look every 50 ms adds up to 50 ms), which is no saving of the watched arm.
            verdict = "within 5%" if r.low >= 1 / 1.05 and r.high <= 1.05 else "NOT within 5%"
            lines.append(
                f"  {arm}/{base} {d:6} {what} ratio {r.median:.4f} "
                f"[{r.low:.4f}, {r.high:.4f}] {r.level:.0%} (n={r.n}): {verdict}"
            )
    return lines
