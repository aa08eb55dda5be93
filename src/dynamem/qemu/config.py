"""A typed description of one VM and the QEMU command line it becomes (pure, unit-tested)."""

from dataclasses import dataclass, field
from pathlib import Path

from dynamem.errors import UserError
from dynamem.units import MiB, format_size

# tcg-icount: TCG with one instruction per virtual nanosecond and no sleeping, so guest
# time counts guest instructions and the guest-side part of a cost is free of host noise.
# Its own accelerator: its numbers are never pooled or compared with tcg or kvm ones.
ICOUNT = "tcg-icount"
ACCELERATORS = ("kvm", "tcg", ICOUNT)
SWAP_KINDS = ("none", "disk", "zram")
ONLINE_STATES = ("online", "online_kernel", "online_movable", "offline")


def vcpus_for(accel: str, cpus: int) -> int:
    """tcg-icount runs one vCPU whatever is asked: single-threaded TCG with two vCPUs
    stalled the guest here (`-smp 2` under icount), and one vCPU makes the guest's clock a
    count of every instruction it ran."""
    return 1 if accel == ICOUNT else cpus


def default_cpu(accel: str) -> str:
    """KVM: the host's own CPU. TCG: see DEFAULT_TCG_CPU."""
    return "host" if accel == "kvm" else DEFAULT_TCG_CPU


# Under TCG the CPU model picks the guest kernel's page copy and zeroing routines, and TCG
# emulates them at very different speeds: `max` exposes ERMS, so Linux copies and clears
# pages with `rep movsb`/`rep stosb`, which TCG runs a byte at a time. Shrinking 512 MiB
# from a 3 GiB guest with stress 1500M resident (bare QMP script, medians of 5, 2-core
# host): virtio-mem 2.16 s with qemu64 against 5.83 s with max, the balloon 3.24 s against
# 5.62 s, so virtio-mem / balloon is 0.67 with qemu64 and 1.04 with max. qemu64 (QEMU's own
# default) keeps emulation from dominating the page work, and its ordering is the one
# measured under KVM (HyperAlloc, Squeezy); it is recorded with every result.
DEFAULT_TCG_CPU = "qemu64"


@dataclass(frozen=True)
class VMConfig:
    kernel: Path
    initrd: Path
    accel: str = "tcg"
    memory: int = 2048 * MiB
    maxmem: int | None = None  # with slots: room for hotplugged memory devices
    slots: int = 0
    cpus: int = 2
    machine: str = "q35"
    cpu: str | None = None  # None: default_cpu(accel)
    memhp_default_state: str = "online_movable"
    kernel_args: tuple[str, ...] = ()
    # Raw device/object arguments added by mechanisms, e.g. ("-device", "virtio-balloon-pci").
    extra_args: tuple[str, ...] = ()
    qemu_binary: str = "qemu-system-x86_64"
    name: str = "dynamem"
    sampler: bool = True  # the virtio-serial measurement channel to the in-guest sampler
    # Guest swap: a virtio-blk disk backed by a sparse file in the run directory, or zram.
    swap: str = "none"
    swap_size: int = 1024 * MiB
    data_size: int = 0  # a sparse virtio-blk disk for the page-cache workload (0: none)
    # A cloud image (dynamem.guest.cloud): its base disk, which each VM boots through a
    # qcow2 overlay with a NoCloud seed beside it, and the root= its kernel is booted with.
    disk: Path | None = None
    disk_format: str = "qcow2"
    root: str | None = None

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise UserError(
                f"unknown accelerator {self.accel!r} (choose from {', '.join(ACCELERATORS)})"
            )
        if self.memory <= 0 or self.memory % MiB:
            raise UserError(f"guest memory {self.memory} must be a positive multiple of 1 MiB")
        if self.cpus < 1:
            raise UserError(f"cpus must be at least 1, got {self.cpus}")
        if self.icount and self.cpus != 1:
            raise UserError(
                f"{ICOUNT} runs 1 vCPU (single-threaded TCG; with more vCPUs the guest "
                "stalled here)"
            )
        if self.cpu == "host" and self.accel != "kvm":
            raise UserError("-cpu host needs KVM; under TCG choose a model such as qemu64 or max")
        if self.memhp_default_state not in ONLINE_STATES:
            raise UserError(
                f"unknown memhp_default_state {self.memhp_default_state!r} "
                f"(choose from {', '.join(ONLINE_STATES)})"
            )
        if self.maxmem is not None:
            if self.maxmem < self.memory:
                raise UserError(
                    f"maxmem {format_size(self.maxmem)} is below memory {format_size(self.memory)}"
                )
            if self.maxmem % MiB:
                raise UserError(f"maxmem {self.maxmem} must be a multiple of 1 MiB")
        if not 0 <= self.slots <= 256:
            raise UserError(f"slots must be between 0 and 256, got {self.slots}")
        if self.slots and self.maxmem is None:
            raise UserError("memory slots need maxmem")
        if self.swap not in SWAP_KINDS:
            raise UserError(
                f"unknown swap kind {self.swap!r} (choose from {', '.join(SWAP_KINDS)})"
            )
        if self.swap != "none" and (self.swap_size <= 0 or self.swap_size % MiB):
            raise UserError(f"swap size {self.swap_size} must be a positive multiple of 1 MiB")

    @property
    def icount(self) -> bool:
        return self.accel == ICOUNT

    @property
    def cpu_model(self) -> str:
        """The -cpu the guest gets: chosen, or the default for the accelerator."""
        return self.cpu or default_cpu(self.accel)

    @property
    def swap_args(self) -> tuple[str, ...]:
        if self.swap == "disk":
            return ("dynamem.swap=disk",)
        if self.swap == "zram":
            return (f"dynamem.swap=zram:{self.swap_size}",)
        return ()

    @property
    def cmdline(self) -> str:
        words = [
            *((f"root={self.root}", "ro") if self.root else ()),
            "console=ttyS0",
            "edd=off",
            "panic=-1",
            # Linux reserves a 64 MiB SWIOTLB bounce buffer when possible memory reaches above
            # 4 GiB, which QEMU's hotplug area always does: a hotplug-capable "1G" guest came
            # up with 64 MiB less MemTotal than the balloon's (919268 vs 981476 kB). The
            # guest's devices are virtio without ACCESS_PLATFORM, which never bounce; without
            # the buffer every mechanism starts from the same usable memory (within 0.5%).
            "swiotlb=noforce",
            f"memhp_default_state={self.memhp_default_state}",
            *self.swap_args,
            *self.kernel_args,
        ]
        return " ".join(words)


