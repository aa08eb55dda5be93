"""The `dynamem` command line: one function per command, shared arguments in one place."""

import argparse
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from dynamem import __version__
from dynamem.errors import UserError
from dynamem.qemu.config import ICOUNT
from dynamem.units import format_size, parse_size

if TYPE_CHECKING:
    from dynamem.guest.recipe import CloudRecipe
    from dynamem.launch import Plan


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog.removeprefix('dynamem ')}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < math.inf:  # also refuses nan, which would never time out
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _size(text: str) -> int:
    return parse_size(text, what="size")


def cmd_guest_lock(args: argparse.Namespace) -> int:
    from dynamem.guest import apt
    from dynamem.guest.recipe import load_recipe

    recipe = load_recipe(args.guest)
    lock = apt.resolve_lock(recipe)
    recipe.lock_path.write_text(lock.to_json())
    print(f"{recipe.lock_path}: {len(lock.packages)} packages pinned, kernel {lock.kernel}")
    return 0


def cmd_guest_build(args: argparse.Namespace) -> int:
    from dynamem.guest.build import build
    from dynamem.guest.recipe import load_cloud_recipe, load_recipe

    start = time.monotonic()
    cloud_recipe = load_cloud_recipe(args.guest)
    if cloud_recipe is not None:
        return _build_cloud(cloud_recipe, args.force, start)
    image, hit = build(load_recipe(args.guest), force=args.force)
    elapsed = time.monotonic() - start
    sums = image.manifest["sha256"]
    assert isinstance(sums, dict)
    print(f"guest {args.guest}: {'cache hit' if hit else 'built'} in {elapsed:.2f} s")
    print(f"kernel  {image.kernel}  sha256 {sums['vmlinuz']}")
    print(f"initrd  {image.initrd}  sha256 {sums['initrd.img']}")
    print(f"release {image.kernel_release}")
    return 0


def _build_cloud(recipe: "CloudRecipe", force: bool, start: float) -> int:
    from dynamem.guest import cloud, debootstrap

    disk, hit = debootstrap.build(recipe, force=force)
    image = cloud.load(disk, name=recipe.name)
    elapsed = time.monotonic() - start
    print(f"guest {recipe.name}: {'cache hit' if hit else 'built'} in {elapsed:.2f} s")
    print(f"image   {disk}  {disk.stat().st_size / 2**20:.0f} MiB  sha256 {image.sha256}")
    print(f"os      {image.manifest['os']}, kernel {image.kernel_release}, root {image.root}")
    print(f"onlines hotplugged memory by itself: {image.onlining}")
    print(f"run on it with --guest {recipe.name} (or --guest cloud:{disk})")
    return 0


GUEST_HELP = "guest: an embedded recipe (default: minimal), debian-cloud, or cloud:PATH.qcow2"


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guest", default="minimal", help=GUEST_HELP)
    p.add_argument(
        "--memory",
        type=_size,
        default="2G",
        help="guest RAM (default: 2G); for resize: the size before the measured step",
    )
    p.add_argument("--cpus", type=_positive_int, default=2, help="vCPUs (default: 2)")
    p.add_argument(
        "--cpu", help="the guest's -cpu model (default: host under KVM, qemu64 under TCG)"
    )
    p.add_argument(
        "--accel",
        default="auto",
        help="auto (probe), kvm, tcg, or tcg-icount: deterministic guest clock (default: auto)",
    )
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument(
        "--memhp-default-state",
        default="online_movable",
        help="how the guest onlines hotplugged memory (default: online_movable)",
    )
    p.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra guest kernel command-line word (repeatable)",
    )
    p.add_argument(
        "--ready-timeout",
        type=_seconds,
        help="seconds to wait for the guest to be ready (default: 180, a cloud image 420)",
    )


def _plan(args: argparse.Namespace) -> "Plan":
    from dynamem.launch import plan_vm

    return plan_vm(
        guest=args.guest,
        memory=args.memory,
        cpus=args.cpus,
        cpu=args.cpu,
        accel_request=args.accel,
        qemu=args.qemu,
        memhp_default_state=args.memhp_default_state,
        kernel_args=tuple(args.kernel_arg),
    )


