"""From command-line choices to a ready VMConfig: guest image, QEMU check, accelerator."""

from dataclasses import dataclass, replace
from pathlib import Path

from dynamem.errors import UserError
from dynamem.guest import cloud, debootstrap
from dynamem.guest.build import GuestImage, find_image
from dynamem.guest.recipe import load_cloud_recipe, load_recipe
from dynamem.qemu import accel
from dynamem.qemu.config import ICOUNT, VMConfig, vcpus_for

MIN_QEMU = (7, 2, 0)


@dataclass(frozen=True)
class Plan:
    config: VMConfig
    image: GuestImage | cloud.CloudImage
    accel: accel.AccelChoice
    qemu_version: tuple[int, int, int]


def check_qemu(qemu: str) -> tuple[int, int, int]:
    version = accel.qemu_version(qemu)
    if version < MIN_QEMU:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_QEMU))
        raise UserError(f"{qemu} is QEMU {have}; dynamem needs {need} or newer")
    return version


def guest_image(guest: str) -> GuestImage | cloud.CloudImage:
    """`cloud:PATH` (any cloud image), a cloud recipe's built image, or an embedded guest."""
    if cloud.is_cloud(guest):
        return cloud.load(guest)
    recipe = load_cloud_recipe(guest)
    if recipe is not None:
        return cloud.load(debootstrap.find_disk(recipe), name=recipe.name)
    return find_image(load_recipe(guest))


def is_cloud_guest(guest: str) -> bool:
    return cloud.is_cloud(guest) or load_cloud_recipe(guest) is not None


def guest_label(guest: str) -> str:
    """How a cell's condition names its guest: the embedded recipe's name, or the cloud
    image's name and sha256 (images are never pooled with each other or the embedded guest)."""
    image = guest_image(guest)
    return image.label if isinstance(image, cloud.CloudImage) else guest


def plan_vm(
    *,
    guest: str = "minimal",
    memory: int,
    cpus: int = 2,
    cpu: str | None = None,
    accel_request: str | None = None,
    qemu: str = "qemu-system-x86_64",
    maxmem: int | None = None,
    slots: int = 0,
    memhp_default_state: str = "online_movable",
    kernel_args: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    swap: str = "none",
    swap_size: int = 1 << 30,
    data_size: int = 0,
    mechanism: str | None = None,
) -> Plan:
    """Validate everything that can be checked before a QEMU is started.

    `cpu` is the guest's -cpu (None: the accelerator's default, config.default_cpu);
    under tcg-icount the guest gets one vCPU whatever `cpus` says (config.vcpus_for).
    A cloud image that lacks what `mechanism` needs is refused here, naming what it lacks."""
    if accel_request not in (None, "auto", "kvm", "tcg", ICOUNT):
        raise UserError(
            f"unknown accelerator {accel_request!r} (choose from auto, kvm, tcg, {ICOUNT})"
        )
    fixed = accel_request if accel_request in ("tcg", ICOUNT) else None
    # Configuration errors first: nothing is probed or started for a plan that cannot run.
    config = VMConfig(
        kernel=Path("/"),
        initrd=Path("/"),
        memory=memory,
        maxmem=maxmem,
        slots=slots,
        cpus=vcpus_for(fixed or "kvm", cpus),
        cpu=cpu,
        # the accelerator is probed below; this one only lets the checks run first
        accel=fixed or "kvm",
        memhp_default_state=memhp_default_state,
        kernel_args=kernel_args,
        extra_args=extra_args,
        qemu_binary=qemu,
        swap=swap,
        swap_size=swap_size,
        data_size=data_size,
    )
    version = check_qemu(qemu)
    image = guest_image(guest)
    if isinstance(image, cloud.CloudImage):
        image.check(mechanism, swap)
        config = replace(config, disk=image.path, disk_format=image.format, root=image.root)
    choice = accel.choose(accel_request, qemu, image.kernel)
    config = replace(config, kernel=image.kernel, initrd=image.initrd, accel=choice.accel)
    return Plan(config, image, choice, version)
