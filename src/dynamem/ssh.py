"""Guest commands over SSH with fabric, the guest's host key pinned, every command bounded."""

import base64
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fabric
import paramiko
from invoke.exceptions import CommandTimedOut
from invoke.runners import Result

from dynamem.errors import GuestCommandError


@dataclass(frozen=True)
class CommandResult:
    argv: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def guest_command(argv: list[str] | str, timeout: float) -> str:
    """The shell line run in the guest: quoted argv, killed by the guest's own `timeout`.

    A list is quoted word by word (no injection from scenario values); a string is taken as
    a shell snippet on purpose. Either way the guest kills it after `timeout` seconds, since
    closing the SSH channel alone leaves the remote process running.
    """
    inner = argv if isinstance(argv, str) else shlex.join(argv)
    return f"timeout {max(1, int(timeout + 0.999))} sh -c {shlex.quote(inner)}"


class GuestShell:
    def __init__(
        self, port: int, key: Path, host_public_key: str, *, connect_timeout: float = 15.0
    ) -> None:
        self.port = port
        self.connect_timeout = connect_timeout
        self._conn = fabric.Connection(
            host="127.0.0.1",
            port=port,
            user="root",
            connect_timeout=connect_timeout,
            connect_kwargs={
                "key_filename": str(key),
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": connect_timeout,
                "auth_timeout": connect_timeout,
            },
        )
        # Pin the guest's host key: fabric installs AutoAddPolicy, which would trust anyone.
        kind, blob = host_public_key.split()[:2]
        client: paramiko.SSHClient = self._conn.client
        client.get_host_keys().clear()
        client.get_host_keys().add(
            f"[127.0.0.1]:{port}",
            kind,
            paramiko.PKey.from_type_string(kind, base64.b64decode(blob)),
        )
        client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def open(self) -> None:
        try:
            self._conn.open()
        except (TimeoutError, paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestCommandError(
                f"SSH to the guest at 127.0.0.1:{self.port} failed: {exc}"
            ) from exc
        transport = self._conn.transport
        if transport is not None:
            transport.set_keepalive(5)

    def run(self, argv: list[str] | str, *, timeout: float = 60.0) -> CommandResult:
        """Run in the guest and return its status and output; a hung command is killed."""
        line = guest_command(argv, timeout)
        if not self._conn.is_connected:
            self.open()
        start = time.monotonic()
        try:
            res = self._run_interruptible(line, timeout + 10)
        except CommandTimedOut as exc:
            raise GuestCommandError(f"guest command timed out after {timeout:g} s: {line}") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestCommandError(f"SSH to the guest failed during {line!r}: {exc}") from exc
        return CommandResult(line, res.exited, res.stdout, res.stderr, time.monotonic() - start)

    def _run_interruptible(self, line: str, timeout: float) -> Result:
        """fabric.run in a worker thread, so Ctrl-C in the main thread is not swallowed.

        invoke's runner catches KeyboardInterrupt and forwards it to the remote side, which
        a non-tty command ignores; dynamem must instead stop at once and shut QEMU down.
        """
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["result"] = self._conn.run(
                    line, hide=True, warn=True, in_stream=False, timeout=timeout
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["error"] = exc

        worker = threading.Thread(target=work, name="guest-command", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.05)
        except KeyboardInterrupt:
            self.close()  # unblocks the worker; the guest's own timeout reaps the command
            raise
        if "error" in box:
            error = box["error"]
            assert isinstance(error, BaseException)
            raise error
        result = box["result"]
        assert isinstance(result, Result)
        return result

    def put(self, local: Path, remote: str) -> None:
        """Copy a file into the guest over SFTP (its mode kept)."""
        if not self._conn.is_connected:
            self.open()
        try:
            self._conn.put(str(local), remote)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise GuestCommandError(f"copying {local.name} to the guest failed: {exc}") from exc

    def close(self) -> None:
        self._conn.close()
