"""The VM's diagnosis of a failure, against a real process standing in for QEMU (the
integration fault tests do the same to real QEMUs)."""

import os
import signal
from pathlib import Path

import pytest

from dynamem.errors import VMError
from dynamem.qemu.config import VMConfig
from dynamem.qemu.machine import VM, State
from dynamem.qemu.process import QemuProcess, pid_alive


@pytest.fixture
def vm(tmp_path):
    vm = VM(VMConfig(kernel=Path("/k"), initrd=Path("/i")))
    vm._process = QemuProcess(["sleep", "60"], tmp_path / "qemu.log")
    vm._process.start()
    vm.state = State.RUNNING
    yield vm
    pid = vm._process.pid
    if pid_alive(pid):
        os.kill(pid, signal.SIGCONT)
    vm.shutdown()
    assert not pid_alive(pid)


def test_a_healthy_process_has_no_diagnosis(vm):
    vm.check_health()
    assert vm.failure_reason() is None


def test_a_killed_qemu_is_named_with_its_signal(vm):
    os.kill(vm.pid, signal.SIGKILL)
    vm._process.wait(10)
    assert vm.failure_reason() == "QEMU killed by SIGKILL"
    with pytest.raises(VMError, match="QEMU killed by SIGKILL"):
        vm.check_health()


def test_a_stopped_qemu_is_named(vm):
    os.kill(vm.pid, signal.SIGSTOP)
    while os.waitid(os.P_PID, vm.pid, os.WSTOPPED | os.WNOWAIT | os.WNOHANG) is None:
        pass  # until the kernel reports it stopped
    assert vm.failure_reason() == f"QEMU pid {vm.pid} is stopped (SIGSTOP) and does not answer"


def test_a_panic_on_the_console_is_named(vm, tmp_path):
    from dynamem.qemu.config import RunFiles

    vm.files = RunFiles(tmp_path, 1)
    vm.files.console_log.write_text("[ 1.0] Kernel panic - not syncing: sysrq triggered crash\n")
    assert vm.failure_reason() == "guest kernel panic: sysrq triggered crash"
