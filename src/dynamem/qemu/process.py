"""The one owner of one QEMU process: started in its own session, stopped by PID, verified gone."""

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

from dynamem.errors import VMError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If dynamem itself is SIGKILLed, the kernel kills QEMU too: no orphans.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def pid_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T for stopped, Z...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    return pid_state(pid) not in (None, "Z", "X")


class QemuProcess:
    """Starts QEMU with stdout/stderr to a log file; `kill()` is idempotent and verifies."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VMError("QEMU is not started")
        return self._proc.pid

    def start(self) -> None:
        if self._proc is not None:
            raise VMError("QEMU already started")
        with self.log.open("ab") as log:
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches dynamem, which stops QEMU in order
                    preexec_fn=_die_with_parent,
                )
            except FileNotFoundError as exc:
                raise VMError(
                    f"{self.argv[0]} not found: install QEMU (apt-get install qemu-system-x86)"
                ) from exc

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for QEMU to exit on its own; True if it did."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL by PID if still running, reap it, and check that the PID is gone."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while pid_alive(self._proc.pid):
            if time.monotonic() > deadline:
                raise VMError(f"QEMU pid {self._proc.pid} is still alive after SIGKILL")
            time.sleep(0.01)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])
