"""pc-dimm ACPI hotplug: grow plugs whole DIMMs, shrink ejects them (the guest may refuse).

The guest answers an eject through ACPI `_OST`. QEMU keeps the last `_OST` status per slot
and does not clear it on a new `device_del`, so a status read by polling may belong to an
earlier eject. Every `_OST` write also emits an ACPI_DEVICE_OST event, so a refusal is
judged only from events that arrive after this request (or from a slot status that
changed since just before it), never from a status that was already there.
"""

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
# progress; 0x1 non-specific failure, 0x80 not supported, 0x81 in use, 0x82 busy (what Linux
# reports when it cannot offline the memory), 0x83 dependency busy: failures.
OST_EJECT = 3
OST_OK = (0, 0x84)
EVENTS = ["DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", "ACPI_DEVICE_OST"]
OSPM_PERIOD_S = 0.02  # how often to read _OST status while ejects are pending
LINUX_MEMORY_BLOCK = 128 * MiB


def ost_refusals(
    statuses: list[dict[str, Any]], pending: list[str], before: dict[str, tuple[int, int]]
) -> list[tuple[str, int]]:
    """(device, status) of pending ejects the guest refused, from `query-acpi-ospm-status`
    entries that differ from what the slot held before the request (pure)."""
    out = []
    for st in statuses:
        name = st.get("device")
        if name not in pending or st.get("source") != OST_EJECT:
            continue
        now = (int(st["source"]), int(st["status"]))
        if now[1] not in OST_OK and before.get(str(name)) != now:
            out.append((str(name), now[1]))
    return out


def event_refusal(event: dict[str, Any], pending: list[str]) -> tuple[str, str] | None:
    """(device, reason) if this QMP event says the guest refused a pending eject (pure)."""
    data: dict[str, Any] = event.get("data") or {}
    kind = event.get("event")
    if kind == "DEVICE_UNPLUG_GUEST_ERROR":
        name = data.get("device") or str(data.get("path", "")).rsplit("/", 1)[-1]
        if name in pending:
            return str(name), "the guest refused the ACPI eject"
    elif kind == "ACPI_DEVICE_OST":
        info: dict[str, Any] = data.get("info") or {}
        name = info.get("device")
        if (
            name in pending
            and info.get("source") == OST_EJECT
            and int(info.get("status", 0)) not in OST_OK
        ):
            return str(name), (
                f"the guest refused the ACPI eject (_OST status {int(info['status']):#x})"
            )
    return None


