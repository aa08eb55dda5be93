"""`dynamem resize`: one fresh guest, an unmeasured preparation step if needed, one
measured resize, and the record with its context."""

import platform
from dataclasses import dataclass, field
from typing import Any

from dynamem import __version__
from dynamem.errors import VMError
from dynamem.launch import Plan, plan_vm
from dynamem.mechanisms import Mechanism, MemoryPlan
from dynamem.parsers import hotplug_log_lines
from dynamem.qemu.machine import VM
from dynamem.resize import ResizeResult, resize
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
        context["boot_kernel_log"] = hotplug_log_lines(vm.run(["dmesg"], timeout=30).stdout)
        prep = None
        if mplan.prepare:
            prep = resize(vm, mech, mplan.prepare)
            if prep.outcome != "ok":
                vm.mark_failed()
                raise VMError(
                    f"preparation ({format_size(abs(mplan.prepare))} "
                    f"{'plug' if mplan.prepare > 0 else 'inflate'}) did not complete: "
                    f"{prep.outcome} {prep.message}"
                )
        if warmup:
            for step in (mplan.delta, -mplan.delta):
                if resize(vm, mech, step).outcome != "ok":
                    vm.mark_failed()
                    raise VMError("the warm-up step did not complete")
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
