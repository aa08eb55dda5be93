"""Benchmarks of dynamem itself (boot overhead, guest build), measured side by side.

Medians and ratios from interleaved repeats in one run, never a lone absolute time: the
host is shared and noisy.
"""

import contextlib
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dynamem.errors import DeadlineExceeded, VMError
from dynamem.guest.build import build
from dynamem.guest.recipe import load_recipe
from dynamem.launch import Plan
from dynamem.observer import Observer
from dynamem.paths import make_run_dir
from dynamem.qemu import snapshot as snapshots
from dynamem.qemu.machine import VM
from dynamem.qemu.process import QemuProcess
from dynamem.units import format_size

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
        c.cpu_model,
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


def bare_cloud_boot(plan: Plan, timeout: float = 420.0) -> float:
    """Seconds from starting QEMU to cloud-init's final message on the console, with the
    very command line dynamem boots the cloud image with (overlay, seed, network, QMP and
    sampler sockets listening but never spoken to), and nothing else: no SSH, no sampler."""
    import socket

    from dynamem.guest import cloud
    from dynamem.keys import make_keypair
    from dynamem.qemu.config import RunFiles, build_argv
    from dynamem.qemu.machine import free_port

    c = plan.config
    assert c.disk is not None
    run_dir = make_run_dir("bare")
    listeners: list[socket.socket] = []
    proc: QemuProcess | None = None
    try:
        (run_dir / "keys").mkdir(mode=0o700)
        client = make_keypair(run_dir / "keys", "client")
        host = make_keypair(run_dir / "keys", "hostkey")
        fw_cfg = {"authorized_keys": client.public, "hostkey": host.private}
        files = RunFiles(run_dir, free_port(), fw_cfg)
        cloud.make_overlay(c.disk, c.disk_format, files.overlay_image)
        user = cloud.user_data(client.public_line, host.private.read_text(), host.public_line)
        cloud.make_seed(files.seed_image, run_dir.name, user)
        for path in (files.qmp_socket, files.sampler_socket):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(sock)
            sock.bind(str(path))
            sock.listen(1)
        for size, image in ((c.swap_size if c.swap == "disk" else 0, files.swap_image),
                            (c.data_size, files.data_image)):  # fmt: skip
            if size:
                with open(image, "wb") as f:
                    f.truncate(size)
        proc = QemuProcess(build_argv(c, files), files.qemu_log)
        start = time.monotonic()
        proc.start()
        while True:
            console = files.console_log
            if console.exists() and cloud.READY_WORD in console.read_text(errors="replace"):
                return time.monotonic() - start
            if time.monotonic() - start > timeout or not proc.alive():
                raise DeadlineExceeded(
                    f"bare QEMU did not reach cloud-init's final message within {timeout:g} s"
                )
            time.sleep(0.01)
    finally:
        if proc is not None:
            proc.kill()
        for sock in listeners:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def snapshot_start_to_ssh(plan: Plan) -> dict[str, float]:
    """A cell's start from the saved state, as `run` does it (its lock and sha256 checks
    included): seconds to QMP, to the state loaded and the sampler answering, and to a
    first SSH command answered."""
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        vm = snapshots.start(plan.config, stack).vm
        vm.run(["true"], timeout=30)
        total = time.monotonic() - start
        return {"qmp": vm.timings["qmp"], "ready": vm.timings["ready"], "ssh_command": total}


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
    # the same VM started from its saved post-boot state (empty: not measured)
    snapshot: list[float] = field(default_factory=list)
    state_build_s: float = 0.0  # building that state, if this run had to

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.dynamem) / statistics.median(self.bare)

    @property
    def paired_ratios(self) -> list[float]:
        return [d / b for d, b in zip(self.dynamem, self.bare, strict=True)]

    @property
    def snapshot_ratio(self) -> float:
        """Start from the saved state / fresh boot, both to an SSH command answered."""
        return statistics.median(self.snapshot) / statistics.median(self.dynamem)

    @property
    def snapshot_paired_ratios(self) -> list[float]:
        return [s / d for s, d in zip(self.snapshot, self.dynamem, strict=True)]