def cmd_vm_exec(args: argparse.Namespace) -> int:
    from dynamem.qemu.machine import VM

    command = [c for c in args.cmd if c != "--"] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UserError("vm exec: no command given (usage: dynamem vm exec -- CMD...)")
    plan = _plan(args)
    with VM(plan.config, keep_run_dir=args.keep_run_dir) as vm:
        vm.start(ready_timeout=args.ready_timeout)
        print(
            f"dynamem: guest {vm.kernel_release} ready in {vm.timings['ssh']:.1f} s "
            f"({plan.accel.accel}: {plan.accel.reason}; {format_size(args.memory)} RAM, "
            f"qemu pid {vm.pid})",
            file=sys.stderr,
        )
        result = vm.run(command, timeout=args.timeout, check=False)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def cmd_run(args: argparse.Namespace) -> int:
    from dynamem import runner
    from dynamem.scenario import load_suite, with_control_arm, with_repeats, with_start
    from dynamem.store import RunStore

    spec = None
    if args.cluster:
        from dynamem.cluster import parse_spec

        spec = parse_spec(args.cluster)  # a bad spec or hosts file: one line, nothing boots
    guest = args.guest or "minimal"
    if _is_cases(args):
        return _run_cases(args, guest)
    if args.resume:
        if args.start:
            raise UserError("run: --start cannot change a run being resumed (it keeps its own)")
        store = RunStore.open(args.resume)
        guest = store.run.metadata.guest
        if args.guest not in (None, guest):
            raise UserError(f"run: {args.resume} ran on --guest {guest}, not {args.guest}")
        print(
            f"resuming {store.directory}: {len(store.completed())} of "
            f"{len(store.run.order)} cells done",
            file=sys.stderr,
        )
    else:
        if not args.suite:
            raise UserError("run: give --suite NAME|FILE or --resume RUN_DIR")
        suite = load_suite(args.suite)
        if args.control_arm:
            suite = with_control_arm(suite)
        if args.repeats:
            suite = with_repeats(suite, args.repeats)
        if args.start:
            suite = with_start(suite, args.start)
        seed = suite.seed if args.seed is None else args.seed
        if args.dry_run:
            print("\n".join(runner.dry_run_lines(suite, seed)))
            return 0
        store = runner.start_run(
            suite, seed, accel_request=args.accel, qemu=args.qemu, guest=guest, out=args.out,
            cluster=spec.text if spec else None,
        )  # fmt: skip
        print(
            f"run {store.run.run_id}: {len(store.run.order)} cells -> {store.directory} "
            f"({store.run.metadata.accel}, seed {seed})",
            file=sys.stderr,
        )
    try:
        cells = runner.run_suite(
            store,
            accel_request=args.accel,
            qemu=args.qemu,
            guest=guest,
            report=lambda m: print(m, file=sys.stderr),
            cluster=spec,
        )
    except KeyboardInterrupt as exc:
        print(
            f"\ndynamem: interrupted; finish with: dynamem run --resume {store.directory}",
            file=sys.stderr,
        )
        return _interrupted_status(exc)
    from dynamem.analysis.metrics import tidy

    print(runner.format_table(runner.summary_rows(tidy(cells, store.run.run_id), cells)))
    print(runner.overhead_summary(cells))
    print(f"results: {store.directory}")
    if not args.no_report and cells:
        from dynamem.analysis.report import build_report
        from dynamem.paths import report_dir

        _, page = build_report(store, report_dir(store.run.run_id))
        print(f"report: {page}")
    return 0 if all(c.ok for c in cells) else 1


def _is_cases(args: argparse.Namespace) -> bool:
    from dynamem.cases import is_case_text
    from dynamem.scenario import suite_path

    if args.resume:
        path = args.resume / "run.json"
        if not path.exists():
            return False  # RunStore.open says what is wrong
        import json

        try:
            return is_case_text(json.loads(path.read_text())["suite"]["toml"])
        except (ValueError, KeyError, TypeError):
            return False
    return bool(args.suite) and is_case_text(suite_path(args.suite).read_text())


