"""Workloads in the guest, started and stopped over SSH, each with a readiness signal.

Every workload is started before the measured steps and stopped after them; `stop()`
returns what the workload itself observed (the impact probe's log), for the runner to
relate to each step's window.
"""

import shlex
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamem.errors import DeadlineExceeded, GuestCommandError, UserError
from dynamem.parsers import parse_meminfo
from dynamem.record import WorkloadImpact
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

    name = "stress"

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

    def stop(self, vm: "VM") -> dict[str, Any]:
        if self.pid is None:
            return {}
        pid, self.pid = self.pid, None
        # stress's parent forwards SIGTERM to its workers; wait until none is left.
        # SIGCONT too: a stopped (frozen) stress would never act on the SIGTERM; SIGKILL
        # after 5 s if it still does not go.
        vm.run(
            [
                "sh",
                "-c",
                f"kill {pid} 2>/dev/null; killall -CONT stress 2>/dev/null; n=0; "
                "while pidof stress >/dev/null; do n=$((n + 1)); "
                '[ "$n" -gt 250 ] && killall -KILL stress 2>/dev/null; sleep 0.02; done',
            ],
            timeout=60,
            check=False,
        )
        return {}

    def alive(self, vm: "VM") -> bool:
        """The parent and its worker both still run (the OOM killer takes the worker)."""
        if self.pid is None:
            return False
        return len(vm.run(["pidof", "stress"], timeout=10, check=False).stdout.split()) >= 2


def _pid_alive(vm: "VM", pid: int | None) -> bool:
    return pid is not None and vm.run(["kill", "-0", str(pid)], timeout=10, check=False).ok


class Idle:
    name = "idle"
    vm_bytes = 0

    def start(self, vm: "VM", timeout: float = 300.0) -> float:
        return 0.0

    def alive(self, vm: "VM") -> bool:
        return True

    def stop(self, vm: "VM") -> dict[str, Any]:
        return {}


class PageCache:
    """Reads `vm_bytes` of a virtio-blk data disk into the page cache and keeps it there.

    Linux drops a block device's page cache when its last opener closes it, so a holder
    process keeps the device open until `stop()`.
    """

    name = "pagecache"
    ready = "/tmp/dynamem-pagecache.ready"

    def __init__(self, vm_bytes: int) -> None:
        self.vm_bytes = vm_bytes
        self.pid: int | None = None

    def start(self, vm: "VM", timeout: float = 300.0) -> float:
        start = time.monotonic()
        find = (
            'for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = dynamem-data ]'
            " && echo ${d##*/}; done"
        )
        dev = vm.run(["sh", "-c", find], timeout=10).stdout.strip()
        if not dev:
            raise GuestCommandError("the page-cache workload needs the data disk (none found)")
        count = self.vm_bytes >> 20
        holder = (
            f"exec 3</dev/{dev}; dd if=/dev/{dev} of=/dev/null bs=1M count={count} "
            f"2>/dev/null; touch {self.ready}; while :; do sleep 3600; done"
        )
        line = f"sh -c {shlex.quote(holder)} </dev/null >/dev/null 2>&1 & echo $!"
        self.pid = int(vm.run(["sh", "-c", line], timeout=30).stdout.split()[-1])
        while not vm.run(["test", "-e", self.ready], check=False).ok:
            if time.monotonic() - start > timeout:
                raise DeadlineExceeded(
                    f"reading {format_size(self.vm_bytes)} took over {timeout:g} s"
                )
            time.sleep(0.2)
        return time.monotonic() - start

    def stop(self, vm: "VM") -> dict[str, Any]:
        if self.pid is not None:
            vm.run(["sh", "-c", f"pkill -P {self.pid}; kill {self.pid}"], check=False)
            self.pid = None
        return {}

    def alive(self, vm: "VM") -> bool:
        return _pid_alive(vm, self.pid)


