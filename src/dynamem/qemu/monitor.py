"""QMP over qemu.qmp's QMPClient, synchronous, with a deadline on every wait.

dynamem listens and QEMU connects (`-chardev socket,...,server=off`), so there is no race
with QEMU creating its socket, and a QEMU that dies before connecting is noticed at once
instead of at the deadline.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message

from dynamem.errors import DeadlineExceeded, VMError

T = TypeVar("T")


class QMPCommandError(VMError):
    """QEMU answered a QMP command with an error; `error_class` says which."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class Monitor:
    def __init__(self, socket_path: Path, name: str = "dynamem") -> None:
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._connected = False
        self._loop.run_until_complete(self._client.start_server(str(socket_path)))

    @property
    def client(self) -> QMPClient:
        return self._client

    def run(self, coro: Awaitable[T], timeout: float, what: str) -> T:
        """Run a coroutine on the monitor's loop; DeadlineExceeded names `what`."""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{what}: no answer within {timeout:g} s") from exc

    def accept(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Wait for QEMU to connect, giving up early if `alive()` turns false."""

        async def watch() -> None:
            task = asyncio.ensure_future(self._client.accept())
            deadline = time.monotonic() + timeout
            try:
                while not task.done():
                    await asyncio.wait([task], timeout=0.02)
                    if task.done():
                        break
                    if not alive():
                        raise VMError("QEMU exited before connecting to QMP")
                    if time.monotonic() > deadline:
                        raise DeadlineExceeded(f"QEMU did not connect to QMP within {timeout:g} s")
                try:
                    task.result()
                except QMPError as exc:
                    raise VMError(f"QMP handshake with QEMU failed ({exc})") from exc
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

        self._loop.run_until_complete(watch())
        self._connected = True

    def cmd(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        if not self._connected:
            raise VMError(f"QMP {command}: monitor is not connected")
        try:
            return self.run(self._client.execute(command, args), timeout, f"QMP {command}")
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, exc.error.error.desc) from exc
        except QMPError as exc:  # the connection is gone (QEMU exited or hung up)
            raise VMError(f"QMP {command}: connection to QEMU lost ({type(exc).__name__})") from exc

    def listen(self, names: list[str]) -> EventListener:
        """Start queueing these events (they arrive while any QMP command runs)."""
        listener = EventListener(names)
        self._client.register_listener(listener)
        return listener

    def drain(self, listener: EventListener) -> list[Message]:
        """The events queued so far, without waiting for more."""
        events = []
        while not listener.empty():
            events.append(self.run(listener.get(), 1.0, "QMP event"))
        return events

    def unlisten(self, listener: EventListener) -> None:
        self._client.remove_listener(listener)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self.run(self._client.disconnect(), 5.0, "QMP disconnect")
        except Exception:  # noqa: BLE001 - closing must not mask the real error
            pass
        finally:
            self._loop.close()
            self._connected = False
            self.socket_path.unlink(missing_ok=True)