def bench_boot(
    plan: Plan, repeats: int, report: Callable[[str], None], *, snapshot: bool = True
) -> BootBench:
    bare: list[float] = []
    ours: list[float] = []
    restored: list[float] = []
    arms = ["bare", "dynamem"]
    built = 0.0
    if snapshot:
        t0 = time.monotonic()
        state, built_now = snapshots.ensure(plan.config)
        built = time.monotonic() - t0 if built_now else 0.0
        report(
            f"saved state {state.key}: "
            + (f"built in {built:.2f} s" if built_now else "already in the cache")
            + f", {state.meta.get('stream_bytes', 0) / 2**20:.1f} MiB"
        )
        arms.append("snapshot")
    for i in range(repeats):
        # Rotate which goes first so a drifting host does not favour one side.
        order = arms[i % len(arms) :] + arms[: i % len(arms)]
        for kind in order:
            if kind == "bare" and plan.config.disk is not None:
                bare.append(bare_cloud_boot(plan))
                report(f"repeat {i + 1}/{repeats}: bare QEMU to cloud-init done {bare[-1]:6.2f} s")
            elif kind == "bare":
                bare.append(bare_boot_to_init(plan))
                report(f"repeat {i + 1}/{repeats}: bare QEMU to init     {bare[-1]:6.2f} s")
            else:
                t = snapshot_start_to_ssh(plan) if kind == "snapshot" else dynamem_boot_to_ssh(plan)
                (restored if kind == "snapshot" else ours).append(t["ssh_command"])
                what = "saved state to SSH" if kind == "snapshot" else "dynamem to SSH answer"
                ready = "state loaded" if kind == "snapshot" else "ready line"
                report(
                    f"repeat {i + 1}/{repeats}: {what:21} {t['ssh_command']:6.2f} s"
                    f" (QMP {t['qmp']:.2f} s, {ready} {t['ready']:.2f} s)"
                )
    return BootBench(bare, ours, restored, built)


ARMS_BARE = "bare"
BARE_PAUSE_S = 2.0  # about what dynamem spends between two steps (settle, figures, set-up)


@dataclass
class ResizeBench:
    """One mechanism's resizes in one VM: dynamem under each observer setting and a bare
    QMP script, interleaved, each arm's host-side latencies (s) per direction."""

    mechanism: str
    workload: str
    size: int
    cpu_model: str
    host: dict[str, dict[str, list[float]]]  # arm -> direction -> host-side latency
    guest: dict[str, dict[str, list[float]]]  # harness arm -> direction -> guest-visible
    bounds: dict[str, list[float]]  # harness arm -> guest-visible bound of each resize
    targets: dict[str, list[float]]  # harness arm -> max(5 ms, 1% latency) of each resize
    # harness arm -> sampler CPU / time from the request to the host-side outcome (one vCPU)
    sampler_share: dict[str, list[float]]
    loads: list[float]  # the host's 1-minute load average at each repeat
    icount: bool = False
    # harness arm -> that CPU in seconds (over a 20 ms DIMM grow, the query that reads it is
    # most of it)
    sampler_cpu: dict[str, list[float]] = field(default_factory=dict)
    # arm -> direction -> the guest's clock from right before the request to right after
    # the host saw completion (every arm reads it the same way; in icount mode it counts
    # guest instructions plus idle time skipped to the next timer)
    window: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def guest_clock_counts_work(self) -> bool:
        """In icount mode an idle guest's clock jumps to its next timer whenever it waits,
        and the timers differ between arms (the sampler's are timers): only a busy guest's
        clock counts the work. Outside icount it runs with the host's."""
        return not self.icount or self.workload != "idle"

    def window_ratio(self, arm: str, direction: str, against: str = ARMS_BARE) -> "Ratio | None":
        if not self.guest_clock_counts_work:
            return None
        a = self.window.get(arm, {}).get(direction, [])
        b = self.window.get(against, {}).get(direction, [])
        if not a or len(a) != len(b):
            return None
        return median_ratio([x / y for x, y in zip(a, b, strict=True)])

    def paired_ratios(self, arm: str, direction: str, against: str = ARMS_BARE) -> list[float]:
        """arm / against per repeat (the two ran back to back in the same guest)."""
        return [
            a / b
            for a, b in zip(self.host[arm][direction], self.host[against][direction], strict=True)
        ]

    def ratio(self, arm: str, direction: str, against: str = ARMS_BARE) -> "Ratio":
        return median_ratio(self.paired_ratios(arm, direction, against))