def _run_cases(args: argparse.Namespace, guest: str) -> int:
    """`dynamem run` of a case-study suite (dynamem.cases): its arms, then its report."""
    from dynamem import cases
    from dynamem.scenario import suite_path
    from dynamem.store import RunStore

    unsupported = [
        o
        for o in ("cluster", "control_arm", "start", "repeats", "seed")
        if getattr(args, o) not in (None, False)
    ]
    if unsupported:
        raise UserError(
            f"run: --{unsupported[0].replace('_', '-')} does not apply to a case-study suite"
        )
    if args.resume:
        given = [o for o in ("dry_run", "suite", "out") if getattr(args, o) not in (None, False)]
        if given:
            raise UserError(
                f"run: --{given[0].replace('_', '-')} does not go with --resume (the run keeps "
                "its own suite and directory)"
            )
        store = RunStore.open(args.resume)
        guest = store.run.metadata.guest
        if args.guest not in (None, guest):
            raise UserError(f"run: {args.resume} ran on --guest {guest}, not {args.guest}")
    else:
        path = suite_path(args.suite)
        suite = cases.load_case_text(path.read_text(), str(path))
        if args.dry_run:
            print("\n".join(cases.dry_run_lines(suite)))
            return 0
        store = cases.start_run(suite, accel_request=args.accel, qemu=args.qemu, guest=guest,
                                out=args.out)  # fmt: skip
        print(f"run {store.run.run_id}: {len(store.run.order)} case-study arms -> "
              f"{store.directory} ({store.run.metadata.accel})", file=sys.stderr)  # fmt: skip
    try:
        arms = cases.run_cases(store, accel_request=args.accel, qemu=args.qemu, guest=guest,
                               report=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except KeyboardInterrupt as exc:
        print(f"\ndynamem: interrupted; finish with: dynamem run --resume {store.directory}",
              file=sys.stderr)  # fmt: skip
        return _interrupted_status(exc)
    print(f"results: {store.directory}")
    if not args.no_report:
        from dynamem.analysis.report import build_report
        from dynamem.paths import report_dir

        _, page = build_report(store, report_dir(store.run.run_id))
        print(f"report: {page}")
    return 0 if arms and all(a.ok for a in arms) and len(arms) == len(store.run.order) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from dynamem.analysis.report import build_report
    from dynamem.paths import report_dir
    from dynamem.store import RunStore

    for run_dir in args.runs:
        store = RunStore.open(run_dir)
        out = args.out or report_dir(store.run.run_id)
        if len(args.runs) > 1 and args.out:
            out = args.out / store.run.run_id
        md, page = build_report(store, out)
        print(f"report: {page}  (and {md.name}, figures beside it)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import dataclasses

    from dynamem.analysis import compare
    from dynamem.analysis.metrics import pool_hosts, tidy
    from dynamem.runner import format_table
    from dynamem.store import RunStore

    a, b = RunStore.open(args.run_a), RunStore.open(args.run_b)
    from dynamem.cases import is_case_run

    for store in (a, b):
        if is_case_run(store):
            raise UserError(
                f"compare: {store.directory} is a case-study run; its report compares its arms "
                "(dynamem report)"
            )
    tables = []
    for store in (a, b):
        cells, problems = store.load_all()  # unfinished or unreadable cells count as failed
        for problem in problems:
            print(f"{store.directory}: {problem}", file=sys.stderr)
        tables.append(tidy(cells, store.run.run_id))
    # A run recorded before cells kept their host ran serially on its metadata's host (the
    # identity check below compares that); it pairs with a run on one host fingerprint.
    older = [s.run.run_id for s, t in zip((a, b), tables, strict=True) if set(t["host"]) == {""}]
    if older and max(len(set(t["host"])) for t in tables) > 1 and not args.pool_hosts:
        raise UserError(
            f"compare: run {older[0]} predates host fingerprints and the other ran on several; "
            "pass --pool-hosts to compare each run pooled over its hosts"
        )
    if args.pool_hosts or older:
        tables = [pool_hosts(t) for t in tables]
        why = (
            f"run {older[0]} predates host fingerprints (its metadata's host is checked below)"
            if older and not args.pool_hosts
            else "--pool-hosts"
        )
        print(f"pooled over host fingerprints ({why})", file=sys.stderr)
    elif (hosts := compare.host_mismatch(*tables)) is not None:
        raise UserError(
            f"compare: {hosts}; cells of different hosts are never paired (pass --pool-hosts "
            "to compare each run pooled over its hosts)"
        )
    diffs = compare.identity_mismatch(
        dataclasses.asdict(a.run.metadata), dataclasses.asdict(b.run.metadata)
    ) + compare.condition_mismatch(*tables)
    for diff in compare.check_comparable(diffs, a.run.run_id, b.run.run_id, args.allow_mixed):
        print(f"warning: mixed runs, {diff}", file=sys.stderr)
    deterministic = a.run.metadata.accel == ICOUNT and b.run.metadata.accel == ICOUNT
    noise = args.noise if args.noise is not None else (None if deterministic else 0.10)
    table, missing = compare.compare_tables(
        tables[0], tables[1], compare.Thresholds(args.alpha, noise)
    )
    noise_text = (
        f"{noise:.0%}" if noise is not None
        else f"{compare.NOISE_SPREADS:g} robust spreads of the noisier run (tcg-icount)"
    )  # fmt: skip
    if table.empty and not missing:
        raise UserError("compare: the two runs have no scenario step and metric in common")
    if not table.empty:
        print(format_table(compare.format_rows(table, args.alpha)))
        hosts = sorted(set(table["host"]))
        if len(hosts) > 1:
            print("\n".join(f"H{k} = {h}" for k, h in enumerate(hosts, 1)))
        counts = table["verdict"].value_counts().to_dict()
        print(
            f"A = {a.run.run_id}, B = {b.run.run_id}; alpha {args.alpha}, noise "
            f"{noise_text}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        )
    for line in missing:
        print(f"missing in B: {line}", file=sys.stderr)
    if compare.regressed(table, missing):
        print(
            "dynamem: regression: B is slower or worse than A, changed where either direction "
            "matters, fails more often, or lacks what A measured",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from dynamem import nightly
    from dynamem.launch import is_cloud_guest
    from dynamem.scenario import load_suite
    from dynamem.store import RunStore

    # asv's machines are keyed by host and accelerator, not by guest: a cloud image's
    # points would land on the embedded guest's graphs and thresholds
    if is_cloud_guest(args.guest) or (
        args.raw and RunStore.open(Path(args.raw)).run.metadata.cloud_image is not None
    ):
        raise UserError(
            "nightly: the asv timeline tracks the embedded guest; run cloud images with "
            "`dynamem run` and compare them with `dynamem compare`"
        )
    nightly.check_tools()
    layout = nightly.Layout(args.root or nightly.default_root())
    runs: list[tuple[str, str]] = [] if args.raw else [(args.suite, args.accel)]
    if args.deterministic and not args.raw:
        runs.append((args.deterministic, ICOUNT))  # its own asv machine
    for suite, _ in runs:
        load_suite(suite)  # a bad suite is refused before anything boots
    raws = [args.raw] if args.raw else []
    ok = True
    for suite, accel in runs or [("", "")]:
        if suite:
            raws.append(nightly.run_suite(
                suite, args.repeats, layout, accel=accel, qemu=args.qemu, guest=args.guest
            ))  # fmt: skip
        raw = raws[-1]
        main = str(Path(args.suite).resolve()) if Path(args.suite).suffix else args.suite
        frame = main if accel == ICOUNT and suite != args.suite else None
        result = nightly.record(raw, layout, frame)
        for cell in result.cells_failed:
            print(f"cell {cell} failed (see {raw / 'cells' / cell}.json)", file=sys.stderr)
        for line in result.resizes_not_ok:
            print(f"not every resize was ok: {line}", file=sys.stderr)
        if result.asv_run_status:
            print(f"asv run exited {result.asv_run_status}: some benchmarks failed",
                  file=sys.stderr)  # fmt: skip
        if result.publish_status:
            print(f"asv publish exited {result.publish_status}", file=sys.stderr)
        print(
            f"nightly {result.run_id}: timeline commit {result.commit[:12]}, machine "
            f"{result.machine}, raw results {raw}, HTML {result.html / 'index.html'}"
        )
        ok = ok and result.ok
    return 0 if ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from dynamem.doctor import run_checks

    checks = run_checks(args.qemu, args.guest, args.accel, args.reprobe)
    for check in checks:
        print(f"{'ok ' if check.ok else 'BAD'}  {check.name:12} {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_bench_boot(args: argparse.Namespace) -> int:
    import statistics

    from dynamem.selfbench import bench_boot

    plan = _plan(args)
    print(
        f"accelerator {plan.accel.accel} ({plan.accel.reason}); guest "
        f"{plan.image.kernel_release}, {format_size(args.memory)} RAM, {args.cpus} vCPUs"
    )
    is_cloud = plan.config.disk is not None  # a cloud image boots for real: no saved state
    res = bench_boot(plan, args.repeats, print, snapshot=not (args.no_snapshot or is_cloud))
    bare, ours = statistics.median(res.bare), statistics.median(res.dynamem)
    if is_cloud:
        print(f"median bare QEMU to cloud-init's final message: {bare:.2f} s")
        print(
            f"median dynamem launch to ready (cloud-init done, sampler connected, SSH "
            f"answering): {ours:.2f} s"
        )
    else:
        print(f"median bare QEMU -kernel/-initrd to init: {bare:.2f} s")
        print(f"median dynamem launch to SSH answering:  {ours:.2f} s")
    print(
        f"ratio of medians: {res.ratio_of_medians:.3f}  (target <= 1.25); "
        f"paired ratios median {statistics.median(res.paired_ratios):.3f}, "
        f"max {max(res.paired_ratios):.3f}"
    )
    if res.snapshot:
        print(
            "median start from the saved state to SSH answering: "
            f"{statistics.median(res.snapshot):.2f} s"
        )
        print(
            f"saved state / fresh boot, ratio of medians: {res.snapshot_ratio:.3f}  (target "
            f"<= 0.3); paired ratios median {statistics.median(res.snapshot_paired_ratios):.3f}, "
            f"max {max(res.snapshot_paired_ratios):.3f}"
        )
    return 0


def cmd_bench_resize(args: argparse.Namespace) -> int:
    from dynamem.selfbench import bench_resize, mechanism_ratio_lines, resize_lines

    benches = []
    for mechanism in args.mechanism.split(","):
        res = bench_resize(
            mechanism,
            args.size,
            args.repeats,
            args.poll_interval,
            print,
            memory=args.memory,
            observers=tuple(args.observers.split(",")),
            stress=args.stress or 0,
            cpus=args.cpus,
            cpu=args.cpu,
            accel_request=args.accel,
            qemu=args.qemu,
            guest=args.guest,
            kernel_args=tuple(args.kernel_arg),
        )
        benches.append(res)
        print("\n".join(resize_lines(res)))
    for b in benches:
        print("\n".join(resize_lines(b)))
    for line in mechanism_ratio_lines(benches):
        print(line)
    return 0


def cmd_bench_determinism(args: argparse.Namespace) -> int:
    from dynamem.determinism import DeterminismBench, bench_determinism, determinism_lines

    if args.accel != ICOUNT:
        print(f"note: --accel {args.accel}: guest-clock durations follow the host there",
              file=sys.stderr)  # fmt: skip
    benches: dict[str, DeterminismBench] = {}
    try:
        bench_determinism(
            args.mechanism.split(","), args.repeats, args.size, args.memory, print,
            observers=tuple(args.observers.split(",")), kernel_args=tuple(args.kernel_arg),
            out=benches, cpus=1, cpu=args.cpu, accel_request=args.accel, qemu=args.qemu,
            guest=args.guest,
        )  # fmt: skip
    except BaseException:
        if benches:  # what was measured before the failure is still printed
            print("PARTIAL: a boot failed; the figures below are the boots done before it")
        raise
    finally:
        for b in benches.values():
            print("\n".join(determinism_lines(b)))
    return 0


def cmd_bench_sampler(args: argparse.Namespace) -> int:
    from dynamem.selfbench import bench_sampler

    plan = _plan(args)
    print(
        f"{plan.accel.accel}, -cpu {plan.config.cpu_model}: sampler CPU over {args.seconds:g} s "
        "per way of looking, nothing changing (targets: <= 1% of one vCPU between resizes, "
        "<= 5% during one)"
    )
    bench_sampler(plan, args.seconds, print, stress=args.stress or 0)
    return 0


def cmd_bench_build(args: argparse.Namespace) -> int:
    import statistics

    from dynamem.selfbench import bench_build

    rebuild, hit = bench_build(args.guest, args.repeats)
    print(
        f"clean build from the warm package cache: median {statistics.median(rebuild):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in rebuild)}; target < 60 s)"
    )
    print(
        f"cache hit: median {statistics.median(hit) * 1000:.1f} ms "
        f"(runs: {', '.join(f'{t * 1000:.1f}' for t in hit)}; target < 1 s)"
    )
    return 0


def cmd_bench_stats(args: argparse.Namespace) -> int:
    import statistics

    from dynamem.selfbench import bench_stats

    res = bench_stats(args.samples, args.groups, args.resamples, args.repeats, args.loop_groups)
    vec = statistics.median(res.vectorized_s)
    runs = ", ".join(f"{t:.3f}" for t in res.vectorized_s)
    scaled = "" if res.loop_groups == res.groups else f" (timed {res.loop_groups}, scaled)"
    print(f"{res.samples:,} samples in {res.groups:,} groups: median, IQR, 95% CI of the median")
    print(
        f"  dynamem, vectorized (exact order-statistic CI): median {vec:.3f} s over "
        f"{len(res.vectorized_s)} repeats (runs: {runs});"
        f" CI held the true median in {res.coverage:.1%} of groups"
    )
    print(
        f"  loop of scipy.stats.bootstrap ({args.resamples} resamples) per group: "
        f"{res.loop_s:.2f} s{scaled}"
    )
    print(f"  ratio loop / vectorized: {res.loop_s / vec:.0f}x (targets: <= 1 s, >= 20x)")
    return 0


def _signed_size(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    return sign * parse_size(text.lstrip("+-"), what="resize")


def cmd_resize(args: argparse.Namespace) -> int:
    """One cell of the same lifecycle as `dynamem run`, printed instead of stored."""
    import json

    from dynamem import mechanisms, runner
    from dynamem.cell import Cell, resize_summary, run_cell
    from dynamem.launch import is_cloud_guest
    from dynamem.record import to_json_data
    from dynamem.scenario import build_scenario

    if args.by == 0:
        raise UserError("--by must not be zero")
    mech = mechanisms.make(
        args.mechanism,
        args.variant,
        dimm_size=args.dimm_size,
        deflate_on_oom=args.deflate_on_oom,
        free_page_reporting=args.free_page_reporting,
    )
    mech.plan(args.memory, args.by, args.boot_memory, args.maxmem)  # refused before any boot
    data: dict[str, object] = {
        "name": "resize",
        "mechanism": args.mechanism,
        "memory": format_size(args.memory),
        "steps": [f"{'grow' if args.by > 0 else 'shrink'} {format_size(abs(args.by))}"],
        "cpus": args.cpus,
        "memhp_default_state": args.memhp_default_state,
        "kernel_args": list(args.kernel_arg),
        "swap": args.swap,
        "swap_size": format_size(args.swap_size),
        "warmup": args.warmup,
        "repeats": 1,
        "dimm_size": format_size(args.dimm_size),
        "deflate_on_oom": args.deflate_on_oom,
        "free_page_reporting": args.free_page_reporting,
    }
    optional = {
        "variant": args.variant,
        "boot_memory": args.boot_memory and format_size(args.boot_memory),
        "maxmem": args.maxmem and format_size(args.maxmem),
        "cpu_model": args.cpu,
        "touch": args.touch,
        "start": args.start,
    }
    data.update({k: v for k, v in optional.items() if v})
    if args.stress:
        data.update(workload="stress", workload_size=args.stress)
    scenario = build_scenario(data, "dynamem resize")
    if scenario.start == "snapshot" and is_cloud_guest(args.guest):
        raise UserError(
            f"resize: --guest {args.guest} is a cloud image, which boots for every cell "
            "(--start snapshot saves no disk state)"
        )
    metadata = runner.run_metadata(args.accel, args.qemu, args.guest, [args.mechanism])
    record = run_cell(
        Cell(scenario, 1),
        accel_request=args.accel,
        qemu=args.qemu,
        guest=args.guest,
        accel=metadata.accel,
    )
    step = next((s for _, s in record.resizes()), None)
    if args.series_out and step is not None:
        import numpy as np

        np.savez_compressed(args.series_out, **record.series()[0])
    if args.json:
        out = to_json_data(record)
        if step is not None and args.series_out is None:
            out["steps"][0]["series"] = step.series_lists()
        print(json.dumps(out, indent=1))
    else:
        print(resize_summary(record))
    return 0 if record.ok and step is not None and step.outcome == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="dynamem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dynamem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    guest = sub.add_parser("guest", help="build and inspect guest images")
    gsub = guest.add_subparsers(dest="guest_command", required=True, parser_class=_ArgumentParser)
    p = gsub.add_parser("build", help="build a guest image into the cache (a hit if unchanged)")
    p.add_argument("guest", nargs="?", default="minimal")
    p.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    p.set_defaults(func=cmd_guest_build)
    p = gsub.add_parser("lock", help="re-pin the guest's packages to apt's current candidates")
    p.add_argument("guest", nargs="?", default="minimal")
    p.set_defaults(func=cmd_guest_lock)

    vm = sub.add_parser("vm", help="run one guest")
    vsub = vm.add_subparsers(dest="vm_command", required=True, parser_class=_ArgumentParser)
    p = vsub.add_parser("exec", help="boot the guest, run CMD over SSH, print its output, stop")
    _vm_options(p)
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        help="seconds CMD may run in the guest (default: 300)",
    )
    p.add_argument(
        "--keep-run-dir",
        action="store_true",
        help="keep the run directory (console log, QEMU log, keys)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_vm_exec)

    p = sub.add_parser("resize", help="boot a fresh guest, resize it once, print the record")
    _vm_options(p)
    p.add_argument("--mechanism", required=True, help="balloon, dimm or virtio-mem")
    p.add_argument("--variant", help="virtio-mem: sbm (default) or bbm")
    p.add_argument(
        "--by", type=_signed_size, required=True, help="signed change, e.g. +512M or -256M"
    )
    p.add_argument(
        "--boot-memory",
        type=_size,
        help="boot RAM (default: what the step needs; --memory is the size "
        "before the measured step)",
    )
    p.add_argument("--maxmem", type=_size, help="upper bound for hotplugged memory")
    p.add_argument("--dimm-size", type=_size, default="128M", help="DIMM size (default 128M)")
    p.add_argument("--deflate-on-oom", action="store_true", help="balloon option")
    p.add_argument("--free-page-reporting", action="store_true", help="balloon option")
    p.add_argument(
        "--json", action="store_true", help="print the full record as JSON (with the time series)"
    )
    p.add_argument(
        "--series-out",
        type=Path,
        metavar="FILE.npz",
        help="write the time series to a numpy .npz file instead of the JSON",
    )
    p.add_argument(
        "--swap",
        default="disk",
        choices=("disk", "zram", "none"),
        help="guest swap (default: a sparse virtio-blk disk)",
    )
    p.add_argument("--swap-size", type=_size, default="1G", help="guest swap size (default 1G)")
    p.add_argument(
        "--stress",
        metavar="SIZE|PCT",
        help="hold `stress --vm-bytes SIZE --vm-keep -m 1` during the step, e.g. 60%%",
    )
    p.add_argument(
        "--touch",
        metavar="SIZE|PCT",
        help="touch this much guest memory and free it before the step",
    )
    p.add_argument(
        "--warmup",
        action="store_true",
        help="do the step and its reverse once, unmeasured, before the measured step",
    )
    p.add_argument(
        "--cpu-model", help="QEMU -cpu model (default: host under KVM, qemu64 under TCG)"
    )
    p.add_argument(
        "--start",
        choices=("boot", "snapshot"),
        help="boot: a fresh guest per cell (default); snapshot: every cell starts from its "
        "machine configuration's saved post-boot state (built once, cached)",
    )
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("run", help="run a suite of scenarios into a raw results directory")
    p.add_argument("--suite", help="quick, study, or a suite .toml file")
    p.add_argument("--out", type=Path, help="run directory (default: results/raw/<run-id>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted run")
    p.add_argument("--dry-run", action="store_true", help="print the cells and an estimate")
    p.add_argument("--seed", type=int, help="order seed (default: the suite's)")
    p.add_argument("--repeats", type=_positive_int, help="override every scenario's repeats")
    p.add_argument(
        "--control-arm",
        action="store_true",
        help="interleave each scenario's twin watched by the minimal observer, so the report "
        "measures what watching costs (doubles the cells)",
    )
    p.add_argument(
        "--start",
        choices=("boot", "snapshot"),
        help="boot: a fresh guest per cell (default); snapshot: every cell starts from its "
        "machine configuration's saved post-boot state (built once, cached)",
    )
    p.add_argument(
        "--cluster",
        metavar="SPEC",
        help="run the cells on a Dask cluster: local:N (N at once on this host, each on its "
        "own CPUs), ssh:HOSTS.toml (workers started over SSH), tcp://HOST:PORT (a running "
        "scheduler); this process writes every record",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip the report (results/report/<run-id>/index.html) at the end",
    )
    p.add_argument("--guest", help=GUEST_HELP + "; a resumed run keeps its own")
    p.add_argument("--accel", default="auto", help="auto, kvm, tcg or tcg-icount")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="statistics, figures and an HTML/Markdown report of runs")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="default: results/report/<run-id>")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="run B against run A, metric by metric; exit 1 if worse")
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (after Holm)")
    p.add_argument(
        "--noise",
        type=float,
        help="changes below this share are noise (default: 0.10; for two tcg-icount runs, "
        "derived from their own repeat-to-repeat spread)",
    )
    p.add_argument(
        "--pool-hosts",
        action="store_true",
        help="pool each run's cells over the host fingerprints it ran on (by default cells "
        "are compared host by host, and runs on different hosts are refused)",
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare runs with different accelerator, QEMU, guest kernel or CPU",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("nightly", help="run a suite, file it as one asv point, asv publish")
    p.add_argument("--suite", default="nightly", help="suite name or .toml (default: nightly)")
    p.add_argument("--repeats", type=_positive_int, help="override every scenario's repeats")
    p.add_argument("--raw", type=Path, metavar="RUN_DIR", help="record a finished run instead")
    p.add_argument(
        "--deterministic",
        default="nightly-icount",
        metavar="SUITE",
        help="then this suite under tcg-icount, as its own asv machine (default: "
        "nightly-icount; '' skips it)",
    )
    p.add_argument(
        "--root", type=Path, help="results root: raw/, timeline/, asv/, html/ (default: results)"
    )
    p.add_argument("--guest", default="minimal", help=GUEST_HELP)
    p.add_argument("--accel", default="auto", help="auto, kvm, tcg or tcg-icount")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("doctor", help="check QEMU, the accelerator, the guest image, host tools")
    p.add_argument("--guest", default="minimal", help=GUEST_HELP)
    p.add_argument("--accel", default="auto", help="auto, kvm, tcg or tcg-icount")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--reprobe", action="store_true", help="probe KVM again (ignore the cache)")
    p.set_defaults(func=cmd_doctor)

    bench = sub.add_parser(
        "selfbench",
        aliases=["bench"],
        help="benchmarks of dynamem itself (the asv suite is `bench/`)",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_ArgumentParser)
    p = bsub.add_parser(
        "boot",
        help="boot-to-SSH versus a bare QEMU boot-to-init and a start from the saved state, "
        "side by side",
    )
    _vm_options(p)
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="leave out the start from a saved post-boot state (the third arm)",
    )
    p.set_defaults(func=cmd_bench_boot)
    p = bsub.add_parser("resize", help="dynamem's resize timing versus a bare QMP script")
    _vm_options(p)
    p.add_argument(
        "--mechanism", required=True, help="balloon, dimm or virtio-mem, or several: a,b"
    )
    p.add_argument("--size", type=_size, default="256M")
    p.add_argument("--repeats", type=_positive_int, default=10)
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        help="also run a bare script polling at this fixed interval (seconds)",
    )
    p.add_argument(
        "--observers",
        default="adaptive",
        help="dynamem arms, comma-separated: adaptive, minimal, dense (default: adaptive)",
    )
    p.add_argument(
        "--stress", type=_size, help="restart stress --vm-bytes SIZE --vm-keep before each shrink"
    )
    p.set_defaults(func=cmd_bench_resize)
    p = bsub.add_parser(
        "determinism",
        help="guest-clock against wall-clock spread over fresh boots, and the observer's "
        "perturbation, in the deterministic mode",
    )
    _vm_options(p)
    p.set_defaults(accel=ICOUNT, memory=1 << 30)
    p.add_argument("--mechanism", default="balloon,dimm,virtio-mem")
    p.add_argument("--size", type=_size, default="256M")
    p.add_argument("--repeats", type=_positive_int, default=5, help="fresh boots per mechanism")
    p.add_argument(
        "--observers",
        default="adaptive,sparse",
        help="observer arms; the last is the baseline of the ratios (default: adaptive,sparse)",
    )
    p.set_defaults(func=cmd_bench_determinism)
    p = bsub.add_parser("sampler", help="CPU cost of the in-guest sampler per sampling mode")
    _vm_options(p)
    p.add_argument("--seconds", type=_seconds, default=10.0)
    p.add_argument("--stress", type=_size, help="with stress --vm-bytes SIZE --vm-keep running")
    p.set_defaults(func=cmd_bench_sampler)
    p = bsub.add_parser("build", help="guest build from the warm package cache, and a cache hit")
    p.add_argument("guest", nargs="?", default="minimal")
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.set_defaults(func=cmd_bench_build)
    p = bsub.add_parser("stats", help="vectorized group statistics vs a scipy.stats.bootstrap loop")
    p.add_argument("--samples", type=_positive_int, default=1_000_000)
    p.add_argument("--groups", type=_positive_int, default=1000)
    p.add_argument("--resamples", type=_positive_int, default=2000)
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument(
        "--loop-groups",
        type=_positive_int,
        default=None,
        help="time the scipy loop on this many groups and scale (default: all)",
    )
    p.set_defaults(func=cmd_bench_stats)
    return parser


def _join_signed(argv: list[str]) -> list[str]:
    """Let `--by -512M` through: argparse would take '-512M' for an option."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out.append(arg)
            out.extend(it)
            break
        if arg == "--by":
            value = next(it, "")
            out.append(f"--by={value}")
        else:
            out.append(arg)
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C so every `finally` stops its QEMU; exit status 143."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _interrupted_status(exc: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    argv = _join_signed(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UserError as exc:
        print(f"dynamem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("dynamem: interrupted", file=sys.stderr)
        return _interrupted_status(exc)
    except BrokenPipeError:  # e.g. `dynamem run --dry-run | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
