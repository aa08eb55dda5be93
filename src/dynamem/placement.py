"""Where a cell runs: its host's fingerprint, the CPUs it is pinned to, and how busy the
host was meanwhile.

A host's speed shapes every latency, so cells from hosts that differ in CPU model, kernel,
QEMU, accelerator or the number of CPUs a cell gets are never pooled: the fingerprint is
part of the condition. Pinning goes through the calling thread's affinity, which every
process it starts (QEMU, its threads, zstd) inherits; the process's own affinity (its main
thread's) stays what the host gave it, so it is the pool CPU sets are cut from.
"""

import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from dynamem.errors import UserError
from dynamem.record import HostInfo, HostLoad


def available_cpus() -> list[int]:
    """The CPUs this process may use (its main thread's set: a pinned worker thread's own
    narrower set is not the pool)."""
    return sorted(os.sched_getaffinity(os.getpid()))


def split_cpus(cpus: list[int], count: int, per_worker: int | None = None) -> list[list[int]]:
    """`count` disjoint CPU sets from `cpus`: `per_worker` each, or an equal share."""
    if count < 1:
        raise UserError("a host needs at least one worker")
    size = per_worker or len(cpus) // count
    if size < 1 or size * count > len(cpus):
        want = f"{per_worker} CPUs each" if per_worker else "one CPU each at least"
        raise UserError(
            f"{count} workers with {want} need {max(size, 1) * count} CPUs; "
            f"this host gives {len(cpus)} ({','.join(map(str, cpus))})"
        )
    return [cpus[i * size : (i + 1) * size] for i in range(count)]


def pin(cpus: list[int]) -> None:
    """Pin the calling thread (and everything it starts from now on) to `cpus`."""
    os.sched_setaffinity(0, cpus)


def fingerprint(host_cpu: str, kernel: str, accel: str, qemu_version: str, ncpus: int) -> str:
    return (
        f"{host_cpu}, Linux {kernel}, QEMU {qemu_version}, {accel}, "
        f"{ncpus} host CPU{'s' if ncpus != 1 else ''}"
    )


def host_info(worker: str, host_cpu: str, accel: str, qemu_version: str) -> HostInfo:
    cpus = sorted(os.sched_getaffinity(0))
    return HostInfo(
        name=platform.node() or "host",
        worker=worker,
        cpus=cpus,
        fingerprint=fingerprint(host_cpu, platform.release(), accel, qemu_version, len(cpus)),
    )


def cpu_times(text: str) -> np.ndarray:
    """/proc/stat's per-CPU lines as an array (CPU number, then jiffies by column)."""
    rows = [
        line.split()[:9]
        for line in text.splitlines()
        if line.startswith("cpu") and line[3:4].isdigit()
    ]
    table = np.array([[r[0][3:], *r[1:]] for r in rows], dtype=np.int64)
    table.shape = (-1, 9)
    return table


@dataclass(frozen=True)
class LoadMark:
    t: float
    times: np.ndarray


def mark() -> LoadMark:
    with open("/proc/stat") as f:
        return LoadMark(time.monotonic(), cpu_times(f.read()))


def busy_share(before: np.ndarray, after: np.ndarray, cpus: list[int] | None = None) -> float:
    """Share of time the CPUs (all, or `cpus`) were not idle between two /proc/stat reads;
    idle is the idle and iowait columns."""

    def summed(table: np.ndarray) -> np.ndarray:
        rows = table if cpus is None else table[np.isin(table[:, 0], cpus)]
        total: np.ndarray = rows[:, 1:].sum(axis=0)
        return total

    delta = summed(after) - summed(before)
    total = delta.sum()
    if total <= 0:
        return 0.0
    return float(1.0 - (delta[3] + delta[4]) / total)


def load_since(start: LoadMark, cpus: list[int]) -> HostLoad:
    end = mark()
    return HostLoad(
        seconds=end.t - start.t,
        busy_all=busy_share(start.times, end.times),
        busy_cpuset=busy_share(start.times, end.times, cpus),
        loadavg_1m=os.getloadavg()[0],
    )
