"""`dynamem resize`: one fresh guest, an unmeasured preparation step if needed, one
measured resize, and the record with its context."""

import platform
import time
from dataclasses import dataclass, field
from typing import Any

from dynamem import __version__
from dynamem.errors import VMError
from dynamem.launch import Plan, plan_vm
from dynamem.mechanisms import Mechanism, MemoryPlan
from dynamem.parsers import hotplug_log_lines
from dynamem.qemu.machine import VM
from dynamem.resize import ResizeResult, kernel_log, resize
from dynamem.units import format_size
from dynamem.workloads import Stress, touch_and_free


@dataclass
class SingleResize:
    result: ResizeResult
    context: dict[str, Any] = field(default_factory=dict)
    preparation: ResizeResult | None = None

    def to_dict(self, *, series: bool = False) -> dict[str, Any]:
        return {
            "context": self.context,
            "preparation": self.preparation.to_dict() if self.preparation else None,
            "result": self.result.to_dict(series=series),
        }


def plan_for(mech: Mechanism, mplan: MemoryPlan, **vm_options: Any) -> Plan:
    maxmem, slots = mech.memory_options(mplan)
    return plan_vm(
        memory=mplan.boot,
        maxmem=maxmem,
        slots=slots,
        extra_args=mech.qemu_args(mplan),
        kernel_args=tuple(vm_options.pop("kernel_args", ())) + mech.kernel_args(),
        **vm_options,
    )


def context_of(plan: Plan, vm: VM, mplan: MemoryPlan) -> dict[str, Any]:
    """Everything a result must carry so it is never compared out of context."""
    return {
        "accel": plan.accel.accel,
        "accel_reason": plan.accel.reason,
        "qemu_version": ".".join(map(str, plan.qemu_version)),
        "guest_kernel": vm.kernel_release,
        "guest_image": plan.image.manifest.get("cache_key"),
        "host_kernel": platform.release(),
        "host_cpu": cpu_model(),
        "cpus": plan.config.cpus,
        "boot_memory": plan.config.memory,
        "maxmem": plan.config.maxmem,
        "slots": plan.config.slots,
        "memhp_default_state": plan.config.memhp_default_state,
        "swap": plan.config.swap,
        "swap_size": plan.config.swap_size if plan.config.swap != "none" else 0,
        "kernel_cmdline": plan.config.cmdline,
        "before_bytes": mplan.before,
        "dynamem_version": __version__,
        "boot_kernel_log": hotplug_log_lines("\n".join(kernel_log(vm))),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def prepare(
    vm: VM, mech: Mechanism, mplan: MemoryPlan, *, warmup: bool, deadline_s: float = 120.0
) -> tuple[ResizeResult | None, float, float]:
    """Bring the guest to `mplan.before` (plug or inflate, unmeasured), then optionally do
    the steps once and undo them, so the measured pass does not pay first-time costs.

    Returns (the preparation record, seconds preparing, seconds warming up). A warm-up step
    that does not complete ends the warm-up; only completed steps are undone, so the
    measured steps start from `before` either way.
    """
    prep = None
    t0 = time.monotonic()
    if mplan.prepare:
        prep = resize(vm, mech, mplan.prepare, deadline_s=deadline_s)
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
            if resize(vm, mech, delta, deadline_s=deadline_s).outcome != "ok":
                break
            done.append(delta)
        for delta in reversed(done):
            undo = resize(vm, mech, -delta, deadline_s=deadline_s)
            if undo.outcome != "ok":
                raise VMError(f"undoing a warm-up step did not complete: {undo.message}")
    return prep, t1 - t0, time.monotonic() - t1


def run_single(
    mech: Mechanism,
    mplan: MemoryPlan,
    *,
    ready_timeout: float = 180.0,
    touch: int = 0,
    stress: int = 0,
    warmup: bool = False,
    **vm_options: Any,
) -> SingleResize:
    """Boot, prepare, optionally warm up (the same step and back, unmeasured), optionally
    touch-and-free memory or hold a stress working set, then measure one resize."""
    plan = plan_for(mech, mplan, **vm_options)
    with VM(plan.config) as vm:
        vm.start(ready_timeout=ready_timeout)
        context = context_of(plan, vm, mplan)
        prep, _, _ = prepare(vm, mech, mplan, warmup=warmup)
        if touch:
            touch_and_free(vm, touch)
        workload = Stress(stress) if stress else None
        if workload is not None:
            context["stress_ready_s"] = workload.start(vm)
        context["workload"] = {"stress_bytes": stress, "touched_bytes": touch, "warmup": warmup}
        result = resize(vm, mech, mplan.delta)
        if workload is not None:
            workload.stop(vm)
        return SingleResize(result, context, prep)
