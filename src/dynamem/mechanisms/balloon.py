"""virtio-balloon: shrink inflates, grow deflates, and only back up to boot RAM."""

from typing import TYPE_CHECKING, Any

from dynamem.errors import UserError
from dynamem.mechanisms.base import (
    CapabilityLimit,
    Mechanism,
    MemoryPlan,
    Request,
    check_sizes,
)
from dynamem.units import format_size

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM

PAGE = 4096


class Balloon(Mechanism):
    name = "balloon"
    driver_entry = "virtballoon_changed"  # the config-change interrupt: a new target size

    def __init__(self, deflate_on_oom: bool = False, free_page_reporting: bool = False) -> None:
        super().__init__()
        self.deflate_on_oom = deflate_on_oom
        self.free_page_reporting = free_page_reporting

    @property
    def variant(self) -> str:
        opts = [
            o for o, on in (("doo", self.deflate_on_oom), ("fpr", self.free_page_reporting)) if on
        ]
        return "+".join(opts) or "default"

    @property
    def granularity(self) -> int:
        return PAGE

    def plan_path(
        self,
        before: int,
        deltas: tuple[int, ...],
        boot: int | None,
        maxmem: int | None,
        *,
        strict: bool = True,
    ) -> MemoryPlan:
        check_sizes(before, deltas, boot, maxmem)
        boot = before if boot is None else boot
        for delta in deltas:
            self.check_aligned(delta, "resize")
        if before > boot:
            raise UserError(
                f"the balloon cannot start at {format_size(before)}: above boot RAM "
                f"{format_size(boot)}"
            )
        plan = MemoryPlan(boot=boot, before=before, deltas=deltas, capacity=0)
        if strict and max(plan.path) > boot:
            raise CapabilityLimit(
                f"virtio-balloon cannot grow the guest to {format_size(max(plan.path))}: "
                f"above its boot RAM {format_size(boot)} (it can only deflate what it inflated)"
            )
        if min(plan.path) <= 0:
            raise UserError(
                f"cannot shrink a {format_size(before)} guest to {format_size(min(plan.path))}"
            )
        return plan

    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        dev = (
            "virtio-balloon-pci,id=balloon0"
            f",deflate-on-oom={'on' if self.deflate_on_oom else 'off'}"
            f",free-page-reporting={'on' if self.free_page_reporting else 'off'}"
        )
        return ("-device", dev)

    @property
    def guest_signal(self) -> str:
        # Without deflate-on-oom the driver adjusts managed pages, so MemTotal shows the
        # balloon and the sampler can stay on cheap sysinfo; with it, MemTotal never moves
        # and only the balloon's own vmstat counters do.
        return "balloon" if self.deflate_on_oom else "totalram"

    def vmstat_keys(self) -> tuple[str, ...]:
        return ("balloon_inflate", "balloon_deflate") if self.deflate_on_oom else ()

    def host_bytes(self, vm: "VM") -> int:
        return int(vm.qmp("query-balloon")["actual"])

    def host_bytes_at(self, size: int) -> int:
        return size  # the logical size of the VM

    def _send(self, vm: "VM", delta: int, start: int) -> Request:
        target = start + delta
        boot = self.planned().boot
        if target > boot:
            raise CapabilityLimit(
                f"virtio-balloon cannot grow the guest to {format_size(target)}: above its "
                f"boot RAM {format_size(boot)}"
            )
        # QMP `balloon` takes the target logical size of the VM, not the balloon's size.
        vm.qmp("balloon", value=target)
        return Request(target=target, start=start)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "deflate_on_oom": self.deflate_on_oom,
            "free_page_reporting": self.free_page_reporting,
        }