class Dimm(Mechanism):
    name = "dimm"
    # the ACPI Notify (device check, eject request) handed to the hotplug worker
    driver_entry = "acpi_hotplug_schedule"
    driver_done = "memory_notify"

    def __init__(self, dimm_size: int = 128 * MiB) -> None:
        super().__init__()
        if dimm_size <= 0 or dimm_size % LINUX_MEMORY_BLOCK:
            raise UserError(
                f"DIMM size {format_size(dimm_size)} must be a multiple of the Linux memory "
                f"block size {format_size(LINUX_MEMORY_BLOCK)}"
            )
        self.dimm_size = dimm_size
        self._fresh()

    def _fresh(self) -> None:
        self._plugged: list[str] = []  # DIMM ids, oldest first
        self._next_id = 0
        self._ost_before: dict[str, tuple[int, int]] = {}

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
        slots = max(1, capacity // self.dimm_size)
        if slots > MAX_SLOTS:
            raise UserError(
                f"{format_size(capacity)} of {format_size(self.dimm_size)} DIMMs needs "
                f"{slots} slots; QEMU has at most {MAX_SLOTS}"
            )
        return MemoryPlan(boot=boot, before=before, deltas=deltas, capacity=capacity, slots=slots)

    def memory_options(self, plan: MemoryPlan) -> tuple[int | None, int]:
        return plan.boot + plan.slots * self.dimm_size, plan.slots

    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        return ()

    def host_first(self, delta: int) -> bool:
        # device_add returns with the DIMM in place; the guest's ACPI work follows. Looks
        # in the request's few milliseconds only competed with QEMU's main loop: under TCG
        # they made a 256 MiB grow's host side 1.46x a bare script's (`selfbench resize`,
        # idle 1 GiB, n=10; 0.99x with no looks in the window).
        return delta > 0

    def _dimms(self, vm: "VM") -> dict[str, int]:
        """DIMMs QEMU has now: id -> size."""
        devices = vm.qmp("query-memory-devices")
        return {d["data"].get("id"): int(d["data"]["size"]) for d in devices if d["type"] == "dimm"}

    def host_bytes(self, vm: "VM") -> int:
        return sum(self._dimms(vm).values())

    def before_request(self, vm: "VM") -> None:
        """The slots' last _OST status before the request (QEMU keeps it per slot), and DIMMs
        an earlier eject removed late (after its request ended) forgotten, their backends
        deleted."""
        self._reconcile(vm)
        self._ost_before = {
            str(st.get("device")): (int(st["source"]), int(st["status"]))
            for st in vm.qmp("query-acpi-ospm-status")
            if st.get("device")
        }

    def _reconcile(self, vm: "VM") -> None:
        present = self._dimms(vm)
        for dimm_id in [d for d in self._plugged if d not in present]:
            self._plugged.remove(dimm_id)
            vm.qmp("object-del", id=f"{dimm_id}-mem")

    def _send(self, vm: "VM", delta: int, start: int) -> Request:
        count = abs(delta) // self.dimm_size
        req = Request(target=start + delta, start=start)
        slots = self.planned().slots
        if delta > 0:
            if len(self._plugged) + count > slots:
                raise UserError(
                    f"no free DIMM slot: {len(self._plugged)} of {slots} in use, "
                    f"{count} more asked for"
                )
            for k in range(count):
                try:
                    self._add_one(vm)
                except QMPCommandError as exc:
                    if k == 0:
                        raise  # nothing plugged: the request was refused
                    # k DIMMs are in: the step ends there, partial.
                    req.refused.append(f"DIMM {k + 1} of {count}: {exc.desc}")
                    break
            return req
        if count > len(self._plugged):
            raise UserError(f"only {len(self._plugged)} DIMMs are plugged; cannot unplug {count}")
        victims = self._plugged[-count:]
        req.extra["ost_before"] = dict(self._ost_before)
        req.extra["listener"] = vm.monitor.listen(EVENTS)
        for dimm_id in reversed(victims):
            try:
                vm.qmp("device_del", id=dimm_id)
                req.pending.append(dimm_id)
            except QMPCommandError as exc:
                req.refused.append(f"{dimm_id}: {exc.desc}")
        return req

    def _add_one(self, vm: "VM") -> None:
        dimm_id = f"dimm{self._next_id}"
        self._next_id += 1
        backend = {"qom-type": "memory-backend-ram", "id": f"{dimm_id}-mem", "size": self.dimm_size}
        vm.qmp_args("object-add", backend)
        try:
            vm.qmp("device_add", driver="pc-dimm", id=dimm_id, memdev=f"{dimm_id}-mem")
        except QMPCommandError:
            vm.qmp("object-del", id=f"{dimm_id}-mem")
            raise
        self._plugged.append(dimm_id)

    def poll(self, vm: "VM", req: Request) -> Progress:
        if listener := req.extra.get("listener"):
            for event in vm.monitor.drain(listener):
                if event["event"] == "DEVICE_DELETED":
                    data = event.get("data")
                    device = data.get("device") if isinstance(data, dict) else None
                    if device in req.pending:
                        req.pending.remove(device)
                elif refusal := event_refusal(dict(event), req.pending):
                    req.pending.remove(refusal[0])
                    req.refused.append(f"{refusal[0]}: {refusal[1]}")
        now = time.monotonic()
        if req.pending and "ost_before" in req.extra and now >= req.extra.get("next_ospm", 0.0):
            # A fallback for a lost event: only a slot status that changed since the request.
            req.extra["next_ospm"] = now + OSPM_PERIOD_S
            before: dict[str, tuple[int, int]] = req.extra["ost_before"]
            for name, status in ost_refusals(vm.qmp("query-acpi-ospm-status"), req.pending, before):
                req.pending.remove(name)
                req.refused.append(
                    f"{name}: the guest refused the ACPI eject (_OST status {status:#x})"
                )
        dimms = self._dimms(vm)
        req.pending[:] = [d for d in req.pending if d in dimms]  # events are hints; QOM rules
        host = sum(dimms.values())
        shrink = req.target < req.start
        # A grow is done on the host once device_add returned (synchronous); one that
        # stopped early (a failed device_add) is done with what it plugged.
        done = host == req.target or (not req.pending if shrink else bool(req.refused))
        return Progress(host, done, tuple(req.refused))

    def finish(self, vm: "VM", req: Request) -> None:
        if listener := req.extra.pop("listener", None):
            vm.monitor.unlisten(listener)
        self._reconcile(vm)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "dimm_size": self.dimm_size,
            "slots": self.mplan.slots if self.mplan else None,
        }