@dataclass(frozen=True)
class RunFiles:
    """Paths inside the VM's 0700 run directory that the command line refers to."""

    directory: Path
    ssh_port: int
    fw_cfg: dict[str, Path] = field(default_factory=dict)

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def sampler_socket(self) -> Path:
        return self.directory / "sampler.sock"

    @property
    def swap_image(self) -> Path:
        return self.directory / "swap.img"

    @property
    def data_image(self) -> Path:
        return self.directory / "data.img"

    @property
    def overlay_image(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def seed_image(self) -> Path:
        return self.directory / "seed.iso"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"


def memory_arg(config: VMConfig) -> str:
    arg = format_size(config.memory)
    if config.maxmem is not None:
        arg += f",slots={config.slots},maxmem={format_size(config.maxmem)}"
    return arg


def build_argv(config: VMConfig, files: RunFiles) -> list[str]:
    cpu = config.cpu_model
    argv = [
        config.qemu_binary,
        "-name",
        config.name,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        config.machine,
        "-accel",
        "tcg,thread=single" if config.icount else config.accel,
        "-cpu",
        cpu,
        "-smp",
        str(config.cpus),
        *(("-icount", "shift=0,sleep=off") if config.icount else ()),
        "-m",
        memory_arg(config),
        "-kernel",
        str(config.kernel),
        "-initrd",
        str(config.initrd),
        "-append",
        config.cmdline,
        "-chardev",
        f"socket,id=qmp,path={files.qmp_socket},server=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={files.console_log}",
        "-serial",
        "chardev:console",
        "-netdev",
        f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{files.ssh_port}-:22",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-device",
        "virtio-rng-pci",
    ]
    if config.sampler:
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=sampler,path={files.sampler_socket},server=off",
            "-device", "virtserialport,bus=vser0.0,chardev=sampler,name=dynamem.sampler",
        ]  # fmt: skip
    if config.disk is not None:  # first, so the root disk is vda
        argv += [
            "-drive", f"file={files.overlay_image},if=none,id=root0,format=qcow2,discard=unmap",
            "-device", "virtio-blk-pci,drive=root0,serial=dynamem-root",
            "-drive", f"file={files.seed_image},if=none,id=seed0,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=seed0,serial=dynamem-seed",
        ]  # fmt: skip
    if config.swap == "disk":
        argv += [
            "-drive", f"file={files.swap_image},if=none,id=swap0,format=raw,discard=unmap",
            "-device", "virtio-blk-pci,drive=swap0,serial=dynamem-swap",
        ]  # fmt: skip
    if config.data_size:
        argv += [
            "-drive", f"file={files.data_image},if=none,id=data0,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=data0,serial=dynamem-data",
        ]  # fmt: skip
    for name, path in sorted(files.fw_cfg.items()):
        argv += ["-fw_cfg", f"name=opt/dynamem/{name},file={path}"]
    argv += list(config.extra_args)
    return argv
