"""The `dynamem` command line: one function per command, shared arguments in one place."""

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from dynamem import __version__
from dynamem.errors import UserError
from dynamem.units import format_size, parse_size

if TYPE_CHECKING:
    from dynamem.launch import Plan


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog.removeprefix('dynamem ')}: {message}")


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
    from dynamem.guest.recipe import load_recipe

    start = time.monotonic()
    image, hit = build(load_recipe(args.guest), force=args.force)
    elapsed = time.monotonic() - start
    sums = image.manifest["sha256"]
    assert isinstance(sums, dict)
    print(f"guest {args.guest}: {'cache hit' if hit else 'built'} in {elapsed:.2f} s")
    print(f"kernel  {image.kernel}  sha256 {sums['vmlinuz']}")
    print(f"initrd  {image.initrd}  sha256 {sums['initrd.img']}")
    print(f"release {image.kernel_release}")
    return 0


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guest", default="minimal", help="guest recipe (default: minimal)")
    p.add_argument("--memory", type=_size, default="2G", help="boot RAM (default: 2G)")
    p.add_argument("--cpus", type=int, default=2, help="vCPUs (default: 2)")
    p.add_argument("--accel", default="auto", help="auto (probe), kvm or tcg (default: auto)")
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
        type=float,
        default=180.0,
        help="seconds to wait for the guest to answer SSH (default: 180)",
    )


def _plan(args: argparse.Namespace) -> "Plan":
    from dynamem.launch import plan_vm

    return plan_vm(
        guest=args.guest,
        memory=args.memory,
        cpus=args.cpus,
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
    res = bench_boot(plan, args.repeats, print)
    bare, ours = statistics.median(res.bare), statistics.median(res.dynamem)
    print(f"median bare QEMU -kernel/-initrd to init: {bare:.2f} s")
    print(f"median dynamem launch to SSH answering:  {ours:.2f} s")
    print(
        f"ratio of medians: {res.ratio_of_medians:.3f}  (target <= 1.25); "
        f"paired ratios median {statistics.median(res.paired_ratios):.3f}, "
        f"max {max(res.paired_ratios):.3f}"
    )
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
        type=float,
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

    p = sub.add_parser("doctor", help="check QEMU, the accelerator, the guest image, host tools")
    p.add_argument("--guest", default="minimal")
    p.add_argument("--accel", default="auto")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--reprobe", action="store_true", help="probe KVM again (ignore the cache)")
    p.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmarks of dynamem itself")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_ArgumentParser)
    p = bsub.add_parser("boot", help="boot-to-SSH versus a bare QEMU boot-to-init, side by side")
    _vm_options(p)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=cmd_bench_boot)
    p = bsub.add_parser("build", help="guest build from the warm package cache, and a cache hit")
    p.add_argument("guest", nargs="?", default="minimal")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench_build)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C so every `finally` stops its QEMU.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UserError as exc:
        print(f"dynamem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynamem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
