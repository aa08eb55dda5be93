"""Benchmarks of dynamem itself (boot overhead, guest build), measured side by side.

Medians and ratios from interleaved repeats in one run, never a lone absolute time: the
host is shared and noisy.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamem.errors import DeadlineExceeded, VMError
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


@dataclass(frozen=True)
class ResizeBench:
    """Host-side latencies (s) of dynamem's resize and of a bare QMP script, per direction."""

    harness: dict[str, list[float]]
    bare: dict[str, list[float]]
    guest_bounds: list[float]

    def summary(self, direction: str) -> tuple[float, float, float, float]:
        h = statistics.median(self.harness[direction])
        b = statistics.median(self.bare[direction])
        return h, b, h / b, h - b

    def ratio_ci(
        self, direction: str, resamples: int = 10_000, seed: int = 0
    ) -> tuple[float, float]:
        """Bootstrap 95% interval of the ratio of medians (vectorized, seeded)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        h = np.asarray(self.harness[direction])
        b = np.asarray(self.bare[direction])
        hm = np.median(rng.choice(h, (resamples, len(h))), axis=1)
        bm = np.median(rng.choice(b, (resamples, len(b))), axis=1)
        low, high = np.percentile(hm / bm, [2.5, 97.5])
        return float(low), float(high)


def bench_resize(
    mechanism: str,
    size: int,
    repeats: int,
    interval: float,
    report: Callable[[str], None],
    *,
    memory: int = 2 << 30,
    **vm_options: object,
) -> ResizeBench:
    """Grow and shrink by `size` in one VM, alternating dynamem and the bare script."""
    import dataclasses
    import shutil
    import tempfile

    from dynamem import mechanisms
    from dynamem.bareqmp import BareQMP, bare_resize
    from dynamem.cell import plan_for
    from dynamem.resize import resize

    mech = mechanisms.make(mechanism)
    before = memory
    mplan = mech.plan(before, -size, None, None)
    if mechanism == "dimm":
        # Room for the harness's DIMMs and the bare script's, which use their own ids.
        mplan = mech.plan(before, -size, None, mplan.boot + 2 * size)
    plan = plan_for(mech, mplan, **vm_options)
    side = Path(tempfile.mkdtemp(prefix="dynamem-bare-"))
    sock = side / "qmp.sock"
    config = dataclasses.replace(
        plan.config, extra_args=plan.config.extra_args + ("-qmp", f"unix:{sock},server=on,wait=off")
    )
    harness: dict[str, list[float]] = {"grow": [], "shrink": []}
    bare: dict[str, list[float]] = {"grow": [], "shrink": []}
    bounds: list[float] = []
    dimm_size = getattr(mech, "dimm_size", 0)
    try:
        with VM(config) as vm:
            vm.start()
            qmp = BareQMP(str(sock))
            if mplan.prepare:
                resize(vm, mech, mplan.prepare)
            # Steps that keep the guest between `before - size` and `before`.
            steps = [(-size, "shrink"), (size, "grow")]
            for i in range(repeats):
                for who in ("harness", "bare") if i % 2 == 0 else ("bare", "harness"):
                    for delta, direction in (
                        steps
                        if mechanism != "dimm" or who == "harness"
                        else [(size, "grow"), (-size, "shrink")]
                    ):
                        if who == "harness":
                            r = resize(vm, mech, delta, poll_interval_s=interval)
                            if r.outcome != "ok" or r.host_latency_s is None:
                                raise VMError(f"harness {direction}: {r.outcome} {r.message}")
                            harness[direction].append(r.host_latency_s)
                            if r.guest_bound_s is not None:
                                bounds.append(r.guest_bound_s)
                            t = r.host_latency_s
                        else:
                            t = bare_resize(qmp, mechanism, delta, interval, dimm_size)
                            bare[direction].append(t)
                        report(f"repeat {i + 1}/{repeats} {who:7} {direction:6} {t * 1000:8.1f} ms")
            qmp.close()
    finally:
        shutil.rmtree(side, ignore_errors=True)
    return ResizeBench(harness, bare, bounds)


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


def bench_sampler(plan: Plan, seconds: float, report: Callable[[str], None]) -> dict[str, float]:
    """CPU the in-guest sampler uses, as a fraction of one vCPU, at 50 Hz and at the resize
    rate (from its own /proc/self/schedstat)."""
    from dynamem.probes.cost import MEMINFO_KEYS, VMSTAT_KEYS

    modes: list[tuple[str, dict[str, object], int]] = [
        ("idle (not sampling)", {}, 0),
        ("50 Hz, MemTotal/MemFree/SwapFree only", {}, 20_000_000),
        (
            "50 Hz, + meminfo and vmstat fields",
            {"full_meminfo": MEMINFO_KEYS, "full_vmstat": VMSTAT_KEYS, "every": 1},
            20_000_000,
        ),
        (
            "50 Hz full, batched by 10",
            {"full_meminfo": MEMINFO_KEYS, "full_vmstat": VMSTAT_KEYS, "every": 1, "batch": 10},
            20_000_000,
        ),
        (
            "500 Hz fast + 50 Hz full (during a resize)",
            {"full_meminfo": MEMINFO_KEYS, "full_vmstat": VMSTAT_KEYS, "every": 10},
            2_000_000,
        ),
    ]
    out: dict[str, float] = {}
    with VM(plan.config) as vm:
        vm.start()
        ch = vm.sampler
        for label, options, interval in modes:
            ch.configure(**options)  # type: ignore[arg-type]
            before = ch.cpu_seconds()
            ch.set_interval(interval)
            time.sleep(seconds)
            ch.set_interval(0)
            share = (ch.cpu_seconds() - before) / seconds
            out[label] = share
            report(f"{label:44} {share * 100:6.2f}% of one vCPU")
    return out


@dataclass
class StatsBench:
    vectorized_s: list[float]  # one whole pass over every group, per repeat
    loop_s: float  # scipy.stats.bootstrap called group by group, same data
    loop_groups: int
    groups: int
    samples: int
    coverage: float  # share of groups whose interval holds the true median


def bench_stats(
    samples: int = 1_000_000,
    groups: int = 1000,
    resamples: int = 2000,
    repeats: int = 5,
    loop_groups: int | None = None,
) -> StatsBench:
    """Per-group median, IQR and 95% CI of the median: dynamem's vectorized pass against
    a loop calling scipy.stats.bootstrap per group, on the same lognormal data.

    The loop runs over `loop_groups` groups (all by default) and its time is scaled to all
    groups only when fewer were asked for; the result says which.
    """
    import numpy as np
    from scipy import stats

    from dynamem.analysis.stats import group_stats

    rng = np.random.default_rng(20261126)
    values = rng.lognormal(size=samples)  # true median exp(0) = 1
    codes = np.sort(rng.integers(0, groups, samples))
    vectorized = []
    for _ in range(repeats):
        t = time.perf_counter()
        g = group_stats(values, codes, groups)
        vectorized.append(time.perf_counter() - t)
    coverage = float(np.mean((g.ci_low <= 1.0) & (g.ci_high >= 1.0)))
    edges = np.searchsorted(codes, np.arange(groups + 1))
    n_loop = groups if loop_groups is None else min(loop_groups, groups)
    t = time.perf_counter()
    for k in range(n_loop):
        x = values[edges[k] : edges[k + 1]]
        np.median(x)
        np.quantile(x, [0.25, 0.75])
        stats.bootstrap((x,), np.median, n_resamples=resamples, method="percentile", random_state=k)
    loop = (time.perf_counter() - t) * groups / n_loop
    return StatsBench(vectorized, loop, n_loop, groups, samples, coverage)