@dataclass(frozen=True)
class Ratio:
    """The median of paired ratios with its distribution-free order-statistic interval."""

    median: float
    low: float
    high: float
    level: float  # the interval's exact coverage (below 95% when n is too small for it)
    n: int


def median_ratio(ratios: list[float], confidence: float = 0.95) -> Ratio:
    import numpy as np

    from dynamem.analysis.stats import median_ci_ranks

    x = np.sort(np.asarray(ratios, dtype=np.float64))
    lo, hi, level = median_ci_ranks(np.array([len(x)]), confidence)
    return Ratio(float(np.median(x)), float(x[lo[0]]), float(x[hi[0]]), float(level[0]), len(x))


def _arm_order(arms: list[str], i: int) -> list[str]:
    """Repeat i starts with a different arm each time (and reverses every other round), so
    a drifting host does not favour one arm."""
    k = i % len(arms)
    order = arms[k:] + arms[:k]
    return order if (i // len(arms)) % 2 == 0 else order[::-1]


def bench_resize(
    mechanism: str,
    size: int,
    repeats: int,
    fixed_poll: float | None,
    report: Callable[[str], None],
    *,
    memory: int = 2 << 30,
    observers: "tuple[str | Observer, ...]" = ("adaptive",),
    stress: int = 0,
    **vm_options: object,
) -> ResizeBench:
    """Grow and shrink by `size` in one VM, interleaving dynamem (one arm per observer
    setting) and a bare QMP script on the same guest: "bare" polls on dynamem's host-side
    back-off; with `fixed_poll`, a second bare arm polls at that fixed interval (what a fast
    poll costs the resize it times).

    With `stress`, `stress --vm-bytes N --vm-keep` is (re)started before every shrink, so
    each arm's shrink finds a freshly allocated working set (it fills hotplugged memory
    first, which a hotplug shrink must then migrate). The guest has `memory` when each
    shrink starts; DIMM arms plug first and remove what they plugged (the bare script can
    only remove its own DIMMs), the others shrink first and grow back.
    """
    import dataclasses
    import os
    import shutil
    import tempfile

    from dynamem import mechanisms
    from dynamem.bareqmp import BareQMP, bare_resize
    from dynamem.cell import plan_for
    from dynamem.observer import ADAPTIVE, Backoff, named
    from dynamem.resize import resize
    from dynamem.workloads import Stress

    settings = {o.name: o for o in map(named, observers)}  # unknown names fail here
    mech = mechanisms.make(mechanism)
    plugs_first = mechanism == "dimm"
    steps = (
        [(size, "grow"), (-size, "shrink")] if plugs_first else [(-size, "shrink"), (size, "grow")]
    )
    mplan = mech.plan(memory - size if plugs_first else memory, steps[0][0], None, None)
    mech = mech.with_plan(mplan)
    plan = plan_for(mech, mplan, **vm_options)
    side = Path(tempfile.mkdtemp(prefix="dynamem-bare-"))
    sock = side / "qmp.sock"
    config = dataclasses.replace(
        plan.config, extra_args=plan.config.extra_args + ("-qmp", f"unix:{sock},server=on,wait=off")
    )
    bare_arms = {ARMS_BARE: ADAPTIVE.host_poll}
    if fixed_poll is not None:
        bare_arms[f"bare-{fixed_poll * 1000:g}ms"] = Backoff(fixed_poll, fixed_poll)
    arms = [*bare_arms, *settings]
    out = ResizeBench(
        mechanism, "stress" if stress else "idle", size, config.cpu_model,
        icount=config.icount,
        host={a: {"grow": [], "shrink": []} for a in arms},
        guest={a: {"grow": [], "shrink": []} for a in settings},
        bounds={a: [] for a in settings},
        targets={a: [] for a in settings},
        sampler_share={a: [] for a in settings},
        loads=[],
    )  # fmt: skip
    dimm_size = getattr(mech, "dimm_size", 0)
    try:
        with VM(config) as vm:
            vm.start()
            qmp = BareQMP(str(sock))

            def guest_clock() -> int:
                return vm.sampler.cpu_and_clock()[1]

            if mplan.prepare:
                resize(vm, mech, mplan.prepare)
            workload = Stress(stress) if stress else None
            for i in range(repeats):
                out.loads.append(os.getloadavg()[0])
                for arm in _arm_order(arms, i):
                    for delta, direction in steps:
                        if workload is not None and direction == "shrink":
                            workload.stop(vm)
                            workload.start(vm)
                        if arm in bare_arms:
                            bt = bare_resize(
                                qmp, mechanism, delta, bare_arms[arm], dimm_size, guest_clock
                            )
                            out.host[arm][direction].append(bt.seconds)
                            if bt.guest_seconds is not None:
                                out.window.setdefault(arm, {}).setdefault(direction, []).append(
                                    bt.guest_seconds
                                )
                            report(
                                f"repeat {i + 1}/{repeats} {arm:9} {direction:6} host "
                                f"{bt.seconds * 1000:8.1f} ms, guest clock "
                                f"{(bt.guest_seconds or 0) * 1000:8.1f} ms"
                            )
                            # dynamem lets the guest settle after each step (and reads its
                            # figures): the next step of either arm starts from a quiet
                            # guest. A DIMM ejected while still being onlined is refused.
                            time.sleep(BARE_PAUSE_S)
                            continue
                        r = resize(vm, mech, delta, observer=settings[arm])
                        if r.outcome != "ok" or r.host_latency_s is None:
                            raise VMError(f"{arm} {direction}: {r.outcome} {r.message}")
                        out.host[arm][direction].append(r.host_latency_s)
                        if r.sampler_request_window_s is not None:
                            out.window.setdefault(arm, {}).setdefault(direction, []).append(
                                r.sampler_request_window_s
                            )
                        if r.guest_latency_s is not None:
                            out.guest[arm][direction].append(r.guest_latency_s)
                        if r.guest_bound_s is not None and r.guest_bound_target_s is not None:
                            out.bounds[arm].append(r.guest_bound_s)
                            out.targets[arm].append(r.guest_bound_target_s)
                        if r.sampler_request_share is not None:
                            out.sampler_share[arm].append(r.sampler_request_share)
                            out.sampler_cpu.setdefault(arm, []).append(
                                r.sampler_request_cpu_s or 0.0
                            )
                        guest = (
                            "-" if r.guest_latency_s is None else f"{r.guest_latency_s * 1000:.1f}"
                        )
                        report(
                            f"repeat {i + 1}/{repeats} {arm:9} {direction:6} host "
                            f"{r.host_latency_s * 1000:8.1f} ms, guest {guest} ms, guest clock "
                            f"{(r.sampler_request_window_s or 0) * 1000:.1f} ms, sampler "
                            f"{(r.sampler_request_share or 0) * 100:.2f}% of a vCPU until the "
                            f"host-side outcome, {(r.sampler_cpu_share or 0) * 100:.2f}% over "
                            f"the whole watch"
                        )
            if workload is not None:
                workload.stop(vm)
            qmp.close()
    finally:
        shutil.rmtree(side, ignore_errors=True)
    return out


TARGET_RATIO = 1.05


def _verdict(r: Ratio) -> str:
    if r.median <= TARGET_RATIO and r.high <= TARGET_RATIO:
        return "meets <= 1.05"
    if r.median <= TARGET_RATIO:
        return "median meets <= 1.05, interval reaches above"
    if r.low <= TARGET_RATIO:
        return "ABOVE 1.05, interval reaches below (not resolved)"
    return "ABOVE 1.05"


def resize_lines(b: ResizeBench) -> list[str]:
    """What `dynamem selfbench resize` prints for one mechanism (medians, paired ratios)."""

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:.1f} ms" if xs else "-"

    lines = [
        f"{b.mechanism} {b.workload} {format_size(b.size)}, -cpu {b.cpu_model}; host load "
        f"(1 min) {min(b.loads):.2f}-{max(b.loads):.2f} over {len(b.loads)} repeats"
    ]
    for direction in ("shrink", "grow"):
        bare = b.host[ARMS_BARE][direction]
        lines.append(f"  {direction}: bare QMP script host-side median {ms(bare)}")
        for arm in b.host:
            if arm != ARMS_BARE and arm not in b.guest:  # a bare script polling otherwise
                r = b.ratio(arm, direction)
                lines.append(
                    f"    {arm}: host-side {ms(b.host[arm][direction])}; / bare = "
                    f"{r.median:.3f} [{r.low:.3f}, {r.high:.3f}] ({r.level:.1%}, n={r.n})"
                )
        for arm in b.guest:
            r = b.ratio(arm, direction)
            w = b.window_ratio(arm, direction)
            if w is not None:
                lines.append(
                    f"    dynamem ({arm}) / bare on the guest's clock = {w.median:.3f} "
                    f"[{w.low:.3f}, {w.high:.3f}] ({w.level:.1%}, n={w.n})"
                )
            lines.append(
                f"    dynamem ({arm}): host-side {ms(b.host[arm][direction])}, guest-visible "
                f"{ms(b.guest[arm][direction])}; dynamem / bare = {r.median:.3f} "
                f"[{r.low:.3f}, {r.high:.3f}] ({r.level:.1%} order-statistic interval of "
                f"{r.n} paired ratios): {_verdict(r)}"
            )
    for arm in b.guest:
        if b.bounds[arm]:
            within = sum(x <= t for x, t in zip(b.bounds[arm], b.targets[arm], strict=True))
            lines.append(
                f"  {arm}: guest-visible stamp late by at most median {ms(b.bounds[arm])}, max "
                f"{max(b.bounds[arm]) * 1000:.1f} ms; within max(5 ms, 1% of latency) in "
                f"{within}/{len(b.bounds[arm])}"
            )
        if b.sampler_share[arm]:
            shares = b.sampler_share[arm]
            cpu = b.sampler_cpu.get(arm, [])
            lines.append(
                f"  {arm}: sampler CPU from request to host-side outcome median "
                f"{statistics.median(shares):.2%}, max {max(shares):.2%} of one vCPU "
                f"(target <= 5%); median {ms(cpu)} of CPU"
            )
    return lines


