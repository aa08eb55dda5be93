"""One cell's lifecycle: a scenario's repeat on a fresh guest, from plan to record.

Plan, boot (or start from the configuration's saved post-boot state), prepare (plug or
inflate to the starting size, unmeasured), an optional warm-up pass, touch-and-free, the
workload, the measured steps, the workload's impact attached to each step, then the typed
record. `dynamem run` runs every cell of a suite
through this; `dynamem resize` runs one cell through the same path and prints it. Every
failure is recorded with the phase it happened in; only Ctrl-C escapes.
"""

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamem import __version__, placement
from dynamem.errors import DynamemError, VMError
from dynamem.faults import Injector
from dynamem.launch import Plan, guest_label, plan_vm
from dynamem.mechanisms import Mechanism, MemoryPlan
from dynamem.parsers import hotplug_log_lines, parse_meminfo
from dynamem.probes.guestmem import parse_vmstat
from dynamem.qemu import snapshot
from dynamem.qemu.accel import qemu_version
from dynamem.qemu.machine import VM
from dynamem.record import (
    CellContext,
    CellRecord,
    FreeStep,
    HostInfo,
    Injected,
    OomStep,
    RebootStep,
    ResizeRecord,
    ResizeStep,
    SettleStep,
    StartState,
    Timings,
    WorkloadImpact,
)
from dynamem.resize import kernel_log, resize
from dynamem.scenario import Scenario, Step
from dynamem.steps import free_step, oom_step, reboot_step
from dynamem.units import format_size
from dynamem.workloads import Impact, impact_during, touch_and_free
from dynamem.workloads import make as make_workload


@dataclass(frozen=True)
class Cell:
    scenario: Scenario
    repeat: int

    @property
    def id(self) -> str:
        return f"{self.scenario.name}-r{self.repeat}"


class WorkloadDied(DynamemError):
    """The workload's processes are gone before the steps ended (e.g. the OOM killer)."""


def guest_condition_label(guest: str) -> str:
    """The guest's label for the condition; its name alone if it cannot be read (the cell
    then fails in planning, with the reason)."""
    try:
        return guest_label(guest)
    except DynamemError:
        return guest


def plan_for(mech: Mechanism, mplan: MemoryPlan, **vm_options: Any) -> Plan:
    """The VM a mechanism's memory plan needs: boot RAM, maxmem and slots, devices."""
    maxmem, slots = mech.memory_options(mplan)
    return plan_vm(
        memory=mplan.boot,
        maxmem=maxmem,
        slots=slots,
        extra_args=mech.qemu_args(mplan),
        mechanism=mech.name,
        kernel_args=tuple(vm_options.pop("kernel_args", ())) + mech.kernel_args(),
        **vm_options,
    )


def host_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def context_of(plan: Plan, vm: VM, mplan: MemoryPlan) -> CellContext:
    """What this cell's guest really was, so its numbers are never read out of context."""
    c = plan.config
    return CellContext(
        accel=plan.accel.accel,
        accel_reason=plan.accel.reason,
        qemu_version=".".join(map(str, plan.qemu_version)),
        guest_kernel=vm.kernel_release or "unknown",
        guest_image=str(plan.image.manifest.get("cache_key") or "") or None,
        host_kernel=platform.release(),
        host_cpu=host_cpu_model(),
        cpus=c.cpus,
        boot_memory=c.memory,
        maxmem=c.maxmem,
        slots=c.slots,
        memhp_default_state=c.memhp_default_state,
        swap=c.swap,
        swap_size=c.swap_size if c.swap != "none" else 0,
        kernel_cmdline=c.cmdline,
        before_bytes=mplan.before,
        dynamem_version=__version__,
        boot_kernel_log=hotplug_log_lines("\n".join(kernel_log(vm))),
        cpu_model=c.cpu_model,
        start="snapshot" if vm.restore is not None else "boot",
        state=StartState(**vm.restore.describe()) if vm.restore is not None else None,
    )


