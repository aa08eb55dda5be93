"""virtio-mem: one cold-plugged device, resized with `qom-set requested-size`.

Sub-Block Mode (device block 2 MiB, below the 128 MiB Linux memory block) and Big Block
Mode (device block >= 128 MiB) are variants of the same device.
"""

from typing import TYPE_CHECKING, Any

from dynamem.errors import UserError
from dynamem.mechanisms.base import Mechanism, MemoryPlan, Request
from dynamem.units import MiB, format_size

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM

VARIANTS = {"sbm": 2 * MiB, "bbm": 128 * MiB}
DEVICE = "vm0"


class VirtioMem(Mechanism):
    name = "virtio-mem"

    def __init__(self, variant: str = "sbm", block_size: int | None = None) -> None:
        if variant not in VARIANTS:
            raise UserError(f"unknown virtio-mem variant {variant!r} (choose from sbm, bbm)")
        self._variant = variant
        self.block_size = block_size or VARIANTS[variant]
        if variant == "sbm" and self.block_size >= 128 * MiB:
            raise UserError("Sub-Block Mode needs a device block size below 128 MiB")
        if variant == "bbm" and self.block_size < 128 * MiB:
            raise UserError("Big Block Mode needs a device block size of at least 128 MiB")
        self.backend_size = 0

    @property
    def variant(self) -> str:
        return self._variant

    @property
    def granularity(self) -> int:
        return self.block_size

    def plan_path(
        self,
        before: int,
        deltas: tuple[int, ...],
        boot: int | None,
        maxmem: int | None,
        *,
        strict: bool = True,
    ) -> MemoryPlan:
        boot, capacity = self.hotplug_range(before, deltas, boot, maxmem)
        self.backend_size = max(capacity, self.block_size)
        return MemoryPlan(boot=boot, before=before, deltas=deltas, capacity=self.backend_size)

    def memory_options(self, plan: MemoryPlan) -> tuple[int | None, int]:
        return plan.boot + self.backend_size, 0

    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        return (
            "-object", f"memory-backend-ram,id=vmem0,size={self.backend_size}",
            "-device",
            f"virtio-mem-pci,id={DEVICE},memdev=vmem0,block-size={self.block_size},"
            "requested-size=0",
        )  # fmt: skip

    def host_bytes(self, vm: "VM") -> int:
        return int(vm.qmp("qom-get", path=DEVICE, property="size"))

    def request(self, vm: "VM", delta: int, start: int) -> Request:
        target = start + delta
        if not 0 <= target <= self.backend_size:
            raise UserError(
                f"virtio-mem requested-size {format_size(target)} is outside 0.."
                f"{format_size(self.backend_size)} (the memory backend)"
            )
        vm.qmp("qom-set", path=DEVICE, property="requested-size", value=target)
        return Request(target=target, start=start)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "block_size": self.block_size,
            "backend_size": self.backend_size,
        }
