"""`dynamem vm exec` end to end, and the failures it must turn into one-line errors."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dynamem.units import GiB

from .conftest import cli, qemu_pids_mentioning

pytestmark = pytest.mark.slow


def test_vm_exec_prints_guest_output_and_leaves_nothing(image, run_base):
    res = cli("vm", "exec", "--", "uname", "-r")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == image.kernel_release
    assert "ready in" in res.stderr and ("tcg:" in res.stderr or "kvm:" in res.stderr)


def test_vm_exec_returns_the_command_status(image, run_base):
    res = cli(
        "vm", "exec", "--memory", "1G", "--", "sh", "-c", "grep MemTotal /proc/meminfo; exit 3"
    )
    assert res.returncode == 3
    kib = int(res.stdout.split()[1])
    assert 0.9 * GiB // 1024 < kib < GiB // 1024


def test_guest_that_never_becomes_ready_hits_the_deadline(image, run_base):
    res = cli("vm", "exec", "--ready-timeout", "2", "--", "true")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "guest not ready within 2 s" in res.stderr


def test_ssh_refused_is_a_one_line_error(image, run_base):
    res = cli("vm", "exec", "--kernel-arg", "dynamem.sshd=0", "--", "true")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("dynamem: error: SSH to the guest")


@pytest.fixture
def background_exec():
    """Start `dynamem vm exec -- sleep 600` in the background; SIGKILLed if a test fails."""
    procs = []

    def start(stderr=subprocess.PIPE):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynamem.cli", "vm", "exec", "--", "sleep", "600"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_line(proc, text, timeout=120):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if text in line or not line:
            return "".join(lines)
    raise AssertionError(f"no {text!r} within {timeout} s: {lines}")


@pytest.mark.parametrize("when", ["booting", "running"])
def test_ctrl_c_stops_qemu(image, run_base, background_exec, when):
    proc = background_exec()
    deadline = time.monotonic() + 60
    while not qemu_pids_mentioning(str(run_base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_pids_mentioning(str(run_base)), "QEMU never started"
    if when == "running":
        assert "ready in" in wait_for_line(proc, "ready in")
        time.sleep(1)
    else:
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    # run_base's teardown checks by PID that the QEMU is gone.


def test_sigkill_of_dynamem_takes_qemu_with_it(image, run_base, background_exec):
    proc = background_exec(stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not qemu_pids_mentioning(str(run_base)) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = qemu_pids_mentioning(str(run_base))
    assert pids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while qemu_pids_mentioning(str(run_base)) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_unusable_kvm_is_refused_cleanly(image, plan, run_base):
    if plan.accel.accel == "kvm":
        pytest.skip("KVM works on this host")
    res = cli("vm", "exec", "--accel", "kvm", "--", "true")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("dynamem: error: ")
    assert "--accel kvm requested but" in res.stderr
    assert not run_base.exists()  # refused before any QEMU was started


def test_doctor_explains_the_accelerator(image):
    res = cli("doctor")
    line = next(x for x in res.stdout.splitlines() if "accelerator" in x)
    assert ("tcg:" in line or "kvm:" in line) and "/dev/kvm" in line


def test_resize_prints_a_json_record_with_its_context(image, run_base):
    import json

    res = cli("resize", "--mechanism", "virtio-mem", "--memory", "1G", "--by", "-128M", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["format"] == 2 and record["status"] == "ok"  # the cell record `run` stores
    result, context = record["steps"][0], record["context"]
    assert result["outcome"] == "ok"
    assert result["requested_bytes"] == -128 * 2**20
    assert result["guest_memtotal_delta_bytes"] == -128 * 2**20
    assert len(result["series"]["guest_t_ns"]) == result["samples"]
    assert record["preparation"]["requested_bytes"] == 128 * 2**20
    assert record["condition"]["memory"] == 2**30 and record["condition"]["steps"] == [
        "shrink 128M"
    ]
    assert context["accel"] in ("tcg", "kvm") and context["accel_reason"]
    assert context["guest_kernel"] == image.kernel_release
    assert any("virtio_mem" in line for line in context["boot_kernel_log"])
