"""Choosing KVM or TCG by probing, because /dev/kvm existing is no proof KVM works.

On a PVM host (kvm_pvm loaded) /dev/kvm opens fine but a stock guest kernel hangs after
"Probing EDD", before its banner. So the probe boots the guest kernel under KVM for a few
seconds and requires the banner on the serial console. The verdict is cached per host
boot, QEMU binary and kernel.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dynamem.errors import UserError
from dynamem.paths import cache_dir, make_run_dir
from dynamem.qemu.config import ICOUNT
from dynamem.qemu.process import QemuProcess

PROBE_SECONDS = 15.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def _kvm_modules() -> list[str]:
    return sorted(
        m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(f"/sys/module/{m}").exists()
    )


def probe_boot(qemu: str, kernel: Path, seconds: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot `kernel` under KVM without an initrd; True once it prints its banner."""
    run_dir = make_run_dir("probe")
    console = run_dir / "console.log"
    proc = QemuProcess(
        [
            qemu,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
            "-serial",
            f"file:{console}",
        ],
        run_dir / "qemu.log",
    )
    start = time.monotonic()
    try:
        proc.start()
        while time.monotonic() - start < seconds:
            if console.exists() and "Linux version" in console.read_text(errors="replace"):
                return (
                    True,
                    f"KVM probe boot printed the kernel banner in {time.monotonic() - start:.1f} s",
                )
            if not proc.alive():
                return False, f"KVM probe QEMU exited: {proc.log_tail(2) or 'no output'}"
            time.sleep(0.05)
        return False, f"KVM probe boot printed no kernel banner within {seconds:g} s"
    finally:
        proc.kill()
        for f in run_dir.iterdir():
            f.unlink()
        run_dir.rmdir()


def _probe_key(qemu: str, kernel: Path) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(f"{boot_id}\n{qemu}\n".encode())
    with contextlib.suppress(OSError):
        digest.update(str(os.stat(shutil.which(qemu) or qemu).st_mtime_ns).encode())
    digest.update(kernel.read_bytes())
    return digest.hexdigest()[:16]


def choose(
    requested: str | None, qemu: str, kernel: Path | None, *, reprobe: bool = False
) -> AccelChoice:
    """The accelerator to use and why; `requested` ('kvm'/'tcg'/None for auto) wins if usable.

    An explicit `kvm` is probed like `auto` (a KVM that cannot boot the guest kernel is
    refused in one line before anything starts) instead of failing inside QEMU later.
    """
    if requested not in (None, "auto", "kvm", "tcg", ICOUNT):
        raise UserError(f"unknown accelerator {requested!r} (choose from auto, kvm, tcg, {ICOUNT})")
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --accel tcg")
    if requested == ICOUNT:
        return AccelChoice(
            ICOUNT,
            f"requested with --accel {ICOUNT}: single-threaded TCG, one guest instruction per "
            "guest nanosecond, 1 vCPU; guest-clock figures are deterministic, wall-clock "
            "ones are not meaningful",
        )
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if requested == "kvm" and not kvm_ok:
        raise UserError("--accel kvm requested but /dev/kvm is missing or not accessible")
    if not kvm_ok:
        return AccelChoice("tcg", "/dev/kvm is missing or not accessible")
    modules = ", ".join(_kvm_modules()) or "no kvm vendor module"
    if kernel is None:
        if requested == "kvm":
            return AccelChoice("kvm", "requested with --accel kvm (not probed: no guest kernel)")
        return AccelChoice("tcg", f"/dev/kvm present ({modules}) but no guest kernel to probe with")
    ok, reason = _probe_cached(qemu, kernel, modules, reprobe)
    if requested == "kvm":
        if not ok:
            raise UserError(f"--accel kvm requested but KVM cannot boot the guest here: {reason}")
        return AccelChoice("kvm", f"requested with --accel kvm; {reason}")
    return AccelChoice("kvm" if ok else "tcg", reason)


def _probe_cached(qemu: str, kernel: Path, modules: str, reprobe: bool) -> tuple[bool, str]:
    """(KVM boots the kernel, why), from the per-host-boot cache or a fresh probe."""
    cache = cache_dir() / "accel-probe.json"
    key = _probe_key(qemu, kernel)
    if not reprobe and cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved["accel"] == "kvm", saved["reason"] + " (cached for this host boot)"
        except (ValueError, KeyError):
            pass
    ok, detail = probe_boot(qemu, kernel)
    choice = AccelChoice("kvm" if ok else "tcg", f"/dev/kvm present ({modules}); {detail}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, **asdict(choice)}))
    tmp.replace(cache)
    return ok, choice.reason


def qemu_version(qemu: str) -> tuple[int, int, int]:
    """(major, minor, micro) from `qemu --version`; UserError if missing or unparsable."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError as exc:
        raise UserError(f"{qemu} not found: apt-get install qemu-system-x86") from exc
    except (OSError, subprocess.SubprocessError) as exc:  # not executable, hangs...
        raise UserError(f"cannot run {qemu} --version: {exc}") from exc
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise UserError(f"cannot read the QEMU version from {qemu} --version")
    major, minor, micro = (int(g) for g in match.groups())
    return major, minor, micro