def prepare(
    vm: VM, mech: Mechanism, mplan: MemoryPlan, *, warmup: bool, deadline_s: float = 120.0
) -> tuple[ResizeRecord | None, float, float]:
    """Bring the guest to `mplan.before` (plug or inflate, unmeasured), then optionally do
    the steps once and undo them, so the measured pass does not pay first-time costs.

    Returns (the preparation record, seconds preparing, seconds warming up). A warm-up step
    that does not complete ends the warm-up; only completed steps are undone, so the
    measured steps start from `before` either way.
    """
    prep = None
    stall = mech.no_progress_s
    t0 = time.monotonic()
    if mplan.prepare:  # watched cheaply: nothing of it is measured
        prep = resize(
            vm, mech, mplan.prepare, deadline_s=deadline_s, stall_s=stall, observer="minimal"
        )
        if prep.outcome != "ok":
            raise VMError(
                f"preparation ({format_size(abs(mplan.prepare))} "
                f"{'plug' if mplan.prepare > 0 else 'inflate'}) did not complete: "
                f"{prep.outcome} {prep.message}"
            )
    t1 = time.monotonic()
    if warmup:
        done: list[int] = []
        for delta in mplan.deltas:
            warm = resize(vm, mech, delta, deadline_s=deadline_s, stall_s=stall, observer="minimal")
            if warm.outcome != "ok":
                break
            done.append(delta)
        for delta in reversed(done):
            undo = resize(
                vm, mech, -delta, deadline_s=deadline_s, stall_s=stall, observer="minimal"
            )
            if undo.outcome != "ok":
                raise VMError(f"undoing a warm-up step did not complete: {undo.message}")
        off = _off_path(vm, mech, mplan.before)
        if off:  # e.g. a warm-up step that stopped half-way: the measured steps cannot start
            raise VMError(f"after the warm-up, {off.removeprefix('not attempted: ')}")
    return prep, t1 - t0, time.monotonic() - t1


def _memtotal_kb(vm: VM) -> int | None:
    try:
        return parse_meminfo(vm.sampler.snapshot(["/proc/meminfo"])["/proc/meminfo"])["MemTotal"]
    except (DynamemError, KeyError):
        return None


def _oom_kills(vm: VM) -> int | str:
    try:
        vmstat = vm.sampler.snapshot(["/proc/vmstat"])["/proc/vmstat"]
    except DynamemError:
        return "unknown"
    return parse_vmstat(vmstat).get("oom_kill", 0)


def _other_step(
    vm: VM, mech: Mechanism, workload: Any, step: Step
) -> SettleStep | FreeStep | OomStep | RebootStep:
    record: SettleStep | FreeStep | OomStep | RebootStep
    if step.kind == "settle":
        time.sleep(step.seconds)
        record = SettleStep(seconds=step.seconds)
    elif step.kind == "free":
        record = free_step(vm, workload, step.seconds)
    elif step.kind == "oom":
        record = oom_step(vm, mech, step.size)
    elif step.kind == "reboot":
        record = reboot_step(vm, mech)
    else:
        raise ValueError(f"unknown step {step}")
    record.step = str(step)
    return record


def _off_path(vm: VM, mech: Mechanism, size: int) -> str:
    """Why the guest is not where the plan puts it before a resize ('' if it is)."""
    expected, actual = mech.host_bytes_at(size), mech.host_bytes(vm)
    if actual == expected:
        return ""
    return (
        f"not attempted: QEMU reports {format_size(actual)} where the plan expects "
        f"{format_size(expected)} before this step (an earlier step did not complete)"
    )


def _skipped(mech: Mechanism, step: Step, reason: str) -> ResizeStep:
    return ResizeStep(
        mechanism=mech.name,
        variant=mech.variant,
        direction="grow" if step.delta > 0 else "shrink",
        requested_bytes=step.delta,
        outcome="skipped",
        message=reason,
        mechanism_config=mech.describe(),
        step=str(step),
    )


def _impact(vm: VM, log: dict[str, Any], step: ResizeStep) -> WorkloadImpact | None:
    """The resize's window read off the impact probe's log (the guest clock mapped to the
    host's by the sampler's timestamps)."""
    if step.t_request_ns is None:
        return None
    samples = vm.sampler.samples[-2000:]
    offset = int(np.median([s.arrival_ns - s.guest_ns for s in samples])) if samples else 0
    done = step.t_guest_done_ns or step.t_host_done_ns
    return impact_during(log, offset, step.t_request_ns, done)


