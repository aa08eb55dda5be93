"""Fault injection for the harness's own tests: real faults, in real guests, at known points.

A scenario may carry the hidden key `inject = "FAULT@WHERE"`. It is accepted only when the
environment holds `DYNAMEM_FAULT_INJECTION=1` (the fault tests set it); otherwise it is an
unknown key like any other, so a real suite can never inject anything by accident (and a
run made with faults resumes only with the switch set, too). The
runner asks the injector at two points of a cell: before the workload starts and before
each measured step. `WHERE` is `step<K>` (the K-th measured step, from 0) or `workload`.

| fault          | where     | what is done                                                  |
| -------------- | --------- | ------------------------------------------------------------- |
| `qemu-kill`    | step K    | SIGKILL to QEMU's PID right after step K's request reached it |
| `qmp-stop`     | step K    | SIGSTOP to QEMU right after step K's request: QMP stops        |
|                |           | answering, the harness's deadline fires and it kills the PID   |
| `panic`        | step K    | the guest crashes itself (sysrq `c`) right after the request;  |
|                |           | it runs with `panic=-1`, so it reboots at once                 |
| `oom`          | step K    | before step K the guest's OOM killer is invoked (sysrq `f`):   |
|                |           | it kills the largest process, the workload                    |
| `ssh-drop`     | step K    | before step K the guest's sshd is killed: the SSH connection   |
|                |           | drops and no new one is accepted                              |
| `no-converge`  | step K    | before step K the guest's balloon driver is removed, so the    |
|                |           | request is never acted upon and the step hits its deadline    |
| `workload-stuck` | workload | the workload's processes are frozen (SIGSTOP) as they start,  |
|                |           | so it never becomes ready                                     |

Each must end in a recorded cell (failed, with the reason; `no-converge` as a step whose
outcome is `timeout`), the run going on to the next cell and no QEMU of the run left.
"""

import os
import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynamem.errors import UserError

if TYPE_CHECKING:
    from dynamem.mechanisms import Mechanism
    from dynamem.mechanisms.base import Request
    from dynamem.qemu.machine import VM

ENV = "DYNAMEM_FAULT_INJECTION"
AFTER_REQUEST = ("qemu-kill", "qmp-stop", "panic")
BEFORE_STEP = ("oom", "ssh-drop", "no-converge")
FAULTS = (*AFTER_REQUEST, *BEFORE_STEP, "workload-stuck")
_SPEC = re.compile(r"^(?P<fault>[a-z-]+)@(?:step(?P<step>\d+)|(?P<workload>workload))$")


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None  # None: at the workload's start

    def __str__(self) -> str:
        return f"{self.kind}@{'workload' if self.step is None else f'step{self.step}'}"


def parse(spec: object, n_steps: int, mechanism: str) -> Fault:
    """`FAULT@stepK` or `workload-stuck@workload`, checked against the scenario."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or m.group("fault") not in FAULTS:
        raise UserError(
            f"bad inject {spec!r} (use FAULT@stepK with FAULT one of "
            f"{', '.join(FAULTS[:-1])}, or workload-stuck@workload)"
        )
    kind = m.group("fault")
    if (kind == "workload-stuck") != (m.group("workload") is not None):
        raise UserError(f"bad inject {spec!r}: only workload-stuck goes @workload")
    step = None if m.group("step") is None else int(m.group("step"))
    if step is not None and step >= n_steps:
        raise UserError(f"bad inject {spec!r}: the scenario has {n_steps} steps")
    if kind == "no-converge" and mechanism != "balloon":
        raise UserError(f"bad inject {spec!r}: no-converge is implemented for the balloon")
    return Fault(kind, step)


def _guest_background(vm: "VM", line: str) -> None:
    """Run `line` in the guest detached from the SSH session, so it may kill the session
    (or the guest) without the host's command waiting for an answer that never comes."""
    vm.run(["setsid", "sh", "-c", f"({line}) </dev/null >/dev/null 2>&1 &"], timeout=10)


class Injector:
    """Does one fault in one cell; the runner calls the hooks, nothing else changes."""

    def __init__(self, fault: Fault | None) -> None:
        self.fault = fault
        self.fired = False

    def before_workload(self, vm: "VM") -> None:
        if self.fault is not None and self.fault.kind == "workload-stuck":
            # Freeze every stress process as it appears (the loop outlives the session).
            _guest_background(vm, "while :; do killall -STOP stress 2>/dev/null; sleep 0.002; done")
            self.fired = True

    def before_step(self, k: int, vm: "VM", mech: "Mechanism") -> None:
        fault = self.fault
        if fault is None or fault.step != k:
            return
        if fault.kind in AFTER_REQUEST:
            self._after_request(vm, mech, fault.kind)
        elif fault.kind == "oom":
            _guest_background(vm, "echo f > /proc/sysrq-trigger")
            self.fired = True
        elif fault.kind == "ssh-drop":
            _guest_background(vm, "sleep 0.2; killall -KILL dropbear sshd")
            self.fired = True
        elif fault.kind == "no-converge":
            vm.run(["rmmod", "virtio_balloon"], timeout=30)
            self.fired = True

    def _after_request(self, vm: "VM", mech: "Mechanism", kind: str) -> None:
        """Once, right after the step's request reached QEMU (the mechanism's hook)."""

        def fire(vm_: "VM", req: "Request") -> None:
            mech.after_request.remove(fire)
            self.fired = True
            if kind == "qemu-kill":
                os.kill(vm_.pid, signal.SIGKILL)
            elif kind == "qmp-stop":
                os.kill(vm_.pid, signal.SIGSTOP)
            else:  # panic
                _guest_background(vm_, "sleep 0.1; echo c > /proc/sysrq-trigger")

        mech.after_request.append(fire)
