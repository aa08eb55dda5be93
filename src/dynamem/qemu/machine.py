"""One VM: one QEMU process from launch to verified shutdown, with QMP, console and SSH.

Layered shutdown as in QEMU's own python/qemu/machine: close SSH, ask QEMU to `quit`, wait
with a deadline, SIGKILL by PID, verify the PID is gone, always clean up. The run directory
is removed after a clean stop and kept (its path in the error) after a failure.
"""

import contextlib
import enum
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from dynamem.channel import SamplerChannel
from dynamem.errors import DeadlineExceeded, GuestCommandError, VMError
from dynamem.guest import cloud
from dynamem.keys import KeyPair, make_keypair
from dynamem.paths import make_run_dir
from dynamem.qemu.config import RunFiles, VMConfig, build_argv
from dynamem.qemu.monitor import Monitor
from dynamem.qemu.process import QemuProcess, pid_state
from dynamem.qemu.snapshot import LOAD_FAILED, SavedState, StateRejected, prepare_run_dir
from dynamem.ssh import CommandResult, GuestShell

READY = re.compile(r"^dynamem-ready: (\S+) ([\d.]+)", re.MULTILINE)
CLOUD_READY = re.compile(re.escape(cloud.READY_WORD) + r" ([\d.]+)")  # cloud-init's final message
GUEST_ERROR = re.compile(r"^dynamem-error: (.*)$", re.MULTILINE)
PANIC = re.compile(r"Kernel panic - not syncing: (.*)")


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VM:
    """`restore`: start from a saved post-boot state (dynamem.qemu.snapshot) instead of
    booting; the state must have been saved from this same configuration."""

    def __init__(
        self, config: VMConfig, *, keep_run_dir: bool = False, restore: SavedState | None = None
    ) -> None:
        if restore is not None and config.disk is not None:
            raise VMError("a cloud guest cannot start from a saved state (its disk is not saved)")
        self.config = config
        self.restore = restore
        self.keep_run_dir = keep_run_dir
        self.state = State.NEW
        self.run_dir: Path | None = None
        self.files: RunFiles | None = None
        self.kernel_release: str | None = None
        self.timings: dict[str, float] = {}  # host monotonic seconds since launch
        self._process: QemuProcess | None = None
        self._monitor: Monitor | None = None
        self._shell: GuestShell | None = None
        self._sampler: SamplerChannel | None = None
        self._host_key = ""
        self._failed = False
        self._console_offset = 0  # console text before this offset belongs to earlier boots
        self._resets: Any = None  # QMP listener for resets the harness did not ask for
        self.diagnosis: str | None = None  # what was wrong with QEMU/the guest on failure

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "VM":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._failed = True
            self.diagnosis = self.failure_reason()  # before shutdown kills QEMU
        self.shutdown()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VMError("VM is not launched")
        return self._process.pid

    def start(self, ready_timeout: float | None = None) -> "VM":
        """Launch and wait until the guest answers SSH and its sampler is connected (or
        raise, leaving nothing running). Default deadline: 180 s, a cloud image 420 s
        (systemd and cloud-init take about ten times the embedded guest's boot in TCG)."""
        try:
            self.launch()
        except BaseException:
            self._failed = True
            self.diagnosis = self.failure_reason()
            self.shutdown()
            raise
        return self.await_ready(ready_timeout)

    def await_ready(self, ready_timeout: float | None = None) -> "VM":
        """The second half of `start`, after `launch`: may run in another thread, so that
        several guests boot side by side (QEMU must be launched by a thread that outlives
        it: it dies with its parent thread, PR_SET_PDEATHSIG)."""
        if ready_timeout is None:
            ready_timeout = 180.0 if self.config.disk is None else 420.0
        try:
            deadline = self.timings["t0"] + ready_timeout
            if self.restore is not None:
                self.wait_restored(ready_timeout)
            else:
                self.wait_ready(ready_timeout)
            if self.config.disk is not None:
                self.finish_cloud(deadline)
            else:
                self.shell.open()
            self.timings["ssh"] = time.monotonic() - self.timings["t0"]
        except BaseException:
            self._failed = True
            self.diagnosis = self.failure_reason()
            self.shutdown()
            raise
        return self

    def launch(self) -> None:
        if self.state is not State.NEW:
            raise VMError(f"cannot launch a VM that is {self.state.value}")
        self.state = State.RUNNING
        self.run_dir = make_run_dir()
        keys = self.run_dir / "keys"
        if self.restore is not None:  # the keys the saved guest read when it booted
            prepare_run_dir(self.restore, self.run_dir, self.config)
            client, host = KeyPair.at(keys, "client"), KeyPair.at(keys, "hostkey")
        else:
            keys.mkdir(mode=0o700)
            client = make_keypair(keys, "client")
            host = make_keypair(keys, "hostkey")
        self._host_key = host.public_line
        fw_cfg = {"authorized_keys": client.public, "hostkey": host.private}
        if self.config.disk is not None:
            cloud.make_overlay(
                self.config.disk, self.config.disk_format, self.run_dir / "disk.qcow2"
            )
            user = cloud.user_data(client.public_line, host.private.read_text(), host.public_line)
            cloud.make_seed(self.run_dir / "seed.iso", self.run_dir.name, user)
        if self.config.data_size:
            with open(self.run_dir / "data.img", "wb") as f:
                f.truncate(self.config.data_size)
        if self.config.swap == "disk" and self.restore is None:
            with open(self.run_dir / "swap.img", "wb") as f:
                f.truncate(self.config.swap_size)  # sparse: costs host disk only when used
        for attempt in range(3):  # the free port can be taken between probe and bind
            self.files = RunFiles(self.run_dir, free_port(), fw_cfg)
            self._monitor = Monitor(self.files.qmp_socket)
            if self.config.sampler:
                self._sampler = SamplerChannel(self.files.sampler_socket)
            argv = build_argv(self.config, self.files)
            if self.restore is not None:
                argv += ["-incoming", "defer"]
            self._process = QemuProcess(argv, self.files.qemu_log)
            self.timings["t0"] = time.monotonic()
            self._process.start()
            try:
                self._monitor.accept(timeout=30.0, alive=self._process.alive)
                if self._sampler is not None:
                    self._sampler.accept(timeout=30.0, alive=self._process.alive)
                break
            except VMError as exc:
                tail = self._process.log_tail()
                self._monitor.close()
                if self._sampler is not None:
                    self._sampler.close()
                self._process.kill()
                if "host forwarding" in tail and attempt < 2:
                    continue
                raise VMError(f"{exc}: {tail or 'no output'} (run dir {self.run_dir})") from exc
        self.timings["qmp"] = time.monotonic() - self.timings["t0"]
        assert self.files is not None and self._monitor is not None
        self._resets = self._monitor.listen(["RESET", "SHUTDOWN", "GUEST_PANICKED"])
        self._shell = GuestShell(self.files.ssh_port, client.private, self._host_key)

    def wait_ready(self, timeout: float) -> None:
        """Wait for the guest's `dynamem-ready` console line (sshd listening), or in a
        cloud guest for cloud-init's final message (then see finish_cloud)."""
        assert self.files is not None and self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()[self._console_offset :]
            if self.config.disk is not None:
                if CLOUD_READY.search(text):  # the console line; SSH and the sampler follow
                    self.timings["ready"] = time.monotonic() - self.timings["t0"]
                    return
            elif match := READY.search(text):
                self.kernel_release = match.group(1)
                self.timings["ready"] = time.monotonic() - self.timings["t0"]
                if self._sampler is not None:
                    self._sampler.wait_hello(max(1.0, deadline - time.monotonic()))
                return
            if err := GUEST_ERROR.search(text):
                raise VMError(
                    f"guest failed to boot: {err.group(1)} (console: {self.files.console_log})"
                )
            if panic := PANIC.search(text):
                raise VMError(f"guest kernel panic: {panic.group(1)}")
            if not self._process.alive():
                raise VMError(
                    f"QEMU exited with status {self._process.returncode} before the guest was "
                    f"ready: {self._process.log_tail() or 'no output'}"
                )
            if time.monotonic() > deadline:
                last = text.strip().splitlines()[-1:] or ["(console empty)"]
                raise DeadlineExceeded(
                    f"guest not ready within {timeout:g} s; last console line: {last[0][:120]}"
                )
            time.sleep(0.01)

    def finish_cloud(self, deadline: float) -> None:
        """A cloud guest after cloud-init's final message: check cloud-init's own status,
        copy in the sampler, impact program and prepare script, run it (tracing, swap, the
        sampler) and wait for the sampler's hello."""

        def left() -> float:
            return max(5.0, deadline - time.monotonic())

        # cloud-final is not ordered after sshd: in the rare boot where sshd is still
        # starting, the first connection fails and is tried again until the deadline.
        while True:
            try:
                self.shell.open()
                break
            except GuestCommandError:
                if time.monotonic() > deadline:
                    raise
                if self._process is not None and not self._process.alive():
                    raise VMError(self._exit_reason()) from None
                time.sleep(1.0)
        status = self.run(["cloud-init", "status", "--wait", "--long"], timeout=left(), check=False)
        # exit 2 (cloud-init >= 23.4): done, with recoverable errors or warnings logged
        if status.returncode not in (0, 2) or "status: done" not in status.stdout:
            detail = " ".join((status.stdout + status.stderr).split())[-240:]
            raise VMError(f"cloud-init did not finish cleanly: {detail}")
        self.kernel_release = self.run(["uname", "-r"]).stdout.strip()
        # As in the minimal guest, whose init loads them whatever devices it has: prepare
        # traces functions in the first two and makes zram swap (udev loads only what a
        # device needs). An image without one of them was refused before booting if the
        # cell needs it; otherwise only the tracing of its function is missing (below).
        for module in ("virtio_balloon", "virtio_mem", "zram"):
            self.run(["modprobe", module], check=False)
        self.run(["mkdir", "-p", "/usr/local/lib/dynamem"])
        for name, local in cloud.agent_files().items():
            remote = (
                f"/usr/local/lib/dynamem/{name}" if name == "prepare" else f"/usr/local/bin/{name}"
            )
            self.shell.put(local, remote)
        out = self.run(["sh", "/usr/local/lib/dynamem/prepare"], timeout=min(60.0, left()))
        errors = GUEST_ERROR.findall(out.stdout)
        # driver-entry tracing is a refinement (resizes fall back to the sampler's looks,
        # per run); what else prepare does (swap, the sampler) the cell needs
        if fatal := [e for e in errors if not e.startswith("cannot trace")]:
            raise VMError(f"preparing the cloud guest failed: {'; '.join(fatal)}")
        self.timings["prepared"] = time.monotonic() - self.timings["t0"]
        if self._sampler is not None:
            self._sampler.wait_hello(left())

    def wait_restored(self, timeout: float) -> None:
        """Load the saved state into the waiting QEMU and wait until the guest runs again
        and its sampler answers. Only a load QEMU reports as failed raises StateRejected
        (the state is then built again); anything else is an ordinary failure."""
        assert self.restore is not None and self._process is not None
        deadline = time.monotonic() + timeout
        key = self.restore.key
        self.qmp("migrate-incoming", uri=self.restore.load_uri())
        while True:
            if not self._process.alive():  # QEMU 7.2 exits when a load fails
                log = self._process.log_tail(3)
                if LOAD_FAILED in log:
                    raise StateRejected(f"QEMU could not load the saved state {key}: {log}")
                raise VMError(f"{self._exit_reason()} while loading the saved state {key}")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the saved state {key} did not load within {timeout:g} s")
            try:
                status = self.qmp("query-status", timeout=5.0)["status"]
                if status == "paused":  # it was saved stopped, so it loads stopped
                    self.qmp("cont", timeout=5.0)
                    continue
            except (VMError, DeadlineExceeded):
                time.sleep(0.05)  # QEMU busy or going away: the checks above decide
                continue
            if status == "running":
                break
            if status not in ("inmigrate", "restore-vm"):
                raise VMError(f"after loading the saved state {key} the guest is {status}")
            time.sleep(0.01)
        self.kernel_release = self.restore.kernel_release
        self.timings["ready"] = time.monotonic() - self.timings["t0"]
        if self._sampler is not None:
            self._sampler.resumed(max(1.0, deadline - time.monotonic()))

    def reboot(self, timeout: float | None = None) -> float:
        """Reset the machine (QMP system_reset) and wait until the guest is usable again;
        returns the seconds it took. Memory devices keep whatever QEMU keeps on reset."""
        if timeout is None:
            timeout = 180.0 if self.config.disk is None else 420.0
        self._console_offset = len(self.console())
        if self._sampler is not None:
            self._sampler.expect_hello()
        self.shell.close()
        start = time.monotonic()
        self.qmp("system_reset")
        self.wait_ready(timeout)
        if self.config.disk is not None:
            self.finish_cloud(start + timeout)
        else:
            self.shell.open()
        if self._resets is not None:
            self.monitor.drain(self._resets)  # the reset asked for
        return time.monotonic() - start

    # -- health ----------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise VMError if QEMU has exited or the guest reset itself (e.g. a kernel panic
        with panic=-1) since the last check. Cheap enough to call in a polling loop."""
        if self._process is None or self.state is not State.RUNNING:
            raise VMError("the VM is not running")
        if not self._process.alive():
            raise VMError(self._exit_reason())
        if self._resets is not None and self._monitor is not None and not self._resets.empty():
            events = [str(e["event"]) for e in self._monitor.drain(self._resets)]
            panic = self._panic_line()
            raise VMError(
                (f"guest kernel panic: {panic}; " if panic else "")
                + f"the guest reset itself ({', '.join(events)})"
            )

    def failure_reason(self) -> str | None:
        """After something failed: what is wrong with QEMU or the guest, if anything."""
        if self._process is None:
            return None
        if not self._process.alive():
            return self._exit_reason()
        if pid_state(self._process.pid) == "T":
            return f"QEMU pid {self._process.pid} is stopped (SIGSTOP) and does not answer"
        if panic := self._panic_line():
            return f"guest kernel panic: {panic}"
        return None

    def _exit_reason(self) -> str:
        assert self._process is not None
        code = self._process.returncode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        tail = self._process.log_tail(2)
        return f"QEMU {how}" + (f": {tail}" if tail else "")

    def _panic_line(self) -> str | None:
        match = PANIC.search(self.console()[self._console_offset :])
        return match.group(1).strip() if match else None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop QEMU (quit, then SIGKILL by PID) and verify it is gone. Idempotent."""
        if self.state is State.STOPPED:
            return
        self.state = State.STOPPED
        try:
            if self._shell is not None:
                self._shell.close()
            if self._sampler is not None:
                self._sampler.close()
            asked = False
            if self._monitor is not None:
                if self._process is not None and self._process.alive():
                    # Not answering (stopped, hung) or already gone: SIGKILL below.
                    with contextlib.suppress(VMError, DeadlineExceeded):
                        self._monitor.cmd("quit", timeout=3.0)
                        asked = True
                self._monitor.close()
            if self._process is not None and asked:
                self._process.wait(timeout)
        finally:
            if self._process is not None:
                self._process.kill()
            if self.run_dir is not None and not (self.keep_run_dir or self._failed):
                shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- talking to the VM ---------------------------------------------------------------------

    @property
    def shell(self) -> GuestShell:
        if self._shell is None or self.state is not State.RUNNING:
            raise VMError("the VM is not running")
        return self._shell

    @property
    def sampler(self) -> SamplerChannel:
        if self._sampler is None or self.state is not State.RUNNING:
            raise VMError("the VM has no running sampler channel")
        return self._sampler

    @property
    def monitor(self) -> Monitor:
        if self._monitor is None or self.state is not State.RUNNING:
            raise VMError("the VM is not running")
        return self._monitor

    def qmp(self, command: str, timeout: float = 10.0, **args: Any) -> Any:
        return self.qmp_args(command, args, timeout=timeout)

    def qmp_args(self, command: str, args: dict[str, Any], timeout: float = 10.0) -> Any:
        """For arguments that are not Python names (e.g. object-add's qom-type)."""
        if self._monitor is None or self.state is not State.RUNNING:
            raise VMError(f"QMP {command}: the VM is not running")
        return self._monitor.cmd(command, args or None, timeout=timeout)

    def run(
        self, argv: list[str] | str, *, timeout: float = 60.0, check: bool = True
    ) -> CommandResult:
        result = self.shell.run(argv, timeout=timeout)
        if check and not result.ok:
            raise GuestCommandError(
                f"guest command {result.argv!r} exited {result.returncode}: "
                f"{result.stderr.strip()[-200:]}"
            )
        return result

    def console(self) -> str:
        if self.files is None:
            return ""
        try:
            return self.files.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
