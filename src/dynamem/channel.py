"""The host half of the measurement channel to the in-guest sampler (virtio-serial).

Every line is stamped with the host's monotonic clock when it arrives, so guest-visible
completion is measured on the same clock as the QMP request. The channel is FIFO, so a
ping doubles as a barrier: everything sent before it has arrived once its pong has, and
the pong says up to which guest time the sampler has looked (it sends a look only when
something changed, so silence alone proves nothing).
"""

import contextlib
import itertools
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamem.errors import DeadlineExceeded, VMError
from dynamem.observer import Backoff

BASE_COLUMNS = ("totalram_kb", "freeram_kb", "freeswap_kb")
PROTOCOL = 3  # the sampler's "hello N": the line formats below
CAUSES = {0: "timer", 1: "uevent", 2: "first", 3: "last"}

# The sampler reads a file into a 256 KiB buffer: what arrives is at most this long.
SNAP_MAX = 256 * 1024 - 1


@dataclass(frozen=True)
class Sample:
    arrival_ns: int  # host monotonic
    seq: int  # the sampler's look number (looks that changed nothing are not sent)
    guest_ns: int  # guest monotonic, when the sampler looked
    values: tuple[int, ...]
    prev_guest_ns: int = 0  # guest monotonic of the look before, sent or not
    cause: int = 0  # what made it look (CAUSES)


@dataclass(frozen=True)
class Pong:
    """A ping's answer: the round trip, and how far the sampler had looked by then."""

    rtt_s: float
    guest_ns: int
    last_check_ns: int
    checks: int
    uevent_checks: int  # of `checks`, those a memory-block uevent caused, sent or not


@dataclass(frozen=True)
class Calibration:
    """Round trips host -> guest -> host, in seconds; a one-way delay is below the RTT."""

    rtt_median: float
    rtt_p95: float
    rtt_max: float
    n: int


