from pathlib import Path

import pytest

from dynamem.errors import UserError
from dynamem.qemu.config import (
    DEFAULT_TCG_CPU,
    RunFiles,
    VMConfig,
    build_argv,
    default_cpu,
    memory_arg,
)
from dynamem.units import GiB, MiB


def config(**kw):
    return VMConfig(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"), **kw)


def files():
    return RunFiles(Path("/run/d"), 40022, {"hostkey": Path("/run/d/keys/hostkey")})


def value_after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_ssh_forward_is_loopback_only_and_the_guest_is_isolated():
    argv = build_argv(config(), files())
    (netdev,) = value_after(argv, "-netdev")
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
    assert "restrict=on" in netdev


def test_qmp_connects_to_our_socket_and_console_goes_to_a_file():
    argv = build_argv(config(), files())
    chardevs = value_after(argv, "-chardev")
    assert "socket,id=qmp,path=/run/d/qmp.sock,server=off" in chardevs
    assert "file,id=console,path=/run/d/console.log" in chardevs
    assert value_after(argv, "-serial") == ["chardev:console"]


def test_cpu_model_follows_the_accelerator():
    assert value_after(build_argv(config(accel="tcg"), files()), "-cpu") == [DEFAULT_TCG_CPU]
    assert value_after(build_argv(config(accel="kvm"), files()), "-cpu") == ["host"]
    assert value_after(build_argv(config(accel="kvm", cpu="EPYC"), files()), "-cpu") == ["EPYC"]
    assert config(accel="tcg", cpu="qemu64").cpu_model == "qemu64"
    assert config(accel="tcg").cpu_model == default_cpu("tcg") == DEFAULT_TCG_CPU


def test_the_deterministic_accelerator_is_chosen_without_a_probe_and_says_so():
    from dynamem.qemu.accel import choose

    choice = choose("tcg-icount", "qemu-system-x86_64", None)
    assert choice.accel == "tcg-icount" and "not meaningful" in choice.reason
    with pytest.raises(UserError, match="choose from auto, kvm, tcg, tcg-icount"):
        choose("icount", "qemu-system-x86_64", None)


def test_icount_is_single_threaded_tcg_with_one_instruction_per_nanosecond():
    argv = build_argv(config(accel="tcg-icount", cpus=1), files())
    assert value_after(argv, "-accel") == ["tcg,thread=single"]
    assert value_after(argv, "-icount") == ["shift=0,sleep=off"]
    assert "-icount" not in build_argv(config(accel="tcg"), files())


def test_memory_argument_with_and_without_hotplug_room():
    assert memory_arg(config(memory=2 * GiB)) == "2G"
    assert memory_arg(config(memory=GiB, maxmem=4 * GiB, slots=8)) == "1G,slots=8,maxmem=4G"


def test_kernel_command_line_carries_the_online_policy():
    cmdline = value_after(build_argv(config(), files()), "-append")[0]
    assert "memhp_default_state=online_movable" in cmdline.split()
    assert "console=ttyS0" in cmdline.split()
    assert "swiotlb=noforce" in cmdline.split()  # equal MemTotal with and without maxmem
    other = config(memhp_default_state="online_kernel", kernel_args=("init_on_alloc=0",))
    assert other.cmdline.split()[-2:] == ["memhp_default_state=online_kernel", "init_on_alloc=0"]


def test_fw_cfg_files_are_passed_under_opt_dynamem():
    argv = build_argv(config(), files())
    assert value_after(argv, "-fw_cfg") == ["name=opt/dynamem/hostkey,file=/run/d/keys/hostkey"]


def test_extra_arguments_come_last_in_order():
    extra = ("-device", "virtio-balloon-pci,id=balloon0")
    assert build_argv(config(extra_args=extra), files())[-2:] == list(extra)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"accel": "hvf"}, "unknown accelerator 'hvf'"),
        ({"memory": 0}, "positive multiple"),
        ({"memory": 3 * MiB + 1}, "positive multiple"),
        ({"cpus": 0}, "cpus must be at least 1"),
        ({"memhp_default_state": "online_sideways"}, "unknown memhp_default_state"),
        ({"memory": 2 * GiB, "maxmem": GiB}, "maxmem 1G is below memory 2G"),
        ({"slots": 4}, "slots need maxmem"),
        ({"maxmem": 4 * GiB, "slots": 300}, "between 0 and 256"),
        ({"accel": "tcg-icount", "cpus": 2}, "tcg-icount runs 1 vCPU"),
        ({"accel": "tcg-icount", "cpus": 1, "cpu": "host"}, "-cpu host needs KVM"),
        ({"accel": "tcg", "cpu": "host"}, "-cpu host needs KVM"),
    ],
)
def test_invalid_configs_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        config(**kw)


def test_swap_disk_is_a_sparse_virtio_blk_with_a_serial():
    argv = build_argv(config(swap="disk"), files())
    assert "file=/run/d/swap.img,if=none,id=swap0,format=raw,discard=unmap" in value_after(
        argv, "-drive"
    )
    assert "virtio-blk-pci,drive=swap0,serial=dynamem-swap" in value_after(argv, "-device")
    assert "dynamem.swap=disk" in config(swap="disk").cmdline.split()


def test_zram_swap_is_a_kernel_argument_only():
    c = config(swap="zram", swap_size=512 * MiB)
    assert f"dynamem.swap=zram:{512 * MiB}" in c.cmdline.split()
    assert "-drive" not in build_argv(c, files())


def test_unknown_swap_kind():
    with pytest.raises(UserError, match="unknown swap kind 'nfs'"):
        config(swap="nfs")