def mechanism_ratio_lines(
    benches: list[ResizeBench], direction: str = "shrink", resamples: int = 2000, seed: int = 0
) -> list[str]:
    """virtio-mem / balloon as dynamem measures it against the bare script's, same run:
    host-side and guest-visible latency against the bare script's host-side latency, and
    the guest's clock over the request window against the bare script's on the same clock.

    Percentile bootstrap over repeats (each repeat's arms resampled together), seeded."""
    import numpy as np

    by = {b.mechanism: b for b in benches}
    if "virtio-mem" not in by or "balloon" not in by:
        return []
    vm, bal = by["virtio-mem"], by["balloon"]
    rng = np.random.default_rng(seed)

    def data(b: ResizeBench, arm: str, kind: str) -> list[float]:
        table = {"host": b.host, "guest": b.guest, "window": b.window}[kind]
        return table.get(arm, {}).get(direction, [])

    def med(b: ResizeBench, arm: str, kind: str, idx: np.ndarray) -> np.ndarray:
        return np.asarray(np.median(np.asarray(data(b, arm, kind))[idx], axis=-1))

    n_vm, n_bal = len(vm.host[ARMS_BARE][direction]), len(bal.host[ARMS_BARE][direction])
    i_vm = rng.integers(0, n_vm, (resamples, n_vm))
    i_bal = rng.integers(0, n_bal, (resamples, n_bal))
    all_vm, all_bal = np.arange(n_vm), np.arange(n_bal)
    bare = float(med(vm, ARMS_BARE, "host", all_vm) / med(bal, ARMS_BARE, "host", all_bal))
    lines = [f"virtio-mem / balloon {direction}: bare QMP script {bare:.3f}"]
    labels = {"host": "host-side", "guest": "guest-visible", "window": "guest's clock"}
    for arm in vm.guest:
        if arm not in bal.guest:
            continue
        for kind in ("host", "guest", "window"):
            reference = "window" if kind == "window" else "host"
            complete = (kind != "window" or vm.guest_clock_counts_work) and all(
                len(data(b, a, k)) == n
                for b, n in ((vm, n_vm), (bal, n_bal))
                for a, k in ((arm, kind), (ARMS_BARE, reference))
            )
            if not complete:
                continue
            ours = med(vm, arm, kind, all_vm) / med(bal, arm, kind, all_bal)
            theirs = med(vm, ARMS_BARE, reference, all_vm) / med(bal, ARMS_BARE, reference, all_bal)
            boot = (med(vm, arm, kind, i_vm) / med(bal, arm, kind, i_bal)) / (
                med(vm, ARMS_BARE, reference, i_vm) / med(bal, ARMS_BARE, reference, i_bal)
            )
            low, high = np.percentile(boot, [2.5, 97.5])
            agree = float(ours / theirs)
            ok = "within 10%" if 0.9 <= agree <= 1.1 else "NOT within 10%"
            lines.append(
                f"  dynamem ({arm}, {labels[kind]}): {float(ours):.3f} against the bare "
                f"script's {float(theirs):.3f}: {agree:.3f} [{low:.3f}, {high:.3f}] "
                f"(bootstrap 95%): {ok}"
            )
    return lines


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


