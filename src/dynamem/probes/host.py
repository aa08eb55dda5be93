"""The host's view of a resize: QEMU's resident memory and the host's free memory.

/proc/PID/status (VmRSS, RssAnon) is cheap counters and is sampled in a thread;
/proc/PID/smaps_rollup walks QEMU's page tables (it is the only source of AnonHugePages)
and is read only before and after a resize.
"""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynamem.observer import Backoff
from dynamem.probes.guestmem import Buddy, parse_buddyinfo


def _kb_fields(text: str, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in names and rest.split():
            out[key] = int(rest.split()[0])
    return out


def read_status(pid: int) -> dict[str, int]:
    return _kb_fields(Path(f"/proc/{pid}/status").read_text(), ("VmRSS", "RssAnon", "RssShmem"))


def read_smaps_rollup(pid: int) -> dict[str, int]:
    return _kb_fields(
        Path(f"/proc/{pid}/smaps_rollup").read_text(),
        ("Rss", "Anonymous", "AnonHugePages", "Shared_Clean", "Shared_Dirty", "Swap"),
    )


def read_host_meminfo() -> dict[str, int]:
    return _kb_fields(Path("/proc/meminfo").read_text(), ("MemTotal", "MemFree", "MemAvailable"))


@dataclass(frozen=True)
class HostSnapshot:
    qemu: dict[str, int]  # smaps_rollup, kB
    meminfo: dict[str, int]  # host /proc/meminfo, kB
    buddy: Buddy  # host /proc/buddyinfo


def snapshot(pid: int) -> HostSnapshot:
    return HostSnapshot(
        read_smaps_rollup(pid),
        read_host_meminfo(),
        parse_buddyinfo(Path("/proc/buddyinfo").read_text()),
    )


@dataclass
class HostSampler:
    """Samples QEMU's VmRSS/RssAnon and the host's MemAvailable, at a fixed rate or on a
    back-off from when it started (on a 2-core host every wake-up of this thread is taken
    from the vCPU threads)."""

    pid: int
    interval_s: float = 0.02
    backoff: Backoff | None = None
    t_ns: list[int] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    rss_anon_kb: list[int] = field(default_factory=list)
    mem_available_kb: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-sampler", daemon=True)

    def start(self) -> "HostSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        try:
            status = read_status(self.pid)
            mem = read_host_meminfo()
        except (FileNotFoundError, ProcessLookupError):
            return  # QEMU gone: the resize records the failure
        self.t_ns.append(time.monotonic_ns())
        self.rss_kb.append(status.get("VmRSS", 0))
        self.rss_anon_kb.append(status.get("RssAnon", 0))
        self.mem_available_kb.append(mem.get("MemAvailable", 0))

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            elapsed = time.monotonic() - start
            self._stop.wait(self.backoff.interval(elapsed) if self.backoff else self.interval_s)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "host_t_ns": np.array(self.t_ns, dtype=np.int64),
            "host_rss_kb": np.array(self.rss_kb, dtype=np.int64),
            "host_rss_anon_kb": np.array(self.rss_anon_kb, dtype=np.int64),
            "host_mem_available_kb": np.array(self.mem_available_kb, dtype=np.int64),
        }


def settle_time_ns(
    t_ns: np.ndarray, values: np.ndarray, start_ns: int, tolerance: float
) -> int | None:
    """First time >= start from which `values` stay within `tolerance` of their final value."""
    if len(values) == 0:
        return None
    after = t_ns >= start_ns
    off = np.abs(values - values[-1]) > tolerance
    bad = np.nonzero(off & after)[0]
    first = int(np.argmax(after)) if after.any() else len(values) - 1
    idx = first if len(bad) == 0 else int(bad[-1]) + 1
    return int(t_ns[min(idx, len(values) - 1)])