def qemu_version_text(qemu: str) -> str:
    try:
        return ".".join(map(str, qemu_version(qemu)))
    except DynamemError:
        return "unknown"  # a cell's plan fails on it and says why


def _host(worker: str, qemu: str, accel_name: str) -> HostInfo:
    return placement.host_info(worker, host_cpu_model(), accel_name, qemu_version_text(qemu))


def run_cell(
    cell: Cell,
    *,
    accel_request: str | None,
    qemu: str,
    guest: str,
    accel: str,
    worker: str = "serial",
) -> CellRecord:
    """One cell; returns its typed record (time series in its steps). `accel` is the
    accelerator the run chose, the cell's condition even if its own planning fails;
    `worker` is who runs it (a Dask worker's name), on the CPUs the calling thread may use."""
    s = cell.scenario
    t0 = time.monotonic()
    timings = Timings()
    host = _host(worker, qemu, accel)
    record = CellRecord(
        cell=cell.id,
        scenario=s.name,
        repeat=cell.repeat,
        mechanism=s.mechanism_config(),
        condition=s.condition(accel, guest_condition_label(guest)),
        timings=timings,
        reproduces=s.reproduces,
        scenario_config=dict(s.raw),
        host=host,
    )
    vm: VM | None = None
    phase = "plan"  # where a failure happened, recorded with it
    inject = Injector(s.fault_for(cell.repeat))
    try:
        unbound = s.mechanism_object()
        mplan = s.memory_plan(unbound)
        mech = unbound.with_plan(mplan)
        plan = plan_for(
            mech, mplan, guest=guest, cpus=s.cpus, accel_request=accel_request, qemu=qemu,
            memhp_default_state=s.memhp_default_state, kernel_args=s.kernel_args,
            swap=s.swap, swap_size=s.swap_size, cpu=s.cpu_model,
            data_size=s.workload_size if s.workload == "pagecache" else 0,
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            started = None
            if s.start == "snapshot":
                phase = "start from the saved state"  # the first cell of a configuration builds it
                started = snapshot.start(plan.config, stack)
                vm = started.vm
                timings.state_build, timings.boot = started.fetch_s, started.boot_s
            else:
                phase = "boot"
                vm = stack.enter_context(VM(plan.config))
                t = time.monotonic()
                vm.start()
                timings.boot = time.monotonic() - t
            record.context = context_of(plan, vm, mplan)
            host.qemu_cpus = sorted(os.sched_getaffinity(vm.pid))  # the pinning, as applied
            if started is not None and record.context.state is not None:
                record.context.state.built_here = started.built
                record.context.state.replaced = started.replaced
            phase = "preparation"
            record.preparation, timings.preparation, timings.warmup = prepare(
                vm, mech, mplan, warmup=s.warmup, deadline_s=s.deadline
            )
            record.context.memtotal_start_kb = _memtotal_kb(vm)
            if s.touch:
                phase = "touch"
                touch_and_free(vm, s.touch)
            phase = "workload start"
            workload = make_workload(s.workload, s.workload_size)
            inject.before_workload(vm)
            timings.workload_start = workload.start(vm, timeout=s.deadline)
            record.workload_ready_s = timings.workload_start
            t = time.monotonic()
            load = placement.mark()
            sizes = iter(mplan.path)
            for k, step in enumerate(s.steps):
                phase = f"step {k} ({step})"
                if step.kind == "resize":
                    off_path = _off_path(vm, mech, next(sizes))
                    if off_path:  # not attempted: no fault goes into it either
                        record.steps.append(_skipped(mech, step, off_path))
                        continue
                    inject.before_step(k, vm, mech)
                    r = resize(
                        vm, mech, step.delta, deadline_s=s.deadline,
                        stall_s=mech.no_progress_s, observer=s.observer,
                    )  # fmt: skip
                    mech.after_request.clear()  # a hook never outlives its step
                    done = ResizeStep.of(str(step), r)
                    if isinstance(workload, Impact):  # what the workload felt, as it ends
                        done.cost.workload = _impact(vm, workload.log_so_far(vm), done)
                    record.steps.append(done)
                else:
                    inject.before_step(k, vm, mech)
                    record.steps.append(_other_step(vm, mech, workload, step))
                vm.check_health()
            timings.steps = time.monotonic() - t
            host.load = placement.load_since(load, host.cpus)
            phase = "workload stop"
            # (a free step stops the workload on purpose; an oom step may kill it)
            expect_alive = not any(step.kind in ("oom", "free") for step in s.steps)
            if expect_alive and not workload.alive(vm):
                raise WorkloadDied(
                    f"workload {s.workload} died during the steps (guest OOM kills so far: "
                    f"{_oom_kills(vm)})"
                )
            workload.stop(vm)
            record.status = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded outcome
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DynamemError) else str(exc)
        reason = vm.diagnosis if vm is not None else None
        record.failed_at = phase
        known = reason is None or reason in message
        record.error = f"{phase}: " + (message if known else f"{reason}; {message}")
        if vm is not None:
            record.console_tail = vm.console()[-3000:]
    if inject.fault is not None:
        record.injected = Injected(fault=str(inject.fault), fired=inject.fired)
    timings.total = time.monotonic() - t0
    timings.overhead = timings.total - sum(
        (
            timings.state_build,
            timings.boot,
            timings.preparation,
            timings.warmup,
            timings.workload_start,
            timings.steps,
        )
    )
    return record


