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


def bare_resize(
    qmp: BareQMP, mechanism: str, delta: int, schedule: Backoff, dimm_size: int
) -> float:
    """The same request and poll a harness resize makes, with nothing else; seconds."""
    if mechanism == "virtio-mem":
        target = int(qmp.cmd("qom-get", path="vm0", property="size")) + delta
        t0 = time.monotonic_ns()
        qmp.cmd("qom-set", path="vm0", property="requested-size", value=target)
        t1 = poll_until(lambda: qmp.cmd("qom-get", path="vm0", property="size") == target, schedule)
        return (t1 - t0) / 1e9
    if mechanism == "balloon":
        target = int(qmp.cmd("query-balloon")["actual"]) + delta
        t0 = time.monotonic_ns()
        qmp.cmd("balloon", value=target)
        t1 = poll_until(lambda: qmp.cmd("query-balloon")["actual"] == target, schedule)
        return (t1 - t0) / 1e9
    if mechanism == "dimm":

        def dimm_ids() -> set[str]:
            return {d["data"]["id"] for d in qmp.cmd("query-memory-devices") if d["type"] == "dimm"}

        count = abs(delta) // dimm_size
        ids = [f"bare{i}" for i in range(count)]
        if delta > 0:
            t0 = time.monotonic_ns()
            for i in ids:
                qmp.cmd(
                    "object-add",
                    **{"qom-type": "memory-backend-ram", "id": f"{i}-mem", "size": dimm_size},
                )
                qmp.cmd("device_add", driver="pc-dimm", id=i, memdev=f"{i}-mem")
            t1 = poll_until(lambda: set(ids) <= dimm_ids(), schedule)
            return (t1 - t0) / 1e9
        t0 = time.monotonic_ns()
        for i in reversed(ids):
            qmp.cmd("device_del", id=i)
        t1 = poll_until(lambda: not (set(ids) & dimm_ids()), schedule)
        for i in ids:
            qmp.cmd("object-del", id=f"{i}-mem")
        return (t1 - t0) / 1e9
    raise ValueError(mechanism)