class Impact:
    """dynamem-impact: keeps touching a working set and logs its progress every 10 ms."""

    name = "impact"
    log = "/tmp/dynamem-impact.log"

    def __init__(self, vm_bytes: int) -> None:
        self.vm_bytes = vm_bytes
        self.pid: int | None = None

    def start(self, vm: "VM", timeout: float = 300.0) -> float:
        start = time.monotonic()
        line = (
            f"dynamem-impact {self.vm_bytes} {self.log} >/tmp/dynamem-impact.out 2>&1 "
            "</dev/null & echo $!"
        )
        self.pid = int(vm.run(["sh", "-c", line], timeout=30).stdout.split()[-1])
        while "ready" not in vm.run(["cat", "/tmp/dynamem-impact.out"], check=False).stdout:
            if time.monotonic() - start > timeout:
                raise DeadlineExceeded(f"the impact probe was not ready within {timeout:g} s")
            time.sleep(0.2)
        return time.monotonic() - start

    def alive(self, vm: "VM") -> bool:
        return _pid_alive(vm, self.pid)

    def stop(self, vm: "VM") -> dict[str, Any]:
        if self.pid is not None:
            vm.run(["kill", str(self.pid)], check=False)
            self.pid = None
        return self.log_so_far(vm)

    def log_so_far(self, vm: "VM") -> dict[str, Any]:
        """The probe's log up to now (it flushes every line), read between steps."""
        text = vm.run(["cat", self.log], timeout=60, check=False).stdout
        rows = [line.split() for line in text.splitlines() if len(line.split()) == 2]
        data = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return {"impact_guest_ns": data[:, 0], "impact_pages": data[:, 1]}


def impact_during(
    log: dict[str, Any], offset_ns: int, t_request_ns: int, t_done_ns: int | None
) -> WorkloadImpact | None:
    """Throughput before and during one step, and the longest stall that touched it.

    `offset_ns` maps the guest clock to the host's (host = guest + offset). A stall is the
    gap between two consecutive log lines (the probe logs every 10 ms while it runs); every
    gap that overlaps the window from the request to completion counts whole, so a stall
    that began before the request, ended after completion, or covered the whole window is
    measured, not cut or lost. A log that stops inside the window is a stall lasting at
    least until the window's end.
    """
    t = np.asarray(log["impact_guest_ns"], dtype=np.int64) + offset_ns
    pages = np.asarray(log["impact_pages"], dtype=np.int64)
    if len(t) < 2:
        return None
    end = t_done_ns or int(t[-1])
    starts, ends = t[:-1], t[1:]
    rate = np.diff(pages) / (np.diff(t) / 1e9)  # pages per second between log lines
    before = rate[(ends >= t_request_ns - 1_000_000_000) & (ends <= t_request_ns)]
    overlap = (ends > t_request_ns) & (starts < end)
    during = rate[overlap]
    gaps = (ends - starts)[overlap]
    if t[-1] < end:  # the probe stopped logging before the step completed
        gaps = np.append(gaps, end - max(int(t[-1]), t_request_ns))
    slowdown = None
    if len(before) and len(during) and np.median(during) > 0:
        slowdown = float(np.median(before) / np.median(during))
    return WorkloadImpact(
        throughput_before_pps=float(np.median(before)) if len(before) else None,
        throughput_during_pps=float(np.median(during)) if len(during) else None,
        slowdown=slowdown,
        longest_stall_ms=float(gaps.max() / 1e6) if len(gaps) else None,
    )


def make(kind: str, size: int) -> "Idle | Stress | PageCache | Impact":
    if kind == "idle":
        return Idle()
    if kind == "stress":
        return Stress(size)
    if kind == "pagecache":
        return PageCache(size)
    if kind == "impact":
        return Impact(size)
    raise UserError(f"unknown workload {kind!r}")


def touch_and_free(vm: "VM", size: int) -> None:
    """Make `size` of guest memory resident on the host, then free it in the guest, so a
    following shrink can show whether the host gets it back."""
    stress = Stress(size)
    stress.start(vm)
    stress.stop(vm)
