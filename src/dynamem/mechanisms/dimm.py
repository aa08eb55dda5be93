"""pc-dimm ACPI hotplug: grow plugs whole DIMMs, shrink ejects them (the guest may refuse)."""

import time
from typing import TYPE_CHECKING, Any

from dynamem.errors import UserError
from dynamem.mechanisms.base import Mechanism, MemoryPlan, Progress, Request
from dynamem.qemu.monitor import QMPCommandError
from dynamem.units import MiB, format_size

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM

MAX_SLOTS = 256
# ACPI _OST for an eject request (source 3), per the ACPI spec: 0 success, 0x84 ejection in
# progress; 0x80 not supported, 0x81 in use, 0x82 busy (what Linux reports when it cannot
# offline the memory), 0x83 dependency busy: failures.
OST_EJECT = 3
OST_OK = (0, 0x84)
OSPM_PERIOD_S = 0.02  # how often to read _OST status while ejects are pending
LINUX_MEMORY_BLOCK = 128 * MiB


class Dimm(Mechanism):
    name = "dimm"

    def __init__(self, dimm_size: int = 128 * MiB) -> None:
        if dimm_size <= 0 or dimm_size % LINUX_MEMORY_BLOCK:
            raise UserError(
                f"DIMM size {format_size(dimm_size)} must be a multiple of the Linux memory "
                f"block size {format_size(LINUX_MEMORY_BLOCK)}"
            )
        self.dimm_size = dimm_size
        self.slots = 0
        self._plugged: list[str] = []  # DIMM ids, oldest first
        self._next_id = 0

    @property
    def granularity(self) -> int:
        return self.dimm_size

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
        self.slots = max(1, capacity // self.dimm_size)
        if self.slots > MAX_SLOTS:
            raise UserError(
                f"{format_size(capacity)} of {format_size(self.dimm_size)} DIMMs needs "
                f"{self.slots} slots; QEMU has at most {MAX_SLOTS}"
            )
        return MemoryPlan(boot=boot, before=before, deltas=deltas, capacity=capacity)

    def memory_options(self, plan: MemoryPlan) -> tuple[int | None, int]:
        return plan.boot + self.slots * self.dimm_size, self.slots

    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        return ()

    def _dimms(self, vm: "VM") -> dict[str, int]:
        """DIMMs QEMU has now: id -> size."""
        devices = vm.qmp("query-memory-devices")
        return {d["data"].get("id"): int(d["data"]["size"]) for d in devices if d["type"] == "dimm"}

    def host_bytes(self, vm: "VM") -> int:
        return sum(self._dimms(vm).values())

    def request(self, vm: "VM", delta: int, start: int) -> Request:
        count = abs(delta) // self.dimm_size
        req = Request(target=start + delta, start=start)
        if delta > 0:
            if len(self._plugged) + count > self.slots:
                raise UserError(
                    f"no free DIMM slot: {len(self._plugged)} of {self.slots} in use, "
                    f"{count} more asked for"
                )
            for _ in range(count):
                dimm_id = f"dimm{self._next_id}"
                self._next_id += 1
                backend = {
                    "qom-type": "memory-backend-ram",
                    "id": f"{dimm_id}-mem",
                    "size": self.dimm_size,
                }
                vm.qmp_args("object-add", backend)
                vm.qmp("device_add", driver="pc-dimm", id=dimm_id, memdev=f"{dimm_id}-mem")
                self._plugged.append(dimm_id)
            return req
        if count > len(self._plugged):
            raise UserError(f"only {len(self._plugged)} DIMMs are plugged; cannot unplug {count}")
        victims = self._plugged[-count:]
        req.extra["listener"] = vm.monitor.listen(["DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"])
        for dimm_id in reversed(victims):
            try:
                vm.qmp("device_del", id=dimm_id)
                req.pending.append(dimm_id)
            except QMPCommandError as exc:
                req.refused.append(f"{dimm_id}: {exc.desc}")
        return req

    def poll(self, vm: "VM", req: Request) -> Progress:
        if listener := req.extra.get("listener"):
            for event in vm.monitor.drain(listener):
                data: dict[str, Any] = event.get("data", {})  # type: ignore[assignment]
                device = data.get("device")
                if event["event"] == "DEVICE_DELETED" and device in req.pending:
                    req.pending.remove(device)
                elif event["event"] == "DEVICE_UNPLUG_GUEST_ERROR":
                    path = str(data.get("path", ""))
                    name = device or path.rsplit("/", 1)[-1]
                    if name in req.pending:
                        req.pending.remove(name)
                        req.refused.append(f"{name}: the guest refused the ACPI eject")
        now = time.monotonic()
        if req.pending and now >= req.extra.get("next_ospm", 0.0):
            req.extra["next_ospm"] = now + OSPM_PERIOD_S
            # QEMU emits DEVICE_UNPLUG_GUEST_ERROR only for some _OST codes; the OSPM status
            # is the authoritative record of what the guest said.
            for st in vm.qmp("query-acpi-ospm-status"):
                name = st.get("device")
                if name in req.pending and st["source"] == OST_EJECT and st["status"] not in OST_OK:
                    req.pending.remove(name)
                    req.refused.append(
                        f"{name}: the guest refused the ACPI eject (_OST status {st['status']:#x})"
                    )
        dimms = self._dimms(vm)
        req.pending[:] = [d for d in req.pending if d in dimms]  # events are hints; QOM rules
        host = sum(dimms.values())
        return Progress(host, host == req.target or not req.pending, tuple(req.refused))

    def finish(self, vm: "VM", req: Request) -> None:
        if listener := req.extra.pop("listener", None):
            vm.monitor.unlisten(listener)
        present = self._dimms(vm)
        for dimm_id in [d for d in self._plugged if d not in present]:
            self._plugged.remove(dimm_id)
            vm.qmp("object-del", id=f"{dimm_id}-mem")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dimm_size": self.dimm_size, "slots": self.slots}
