"""The steps besides resizes: free a working set, drive the guest out of memory, reboot.

Each returns its typed record for the cell (`dynamem.record`), in the same spirit as a
resize's: what was asked, what the host and the guest report before and after.
"""

import time
from typing import TYPE_CHECKING

from dynamem.mechanisms import Mechanism
from dynamem.parsers import parse_memblocks, parse_meminfo, summarize_memblocks
from dynamem.probes import host as hostprobe
from dynamem.probes.cost import vmstat_delta
from dynamem.record import FreeStep, OomStep, RebootStep

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM
    from dynamem.workloads import Idle, Impact, PageCache, Stress


def _guest(vm: "VM") -> dict[str, str]:
    return vm.sampler.snapshot(["/proc/meminfo", "/proc/vmstat", "memblocks"])


def free_step(vm: "VM", workload: "Idle | Stress | PageCache | Impact", seconds: float) -> FreeStep:
    """Stop the workload (its memory returns to the guest's free lists) and watch whether
    the host gets it back without any resize (free page reporting, research question 10)."""
    before = _guest(vm)
    sampler = hostprobe.HostSampler(vm.pid, 0.05).start()
    try:
        time.sleep(0.2)
        t0 = time.monotonic_ns()
        workload.stop(vm)
        time.sleep(seconds)
    finally:
        sampler.stop()
    after = _guest(vm)
    series = sampler.arrays()
    rss = series["host_rss_kb"]
    t = series["host_t_ns"]
    base = rss[t < t0]
    rss_before = int(base[-1]) if len(base) else int(rss[0])
    return FreeStep(
        seconds=seconds,
        rss_before_kb=rss_before,
        rss_after_kb=int(rss[-1]),
        rss_released_bytes=(rss_before - int(rss[-1])) * 1024,
        guest_memfree_kb=(
            parse_meminfo(before["/proc/meminfo"])["MemFree"],
            parse_meminfo(after["/proc/meminfo"])["MemFree"],
        ),
        vmstat_delta=vmstat_delta(before["/proc/vmstat"], after["/proc/vmstat"]),
        series=dict(series),
    )


def oom_step(vm: "VM", mech: Mechanism, size: int, timeout: float = 120.0) -> OomStep:
    """Ask for `size` of anonymous memory at once and record who gave way: the OOM killer,
    or the balloon deflating (deflate-on-oom, research question 8)."""
    before = _guest(vm)
    host_before = mech.host_bytes(vm)
    start = time.monotonic()
    argv = [
        "stress",
        "--vm",
        "1",
        "--vm-bytes",
        str(size),
        "--vm-keep",
        "--timeout",
        f"{int(timeout // 2)}s",
    ]
    res = vm.run(argv, timeout=timeout, check=False)
    elapsed = time.monotonic() - start
    after = _guest(vm)
    delta = vmstat_delta(before["/proc/vmstat"], after["/proc/vmstat"])
    return OomStep(
        size=size,
        seconds=elapsed,
        stress_exit=res.returncode,
        oom_kills=delta["oom_kill"],
        balloon_deflated_bytes=delta["balloon_deflate"] * 4096,
        host_before_bytes=host_before,
        host_after_bytes=mech.host_bytes(vm),
        vmstat_delta=delta,
        guest_alive=vm.run(["true"], check=False).ok,
    )


def reboot_step(vm: "VM", mech: Mechanism) -> RebootStep:
    """system_reset, then what the guest comes up with (research question 9)."""
    before = _guest(vm)
    host_before = mech.host_bytes(vm)
    seconds = vm.reboot()
    time.sleep(1.0)  # let drivers (virtio-mem re-plugging) start
    after = _guest(vm)
    return RebootStep(
        seconds=seconds,
        host_before_bytes=host_before,
        host_after_bytes=mech.host_bytes(vm),
        guest_memtotal_kb=(
            parse_meminfo(before["/proc/meminfo"])["MemTotal"],
            parse_meminfo(after["/proc/meminfo"])["MemTotal"],
        ),
        memory_blocks=(
            summarize_memblocks(parse_memblocks(before["memblocks"])),
            summarize_memblocks(parse_memblocks(after["memblocks"])),
        ),
    )
