"""Workloads in the guest, started and stopped over SSH, each with a readiness signal."""

import shlex
import time
from typing import TYPE_CHECKING

from dynamem.errors import DeadlineExceeded, GuestCommandError, UserError
from dynamem.parsers import parse_meminfo
from dynamem.units import format_size

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM


def _anon_kb(vm: "VM") -> int:
    # Read by the sampler, not SSH: polling over SSH would itself allocate guest memory.
    return parse_meminfo(vm.sampler.snapshot(["/proc/meminfo"])["/proc/meminfo"])["AnonPages"]


class Stress:
    """`stress --vm 1 --vm-bytes N --vm-keep`: an anonymous working set that stays resident.

    Ready once the guest's AnonPages has grown by the working set (it is really touched).
    """

    def __init__(self, vm_bytes: int) -> None:
        if vm_bytes <= 0:
            raise UserError("the stress working set must be larger than zero")
        self.vm_bytes = vm_bytes
        self.pid: int | None = None

    def start(self, vm: "VM", timeout: float = 300.0) -> float:
        """Start and wait until resident; returns the seconds it took."""
        before = _anon_kb(vm)
        argv = ["stress", "--vm", "1", "--vm-bytes", str(self.vm_bytes), "--vm-keep"]
        line = f"{shlex.join(argv)} </dev/null >/dev/null 2>&1 & echo $!"
        res = vm.run(["sh", "-c", line], timeout=30)
        self.pid = int(res.stdout.split()[-1])
        start = time.monotonic()
        want = before + self.vm_bytes * 0.95 // 1024
        while _anon_kb(vm) < want:
            if time.monotonic() - start > timeout:
                self.stop(vm)
                raise DeadlineExceeded(
                    f"stress did not make {format_size(self.vm_bytes)} resident in {timeout:g} s"
                )
            if not vm.run(["kill", "-0", str(self.pid)], check=False).ok:
                raise GuestCommandError("stress exited before its working set was resident")
            time.sleep(0.2)
        return time.monotonic() - start

    def stop(self, vm: "VM") -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        # stress's parent forwards SIGTERM to its workers; wait until none is left.
        vm.run(
            [
                "sh",
                "-c",
                f"kill {pid} 2>/dev/null; while pidof stress >/dev/null; do usleep 20000; done",
            ],
            timeout=60,
            check=False,
        )


def touch_and_free(vm: "VM", size: int) -> None:
    """Make `size` of guest memory resident on the host, then free it in the guest, so a
    following shrink can show whether the host gets it back."""
    stress = Stress(size)
    stress.start(vm)
    stress.stop(vm)
