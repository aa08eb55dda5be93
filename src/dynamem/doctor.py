"""`dynamem doctor`: what this host can do, and the exact command to fix what it cannot."""

import os
import shutil
from dataclasses import dataclass

from dynamem.errors import UserError
from dynamem.guest import cloud
from dynamem.launch import MIN_QEMU, check_qemu, guest_image
from dynamem.qemu import accel

# host tool -> Debian package that provides it
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "readelf": "binutils",
    "cpio": "cpio",
    "zstd": "zstd",
    "gcc": "gcc",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def missing_tools() -> dict[str, str]:
    return {tool: pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None}


def run_checks(qemu: str, guest: str, accel_request: str | None, reprobe: bool) -> list[Check]:
    checks: list[Check] = []
    missing = missing_tools()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        checks.append(
            Check(
                "host tools",
                False,
                f"missing {', '.join(sorted(missing))}; fix: apt-get install -y {packages}",
            )
        )
    else:
        checks.append(Check("host tools", True, "all present: " + ", ".join(HOST_TOOLS)))
    try:
        version = check_qemu(qemu)
        checks.append(
            Check(
                "qemu",
                True,
                f"{shutil.which(qemu)} version {'.'.join(map(str, version))}"
                f" (need >= {'.'.join(map(str, MIN_QEMU))})",
            )
        )
    except UserError as exc:
        checks.append(Check("qemu", False, str(exc)))
    kernel = None
    try:
        image = guest_image(guest)
        kernel = image.kernel
        if isinstance(image, cloud.CloudImage):
            image.check()  # what every cell needs
            usable = [m for m in sorted(cloud.MECHANISM_OPTIONS) if not image.missing_for(m)]
            detail = (
                f"{guest}: {image.manifest['os']}, kernel {image.kernel_release}, "
                f"mechanisms {', '.join(usable) or 'none'}, onlines memory by itself: "
                f"{image.onlining}, {image.path}"
            )
        else:
            detail = f"{guest}: kernel {image.kernel_release}, checksums ok, {image.directory}"
        checks.append(Check("guest image", True, detail))
    except UserError as exc:
        checks.append(Check("guest image", False, str(exc)))
    kvm = "/dev/kvm " + (
        "accessible" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "not accessible"
    )
    try:
        choice = accel.choose(accel_request, qemu, kernel, reprobe=reprobe)
        checks.append(Check("accelerator", True, f"{choice.accel}: {choice.reason} [{kvm}]"))
    except UserError as exc:
        checks.append(Check("accelerator", False, f"{exc} [{kvm}]"))
    return checks