def resize_summary(record: CellRecord) -> str:
    """`dynamem resize`'s text: the measured step, what it cost, and its context."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f} ms"

    def size(x: int | None) -> str:
        return "-" if x is None else ("-" if x < 0 else "+") + format_size(abs(x))

    steps = record.resizes()
    if not steps:
        return f"{record.mechanism.label}: no resize measured ({record.error or record.status})"
    r = steps[0][1]
    lines = [
        f"{r.label} {r.direction} {size(r.requested_bytes)}: {r.outcome}"
        + (f" ({r.message})" if r.message else ""),
        f"  host:  {size(r.host_done_bytes)} done, completion after {ms(r.host_latency_s)} "
        f"(polled every {ms(r.poll_period_median_s)})",
        f"  guest: MemTotal {size(r.guest_memtotal_delta_bytes)}"
        + (
            f", balloon {size(r.guest_balloon_delta_bytes)}"
            if r.guest_balloon_delta_bytes is not None
            else ""
        )
        + f", visible after {ms(r.guest_latency_s)} (at most {ms(r.guest_bound_s)} earlier)",
        f"  memory blocks before {r.memory_blocks_before} after {r.memory_blocks_after}",
    ]
    g, h = r.cost.guest, r.cost.host
    if g is not None:
        moved = [z.split("/")[-1] for z, m in g.watermarks_moved.items() if m]
        lines.append(
            f"  cost:  {g.pages_migrated} pages migrated, swap out/in {g.swap_out_pages}/"
            f"{g.swap_in_pages} pages, {g.compaction_stalls} compaction stalls, "
            f"{g.oom_kills} OOM kills; watermarks recomputed in: {', '.join(moved) or 'none'}"
        )
    if h is not None:
        settle = "-" if h.rss_settle_s is None else f"{h.rss_settle_s:.2f} s"
        thp = f"{h.anon_huge_before_kb >> 10} -> {h.anon_huge_after_kb >> 10} MiB"
        lines.append(
            f"  rss:   QEMU RSS {-h.rss_reclaimed_bytes / 2**20:+.1f} MiB (settled after "
            f"{settle}), AnonHugePages {thp}"
        )
    ctx = record.context
    if ctx is not None:
        lines.append(
            f"  {ctx.accel}, -cpu {ctx.cpu_model}, QEMU {ctx.qemu_version}, guest "
            f"{ctx.guest_kernel}"
        )
    if not record.ok:
        lines.append(f"  cell failed: {record.error}")
    return "\n".join(lines)
