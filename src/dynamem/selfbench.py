"""Benchmarks of dynamem itself (boot overhead, guest build), measured side by side.

Medians and ratios from interleaved repeats in one run, never a lone absolute time: the
host is shared and noisy.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from dynamem.errors import DeadlineExceeded
from dynamem.guest.build import build
from dynamem.guest.recipe import load_recipe
from dynamem.launch import Plan
from dynamem.paths import make_run_dir
from dynamem.qemu.machine import VM
from dynamem.qemu.process import QemuProcess

INIT_MARK = "dynamem-init: started"


def bare_boot_to_init(plan: Plan, timeout: float = 120.0) -> float:
    """Seconds from starting a bare QEMU (no QMP, no network) to the guest's init line."""
    c = plan.config
    run_dir = make_run_dir("bare")
    console = run_dir / "console.log"
    argv = [
        c.qemu_binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        c.machine,
        "-accel",
        c.accel,
        "-cpu",
        c.cpu or ("host" if c.accel == "kvm" else "max"),
        "-smp",
        str(c.cpus),
        "-m",
        str(c.memory // (1 << 20)),
        "-kernel",
        str(c.kernel),
        "-initrd",
        str(c.initrd),
        "-append",
        c.cmdline,
        "-serial",
        f"file:{console}",
    ]
    proc = QemuProcess(argv, run_dir / "qemu.log")
    try:
        start = time.monotonic()
        proc.start()
        while True:
            if console.exists() and INIT_MARK in console.read_text(errors="replace"):
                return time.monotonic() - start
            if time.monotonic() - start > timeout or not proc.alive():
                raise DeadlineExceeded(f"bare QEMU did not reach init within {timeout:g} s")
            time.sleep(0.005)
    finally:
        proc.kill()
        for f in run_dir.iterdir():
            f.unlink()
        run_dir.rmdir()


def dynamem_boot_to_ssh(plan: Plan) -> dict[str, float]:
    """Seconds from launch to QMP, to the ready line, and to a first SSH command answered."""
    start = time.monotonic()
    with VM(plan.config) as vm:
        vm.start()
        vm.run(["true"], timeout=30)
        total = time.monotonic() - start
        return {"qmp": vm.timings["qmp"], "ready": vm.timings["ready"], "ssh_command": total}


@dataclass(frozen=True)
class BootBench:
    bare: list[float]
    dynamem: list[float]

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.dynamem) / statistics.median(self.bare)

    @property
    def paired_ratios(self) -> list[float]:
        return [d / b for d, b in zip(self.dynamem, self.bare, strict=True)]


def bench_boot(plan: Plan, repeats: int, report: Callable[[str], None]) -> BootBench:
    bare: list[float] = []
    ours: list[float] = []
    for i in range(repeats):
        # Alternate which goes first so a drifting host does not favour one side.
        order = ("bare", "dynamem") if i % 2 == 0 else ("dynamem", "bare")
        for kind in order:
            if kind == "bare":
                bare.append(bare_boot_to_init(plan))
                report(f"repeat {i + 1}/{repeats}: bare QEMU to init     {bare[-1]:6.2f} s")
            else:
                t = dynamem_boot_to_ssh(plan)
                ours.append(t["ssh_command"])
                report(
                    f"repeat {i + 1}/{repeats}: dynamem to SSH answer {t['ssh_command']:6.2f} s"
                    f" (QMP {t['qmp']:.2f} s, ready line {t['ready']:.2f} s)"
                )
    return BootBench(bare, ours)


def bench_build(guest: str, repeats: int) -> tuple[list[float], list[float]]:
    """(clean rebuild times from the warm package cache, cache-hit times)."""
    recipe = load_recipe(guest)
    build(recipe)  # warm the package cache first
    rebuild: list[float] = []
    hit: list[float] = []
    for _ in range(repeats):
        start = time.monotonic()
        build(recipe, force=True)
        rebuild.append(time.monotonic() - start)
        start = time.monotonic()
        _, was_hit = build(recipe)
        hit.append(time.monotonic() - start)
        assert was_hit
    return rebuild, hit