def bench_sampler(
    plan: Plan, seconds: float, report: Callable[[str], None], *, stress: int = 0
) -> dict[str, float]:
    """CPU the in-guest sampler uses, as a share of one vCPU, per way of looking, while
    nothing changes (from its own /proc/self/schedstat, over the guest's own clock).

    The per-look modes separate what a wake-up costs from what sending a line and reading
    the full record add; "adaptive, a resize of N s" is the default observer's schedule run
    for `seconds` from its start, i.e. its average over a resize that long.
    """
    from dynamem.observer import ADAPTIVE, DENSE, Backoff
    from dynamem.probes.cost import MEMINFO_KEYS, VMSTAT_KEYS
    from dynamem.workloads import Stress

    full: dict[str, object] = {"full_meminfo": MEMINFO_KEYS, "full_vmstat": VMSTAT_KEYS}
    hz100 = Backoff(0.01, 0.01)
    modes: list[tuple[str, dict[str, object], Backoff | None, Backoff | None]] = [
        ("asleep (between resizes)", {}, None, None),
        ("100 Hz looks, none sent (nothing changed)", {"onchange": True}, hz100, None),
        ("100 Hz looks, every one sent", {}, hz100, None),
        ("100 Hz looks + full record each", full, hz100, hz100),
        ("50 Hz looks + full record each", full, Backoff(0.02, 0.02), Backoff(0.02, 0.02)),
        ("dense: 500 Hz looks sent, full at 50 Hz", full, DENSE.checks, DENSE.full),
        (
            f"adaptive, a resize of {seconds:g} s",
            {**full, "onchange": True, "uevents": True, "cpu_budget": ADAPTIVE.cpu_budget},
            ADAPTIVE.checks,
            ADAPTIVE.full,
        ),
    ]
    out: dict[str, float] = {}
    with VM(plan.config) as vm:
        vm.start()
        workload = Stress(stress) if stress else None
        if workload is not None:
            workload.start(vm)
        ch = vm.sampler
        for label, options, checks, fulls in modes:
            ch.configure(**options)  # type: ignore[arg-type]
            before_cpu = ch.cpu_seconds()
            first = ch.start(checks, fulls) if checks else ch.barrier()
            time.sleep(seconds)
            last = ch.stop()
            share = (ch.cpu_seconds() - before_cpu) / ((last.guest_ns - first.guest_ns) / 1e9)
            out[label] = share
            looks = last.checks - first.checks
            # Under tcg-icount one guest nanosecond is one instruction: the share is an
            # instruction rate, which does not depend on the accelerator.
            rate = f", {share * 1e3:.2f} M instructions/s" if plan.config.icount else ""
            report(f"{label:44} {share * 100:6.2f}% of one vCPU ({looks} looks){rate}")
        if workload is not None:
            workload.stop(vm)
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
