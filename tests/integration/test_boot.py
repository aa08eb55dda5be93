"""Boot the real guest under the probed accelerator and check facts over SSH."""

import pytest

from dynamem.errors import GuestCommandError
from dynamem.keys import make_keypair
from dynamem.qemu.machine import VM
from dynamem.qemu.process import pid_alive
from dynamem.ssh import GuestShell

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def booted(plan):
    vm = VM(plan.config)
    vm.start()
    yield vm
    vm.shutdown()
    assert not pid_alive(vm.pid)


def test_guest_runs_the_built_kernel(booted, image):
    assert booted.run(["uname", "-r"]).stdout.strip() == image.kernel_release
    assert booted.kernel_release == image.kernel_release


def test_memtotal_is_within_5_percent_of_configured_ram(booted, plan):
    meminfo = booted.run(["cat", "/proc/meminfo"]).stdout
    memtotal_kib = int(
        next(line for line in meminfo.splitlines() if line.startswith("MemTotal:")).split()[1]
    )
    configured_kib = plan.config.memory // 1024
    assert 0.95 * configured_kib <= memtotal_kib <= configured_kib


def test_memory_resize_drivers_are_loaded(booted):
    modules = {line.split()[0] for line in booted.run(["cat", "/proc/modules"]).stdout.splitlines()}
    assert {"virtio_mem", "virtio_balloon", "virtio_net", "qemu_fw_cfg", "zram"} <= modules


def test_hotplugged_memory_policy_reaches_the_guest(booted):
    policy = booted.run(["cat", "/sys/devices/system/memory/auto_online_blocks"]).stdout.strip()
    assert policy == "online_movable"


def test_exit_status_and_stderr_come_back(booted):
    res = booted.run(["sh", "-c", "echo oops >&2; exit 7"], check=False)
    assert res.returncode == 7 and res.stderr.strip() == "oops"


def test_a_hung_command_is_killed_at_its_deadline(booted):
    res = booted.run(["sleep", "60"], timeout=2, check=False)
    assert res.returncode != 0 and res.seconds < 30
    # The guest's own timeout killed it: no sleep left behind.
    assert "sleep 60" not in booted.run(["ps"]).stdout


def test_qmp_answers(booted):
    assert booted.qmp("query-status")["status"] == "running"


def test_a_guest_with_another_host_key_is_rejected(booted, tmp_path):
    impostor = make_keypair(tmp_path, "other")
    shell = GuestShell(
        booted.files.ssh_port,
        booted.run_dir / "keys" / "client",
        impostor.public_line,
        connect_timeout=10,
    )
    with pytest.raises(GuestCommandError, match="SSH to the guest"):
        shell.open()
    shell.close()


def test_hostile_words_reach_the_guest_as_inert_data(booted):
    words = [
        "$(touch /tmp/pwned)",
        "`touch /tmp/pwned`",
        "; touch /tmp/pwned",
        "&& touch /tmp/pwned",
        "a'b\"c",
        "x\ny",
        "*",
    ]
    for word in words:
        assert booted.run(["printf", "%s", word]).stdout == word
    assert not booted.run(["test", "-e", "/tmp/pwned"], check=False).ok