class SamplerChannel:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._replies: dict[str, list[str]] = {}
        self._frames: dict[str, dict[str, bytes]] = {}
        self._hello = False
        self._hello_version = 0
        self._closed = False
        self._tokens = itertools.count(1)
        self._send_lock = threading.Lock()
        self.samples: list[Sample] = []
        self.full_samples: list[Sample] = []  # the "S" records: what a resize costs
        self.columns: tuple[str, ...] = BASE_COLUMNS
        self.full_columns: tuple[str, ...] = ()
        self.schedule: Backoff | None = None  # looks now running (None: the sampler sleeps)

    # -- connection ----------------------------------------------------------------------------

    def accept(self, timeout: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self._listener], [], [], 0.02)
            if ready:
                self._conn, _ = self._listener.accept()
                break
            if not alive():
                raise VMError("QEMU exited before connecting the sampler channel")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"QEMU did not connect the sampler within {timeout:g} s")
        self._reader = threading.Thread(target=self._read_loop, name="sampler", daemon=True)
        self._reader.start()

    def expect_hello(self) -> None:
        """The guest sampler is about to restart (reboot): forget its settings."""
        with self._cond:
            self._hello = False
        self.columns, self.full_columns, self.schedule = BASE_COLUMNS, (), None

    def wait_hello(self, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._hello or self._closed, timeout):
                raise DeadlineExceeded(f"the guest sampler did not say hello within {timeout:g} s")
            if not self._hello:
                raise VMError("the sampler channel closed before the guest sampler started")
            if self._hello_version != PROTOCOL:
                raise VMError(
                    f"the guest sampler speaks protocol {self._hello_version}, this dynamem "
                    f"{PROTOCOL}: rebuild the guest (dynamem guest build)"
                )

    def resumed(self, timeout: float) -> None:
        """The guest was restored from a saved state: its sampler said hello before the save
        and is mid-loop, not restarting. A ping shows it answers on this new connection
        (the saved state's key covers the guest image, and with it the sampler's protocol)."""
        with self._cond:
            self._hello, self._hello_version = True, PROTOCOL
        self.barrier(timeout)

    def close(self) -> None:
        self._closed = True
        for s in (self._conn, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        if self._reader is not None:
            self._reader.join(5)
        self.socket_path.unlink(missing_ok=True)

    # -- commands ------------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        if self._conn is None or self._closed:
            raise VMError("the sampler channel is not connected")
        with self._send_lock:
            self._conn.sendall(line.encode() + b"\n")

    def _await(self, key: str, timeout: float, what: str) -> list[str]:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._replies or self._closed, timeout):
                raise DeadlineExceeded(f"guest sampler: no answer to {what} within {timeout:g} s")
            if key not in self._replies:
                raise VMError(f"sampler channel closed while waiting for {what}")
            return self._replies.pop(key)

    def barrier(self, timeout: float = 5.0) -> Pong:
        """A ping: everything the sampler sent before has arrived when this returns."""
        token = str(next(self._tokens))
        start = time.monotonic_ns()
        self._send(f"ping {token}")
        words = self._await(f"pong {token}", timeout, "ping")
        rtt = (time.monotonic_ns() - start) / 1e9
        guest_ns, last_check, checks, uevent_checks = (int(w) for w in (words + ["0"] * 4)[:4])
        return Pong(rtt, guest_ns, last_check, checks, uevent_checks)

    def ping(self, timeout: float = 5.0) -> float:
        """One round trip in seconds; also a barrier for everything sent before."""
        return self.barrier(timeout).rtt_s

    def calibrate(self, n: int = 30) -> Calibration:
        rtts = sorted(self.ping() for _ in range(n))
        return Calibration(rtts[n // 2], rtts[min(n - 1, int(n * 0.95))], rtts[-1], n)

    def configure(
        self,
        meminfo: tuple[str, ...] = (),
        vmstat: tuple[str, ...] = (),
        *,
        full_meminfo: tuple[str, ...] = (),
        full_vmstat: tuple[str, ...] = (),
        onchange: bool = False,
        uevents: bool = False,
        cpu_budget: float = 0.0,
    ) -> None:
        """Choose the fields of each look and of the full record, whether a look that
        changed nothing is sent, whether memory-block uevents wake the sampler, and the
        share of one CPU the sampler may use once a schedule runs (0: no limit). Stops any
        running schedule first (fields must not change under a running one)."""
        self.stop()
        self._send("meminfo " + " ".join(meminfo))
        self._send("vmstat " + " ".join(vmstat))
        self._send("fmeminfo " + " ".join(full_meminfo))
        self._send("fvmstat " + " ".join(full_vmstat))
        self._send(f"onchange {int(onchange)}")
        self._send(f"uevent {int(uevents)}")
        self._send(f"budget {round(cpu_budget * 1e6)}")
        self.ping()
        self.columns = BASE_COLUMNS + tuple(meminfo) + tuple(vmstat)
        self.full_columns = tuple(full_meminfo) + tuple(full_vmstat)

    def start(self, checks: Backoff, full: Backoff | None = None) -> Pong:
        """Start (or restart: elapsed counts from now) the looks; the first look is sent
        at once and has arrived when this returns."""
        self._send("full " + (full.sampler_args() if full else "0 0 0"))
        self._send("schedule " + checks.sampler_args())
        self.schedule = checks
        return self.barrier()

    def stop(self) -> Pong:
        """The sampler sleeps until the next command; everything it sent has arrived."""
        self._send("schedule 0 0 0")
        self.schedule = None
        return self.barrier()

    def snapshot(self, paths: list[str], timeout: float = 10.0) -> dict[str, str]:
        """Whole files read by the guest (e.g. /proc/zoneinfo, or 'memblocks'); a file of
        SNAP_MAX bytes or more arrives cut there."""
        token = f"s{next(self._tokens)}"
        self._send(f"snap {token} " + " ".join(paths))
        self._await(f"end {token}", timeout, "snapshot")
        with self._cond:
            frames = self._frames.pop(token, {})
        return {p: frames.get(p, b"").decode(errors="replace") for p in paths}

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the sampler process has used in the guest."""
        return self.cpu_and_clock()[0]

    def cpu_and_clock(self) -> tuple[float, int]:
        """The sampler's CPU time (s) and the guest's monotonic clock (ns) when it read it."""
        token = f"c{next(self._tokens)}"
        self._send(f"cpu {token}")
        words = self._await(f"cpu {token}", 5.0, "cpu")
        return int(words[0]) / 1e9, int(words[1]) if len(words) > 1 else 0

    def mark(self) -> int:
        return len(self.samples)

    # -- reader --------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self._conn is not None
        buf = b""
        try:
            while not self._closed:
                chunk = self._conn.recv(65536)
                now = time.monotonic_ns()
                if not chunk:
                    break
                buf += chunk
                buf = self._parse(buf, now)
        except OSError:
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _parse(self, buf: bytes, now: int) -> bytes:
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                return buf
            line = buf[:nl].decode(errors="replace")
            if line.startswith("f "):
                _, token, path, size_text = line.split(" ", 3)
                size = int(size_text)
                if len(buf) < nl + 1 + size + 1:
                    return buf  # wait for the rest of the frame
                data = buf[nl + 1 : nl + 1 + size]
                buf = buf[nl + 1 + size + 1 :]
                with self._cond:
                    self._frames.setdefault(token, {})[path] = data
                continue
            buf = buf[nl + 1 :]
            self._dispatch(line, now)

    def _dispatch(self, line: str, now: int) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == "s" and len(words) >= 8:
            nums = [int(w) for w in words[1:]]
            self.samples.append(Sample(now, nums[0], nums[1], tuple(nums[4:]), nums[2], nums[3]))
            return
        if words[0] == "S" and len(words) >= 3:
            nums = [int(w) for w in words[1:]]
            self.full_samples.append(Sample(now, nums[0], nums[1], tuple(nums[2:])))
            return
        with self._cond:
            if words[0] == "hello":
                self._hello = True
                self._hello_version = int(words[1]) if words[1:2] and words[1].isdigit() else 0
            elif words[0] in ("pong", "end", "cpu") and len(words) >= 2:
                self._replies[f"{words[0]} {words[1]}"] = words[2:]
            self._cond.notify_all()
