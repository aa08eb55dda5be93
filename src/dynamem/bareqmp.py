"""A deliberately bare QMP client (one socket, JSON lines, no asyncio, no library), used as
the yardstick that dynamem's own resize timing is benchmarked against.

It polls on a back-off schedule like dynamem's host side: under TCG a script that polls QMP
every 2 ms slows the resize it times (the main loop takes QEMU's big lock for every command,
and the host's cores are what the vCPU threads run on), so a fixed fast poll would be a
yardstick that moves.
"""

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynamem.observer import Backoff


class BareQMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']['desc']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def poll_until(check: Any, schedule: Backoff, deadline: float = 120.0) -> int:
    """Poll `check()` on `schedule` until true; the monotonic ns of the first true."""
    start = time.monotonic()
    while True:
        polled = time.monotonic()
        if check():
            return time.monotonic_ns()
        if polled - start > deadline:
            raise TimeoutError("bare QMP poll: deadline")
        pause = polled + schedule.interval(polled - start) - time.monotonic()
        if pause > 0:
            time.sleep(pause)


@dataclass(frozen=True)
class BareTiming:
    seconds: float  # host monotonic, request to the first poll that saw the target
    guest_seconds: float | None  # the guest's clock over the same window, if asked for


def bare_resize(
    qmp: BareQMP,
    mechanism: str,
    delta: int,
    schedule: Backoff,
    dimm_size: int,
    guest_clock: Callable[[], int] | None = None,
) -> BareTiming:
    """The same request and poll a harness resize makes, with nothing else.

    `guest_clock` (e.g. the sampler's clock read, one wake-up each) is read right before the
    request and right after completion is seen, as dynamem's own resize does: in icount mode
    the guest's clock counts instructions, and that window is free of host noise."""
    request: Callable[[], None]
    done: Callable[[], bool]
    backends_to_delete: list[str] = []
    if mechanism == "virtio-mem":
        target = int(qmp.cmd("qom-get", path="vm0", property="size")) + delta

        def request() -> None:
            qmp.cmd("qom-set", path="vm0", property="requested-size", value=target)

        def done() -> bool:
            return bool(qmp.cmd("qom-get", path="vm0", property="size") == target)

    elif mechanism == "balloon":
        target = int(qmp.cmd("query-balloon")["actual"]) + delta

        def request() -> None:
            qmp.cmd("balloon", value=target)

        def done() -> bool:
            return bool(qmp.cmd("query-balloon")["actual"] == target)

    elif mechanism == "dimm":

        def dimm_ids() -> set[str]:
            return {d["data"]["id"] for d in qmp.cmd("query-memory-devices") if d["type"] == "dimm"}

        ids = [f"bare{i}" for i in range(abs(delta) // dimm_size)]
        if delta > 0:

            def request() -> None:
                for i in ids:
                    backend = {
                        "qom-type": "memory-backend-ram",
                        "id": f"{i}-mem",
                        "size": dimm_size,
                    }
                    qmp.cmd("object-add", **backend)
                    qmp.cmd("device_add", driver="pc-dimm", id=i, memdev=f"{i}-mem")

            def done() -> bool:
                return set(ids) <= dimm_ids()

        else:

            def request() -> None:
                for i in reversed(ids):
                    qmp.cmd("device_del", id=i)

            def done() -> bool:
                return not (set(ids) & dimm_ids())

            backends_to_delete = [f"{i}-mem" for i in ids]

    else:
        raise ValueError(mechanism)
    g0 = guest_clock() if guest_clock else None
    t0 = time.monotonic_ns()
    request()
    t1 = poll_until(done, schedule)
    g1 = guest_clock() if guest_clock else None
    for backend in backends_to_delete:
        qmp.cmd("object-del", id=backend)
    guest = (g1 - g0) / 1e9 if g0 is not None and g1 is not None else None
    return BareTiming((t1 - t0) / 1e9, guest)
