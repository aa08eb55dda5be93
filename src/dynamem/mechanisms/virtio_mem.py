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
# Linux's memory block on x86-64 guests below 64 GiB of boot memory. The driver only
# plugs inside whole blocks that lie in the device's region: a region of 64 MiB plugs
# nothing, one of 192 MiB at most 128 MiB. So the region is sized in whole blocks.
LINUX_MEMORY_BLOCK = 128 * MiB
# Linux retries an unplug that failed with -EBUSY after 50 s, then 100 s later (doubling
# up to 300 s): a no-progress limit of 160 s lets the first two retries happen.
RETRY_AWARE_NO_PROGRESS_S = 160.0


def _round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


class VirtioMem(Mechanism):
    name = "virtio-mem"
    driver_entry = "virtio_mem_config_changed"  # the config-change interrupt: a new requested size
    driver_done = "memory_notify"
    no_progress_default_s = RETRY_AWARE_NO_PROGRESS_S

    def __init__(self, variant: str = "sbm", block_size: int | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown virtio-mem variant {variant!r} (choose from sbm, bbm)")
        self._variant = variant
        self.block_size = block_size or VARIANTS[variant]
        if variant == "sbm" and self.block_size >= 128 * MiB:
            raise UserError("Sub-Block Mode needs a device block size below 128 MiB")
        if variant == "bbm" and self.block_size < 128 * MiB:
            raise UserError("Big Block Mode needs a device block size of at least 128 MiB")

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
        needed = max(self._path(before, deltas)) - boot
        unit = max(self.block_size, LINUX_MEMORY_BLOCK)
        if maxmem is None:
            region = _round_up(max(capacity, self.block_size), unit)
        else:
            region = capacity // unit * unit
            if region < needed or region == 0:
                raise UserError(
                    f"the virtio-mem region maxmem - boot = {format_size(maxmem - boot)} holds "
                    f"{region // LINUX_MEMORY_BLOCK} whole {format_size(LINUX_MEMORY_BLOCK)} "
                    f"memory blocks ({format_size(region)}); the steps need "
                    f"{format_size(needed)} and the guest plugs only inside whole blocks"
                )
        return MemoryPlan(boot=boot, before=before, deltas=deltas, capacity=region)

    @staticmethod
    def _path(before: int, deltas: tuple[int, ...]) -> list[int]:
        return MemoryPlan(boot=0, before=before, deltas=deltas, capacity=0).path

    def memory_options(self, plan: MemoryPlan) -> tuple[int | None, int]:
        return plan.boot + plan.capacity, 0

    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        return (
            "-object", f"memory-backend-ram,id=vmem0,size={plan.capacity}",
            "-device",
            f"virtio-mem-pci,id={DEVICE},memdev=vmem0,block-size={self.block_size},"
            "requested-size=0",
        )  # fmt: skip

    def host_bytes(self, vm: "VM") -> int:
        return int(vm.qmp("qom-get", path=DEVICE, property="size"))

    def _send(self, vm: "VM", delta: int, start: int) -> Request:
        target = start + delta
        region = self.planned().capacity
        if not 0 <= target <= region:
            raise UserError(
                f"virtio-mem requested-size {format_size(target)} is outside 0.."
                f"{format_size(region)} (the memory backend)"
            )
        vm.qmp("qom-set", path=DEVICE, property="requested-size", value=target)
        return Request(target=target, start=start)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "block_size": self.block_size,
            "backend_size": self.mplan.capacity if self.mplan else None,
        }
