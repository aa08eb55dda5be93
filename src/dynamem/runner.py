"""`dynamem run`: a suite's cells in seeded, interleaved order, each recorded as it ends.

A cell is one repeat of one scenario on a fresh guest: boot (or start from a saved
post-boot state), preparation (plug what the
steps need), an unmeasured warm-up pass of the steps, the workload, then the measured
steps. Whatever happens in a cell is recorded (failures with their reason, the phase they
happened in and the guest console tail) and the run goes on; Ctrl-C or SIGTERM stops the
current guest and leaves a run that `--resume` finishes without redoing completed cells.
"""

import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dynamem import __version__
from dynamem.cell import Cell, host_cpu_model, run_cell
from dynamem.errors import UserError
from dynamem.guest import cloud
from dynamem.launch import guest_image, is_cloud_guest, plan_vm
from dynamem.paths import checkout, results_dir
from dynamem.qemu.snapshot import IDENTICAL
from dynamem.record import CellRecord, CloudImageInfo, RunMetadata, RunRecord, SuiteSource
from dynamem.scenario import Scenario, Suite, load_suite_text
from dynamem.store import RunStore
from dynamem.units import GiB, format_size

if TYPE_CHECKING:
    from dynamem.cluster import ClusterSpec


def cells_in_order(suite: Suite, seed: int) -> list[Cell]:
    """Every (scenario, repeat), shuffled with `seed` so host drift spreads over all."""
    cells = [Cell(s, r) for s in suite.scenarios for r in range(1, s.repeats + 1)]
    random.Random(seed).shuffle(cells)
    return cells


# Rough costs under TCG on a 2-core host, for --dry-run estimates only.
_BOOT_S, _STEP_FIXED_S = 8.0, 1.6
_RESTORE_S = 1.0  # a start from a saved state (its one build per configuration aside)
_PER_GIB_S = {
    ("balloon", -1): 4.5,
    ("balloon", 1): 1.0,
    ("virtio-mem", -1): 3.5,
    ("virtio-mem", 1): 0.1,
    ("dimm", -1): 0.2,
    ("dimm", 1): 0.1,
}
_WORKLOAD_PER_GIB_S = {"idle": 0.0, "stress": 7.0, "pagecache": 2.0, "impact": 4.0}


def estimate_cell_s(s: Scenario) -> float:
    steps = 0.0
    for step in s.steps:
        if step.kind in ("settle", "free"):
            steps += step.seconds
        elif step.kind == "reboot":
            steps += _BOOT_S
        elif step.kind == "oom":
            steps += 20.0
        else:
            direction = 1 if step.delta > 0 else -1
            steps += _STEP_FIXED_S + _PER_GIB_S[(s.mechanism, direction)] * abs(step.delta) / GiB
    resizes = sum(1 for step in s.steps if step.kind == "resize")
    warmup = 2 * resizes * _STEP_FIXED_S if s.warmup else 0.0
    touch = _WORKLOAD_PER_GIB_S["stress"] * s.touch / GiB  # touched like stress, then freed
    start = _RESTORE_S if s.start == "snapshot" else _BOOT_S
    return start + steps + warmup + touch + _WORKLOAD_PER_GIB_S[s.workload] * s.workload_size / GiB


def git_commit() -> str:
    """The checkout's commit when dynamem runs from one; else the installed version."""
    root = checkout()
    if root is None:
        return f"v{__version__}"
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(
    accel_request: str | None, qemu: str, guest: str, mechanisms: Iterable[str] = ()
) -> RunMetadata:
    """The host and software of a run; also where a bad accelerator, QEMU or guest image is
    refused (one line) before anything boots, and a cloud image that lacks what one of
    `mechanisms` needs."""
    image = guest_image(guest)  # before plan_vm, whose accelerator probe may boot a VM
    if isinstance(image, cloud.CloudImage):
        for mechanism in sorted(set(mechanisms)):
            image.check(mechanism)
    plan = plan_vm(memory=GiB, accel_request=accel_request, qemu=qemu, guest=guest)
    packages = plan.image.manifest.get("packages")
    image = plan.image
    info = None
    if isinstance(image, cloud.CloudImage):
        info = CloudImageInfo(
            name=str(image.manifest["name"]), path=str(image.path),
            sha256=cloud.image_sha256(image.path, verify=True), format=image.format,
            os=str(image.manifest["os"]), kernel_release=image.kernel_release, root=image.root,
            onlining=image.onlining,
        )  # fmt: skip

    return RunMetadata(
        host_kernel=platform.release(),
        host_cpu=host_cpu_model(),
        host_cpus=os.cpu_count(),
        qemu_version=".".join(map(str, plan.qemu_version)),
        accel=plan.accel.accel,
        accel_reason=plan.accel.reason,
        guest=guest,
        guest_kernel=plan.image.kernel_release,
        guest_image=info.sha256 if info else str(image.manifest.get("cache_key") or "") or None,
        guest_packages={str(k): str(v) for k, v in packages.items()}
        if isinstance(packages, dict)
        else None,
        dynamem_version=__version__,
        git_commit=git_commit(),
        python=platform.python_version(),
        cloud_image=info,
    )


def new_run(suite: Suite, seed: int, metadata: RunMetadata) -> RunRecord:
    stamp = datetime.datetime.now(datetime.UTC)
    return RunRecord(
        run_id=f"{stamp:%Y%m%d-%H%M%S}-{suite.name}",
        created=stamp.isoformat(timespec="seconds"),
        suite=SuiteSource(name=suite.name, toml=suite.source),
        seed=seed,
        order=[c.id for c in cells_in_order(suite, seed)],
        metadata=metadata,
    )


def start_run(
    suite: Suite,
    seed: int,
    *,
    accel_request: str | None,
    qemu: str,
    guest: str,
    out: Path | None = None,
    raw_dir: Path | None = None,
    cluster: str | None = None,
) -> RunStore:
    """The one way a run starts (`dynamem run`, the nightly, asv alone): metadata, order
    and an empty store in `out` (default: `<raw_dir or results/raw>/<run-id>`)."""
    if "snapshot" in {s.start for s in suite.scenarios} and is_cloud_guest(guest):
        raise UserError(
            f"--guest {guest} is a cloud image, which boots for every cell "
            "(start = snapshot saves no disk state)"
        )
    metadata = run_metadata(accel_request, qemu, guest, {s.mechanism for s in suite.scenarios})
    metadata.starts = sorted({s.start for s in suite.scenarios})
    if "snapshot" in metadata.starts:
        metadata.start_identical = list(IDENTICAL)
    metadata.cluster = cluster
    run = new_run(suite, seed, metadata)
    directory = out or (raw_dir or results_dir() / "raw") / run.run_id
    return RunStore.create(directory, run)


def suite_of(run: RunRecord) -> Suite:
    suite = load_suite_text(run.suite.toml, f"run {run.run_id}")
    if {c.id for c in cells_in_order(suite, run.seed)} != set(run.order):
        raise UserError(f"run {run.run_id}: run.json's order does not match its suite")
    return suite


class Progress:
    """Cells done/total, ETA and the current cell, on one line when stderr is a terminal."""

    def __init__(self, total: int, estimate_s: float, stream: Any = sys.stderr) -> None:
        self.total, self.estimate_s, self.stream = total, estimate_s, stream
        self.done, self.start = 0, time.monotonic()
        self.done_before = 0  # cells completed by an earlier (resumed) invocation
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def show(self, current: str) -> None:
        elapsed = time.monotonic() - self.start
        here = self.done - self.done_before
        eta = elapsed / here * (self.total - self.done) if here else self.estimate_s
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s  {current}"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def run_suite(
    store: RunStore,
    *,
    accel_request: str | None,
    qemu: str,
    guest: str,
    report: Callable[[str], None] = print,
    cluster: "ClusterSpec | None" = None,
) -> list[CellRecord]:
    """Run every cell of the store's run not yet completed; returns all cell records.

    Every cell runs under the accelerator the run recorded (a resumed tcg-icount run must
    not go on under plain TCG with its records still saying tcg-icount). With `cluster`,
    the cells run on its Dask workers and this process writes their records as they come."""
    run = store.run
    recorded = run.metadata.accel
    if accel_request not in (None, "auto", recorded):
        raise UserError(
            f"run {run.run_id} was recorded under {recorded}; --accel {accel_request} would mix "
            f"accelerators in one run (resume with --accel {recorded} or auto)"
        )
    accel_request = recorded
    if run.metadata.cloud_image is not None:  # a resumed run goes on on the very same image
        image = run.metadata.cloud_image
        now = cloud.image_sha256(Path(image.path)) if Path(image.path).is_file() else "gone"
        if now != image.sha256:
            raise UserError(
                f"run {run.run_id} ran on {image.path} with sha256 {image.sha256[:12]}; it "
                f"is now {now[:12]}: its remaining cells would measure another image"
            )
    suite = suite_of(run)
    for problem in store.set_aside_invalid():
        report(f"unreadable cell record {problem}; set aside as .invalid, the cell runs again")
    by_id = {c.id: c for c in cells_in_order(suite, run.seed)}
    todo = [by_id[i] for i in run.order if i not in store.completed()]
    progress = Progress(len(run.order), sum(estimate_cell_s(c.scenario) for c in todo))
    progress.done = progress.done_before = len(run.order) - len(todo)

    def write(record: CellRecord) -> None:
        store.write_cell(record)
        progress.done += 1
        if not record.ok:
            progress.finish()
            report(f"cell {record.cell} failed: {record.error}")

    if cluster is None:
        for cell in todo:
            progress.show(f"{cell.id}")
            write(
                run_cell(
                    cell,
                    accel_request=accel_request,
                    qemu=qemu,
                    guest=guest,
                    accel=run.metadata.accel,
                )  # fmt: skip
            )
    else:
        from dynamem import cluster as dask_cluster

        options = {"accel_request": accel_request, "qemu": qemu, "guest": guest,
                   "accel": run.metadata.accel}  # fmt: skip
        holder: list[dask_cluster.Dispatch] = []

        def show(current: str) -> None:
            counts = holder[0].counts() if holder else ""
            progress.show(current + (f"  [{counts}]" if counts else ""))

        def told(line: str) -> None:
            progress.finish()
            report(line)

        dispatch = dask_cluster.run_cells(
            cluster, todo, write, options=options, report=told, progress=show,
            started=holder.append,
        )  # fmt: skip
        for line in dispatch.moved:
            report(f"moved to another host (its own had no worker left): {line}")
    progress.show("done")
    progress.finish()
    cells, problems = store.load_cells()
    for problem in problems:
        report(f"unreadable cell record: {problem}")
    check_cloud_image(store)
    return cells


def check_cloud_image(store: RunStore) -> None:
    """Read a cloud run's base image again: every cell wrote only its own overlay, so the
    sha256 must be the one read before the first cell. Recorded in run.json either way."""
    image = store.run.metadata.cloud_image
    if image is None:
        return
    try:
        image.sha256_after = cloud.image_sha256(Path(image.path), verify=True)
    except OSError as exc:
        image.sha256_after = f"unreadable: {exc}"
    store.save_run()
    if image.sha256_after != image.sha256:
        raise UserError(
            f"the cloud image {image.path} changed during the run (sha256 {image.sha256[:12]} "
            f"before, {image.sha256_after[:12]} after); its cells are kept in {store.directory}"
        )


def summary_rows(table: pd.DataFrame, cells: list[CellRecord]) -> list[list[str]]:
    """Per scenario and step: outcomes, and medians of the headline figures over the steps
    that count (ok steps of ok cells; see `dynamem.analysis.metrics`)."""
    from dynamem.analysis.metrics import driver_or_look, outcome_counts, usable

    rows = [["scenario", "step", "ok/n", "host ms", "guest ms", "guest clock ms", "migrated",
             "QEMU RSS change MiB"]]  # fmt: skip
    counts = outcome_counts(table)
    good = usable(table)
    clock = driver_or_look(good)
    for r in counts.itertuples():
        part = good[(good.scenario == r.scenario) & (good.step_index == r.step_index)]

        def med(metric: str, scale: float = 1.0, fmt: str = "{:.1f}", p: Any = part) -> str:
            vals = p[p.metric == metric]["value"]
            return fmt.format(float(vals.median()) * scale) if len(vals) else "-"

        rows.append(
            [
                str(r.scenario),
                str(r.step),
                f"{r.ok}/{r.n}",
                med("latency_host_s", 1000),
                med("latency_guest_s", 1000),
                # the guest-side duration on the guest's clock: the figure that counts
                # under tcg-icount, where the wall-clock ones are not meaningful
                med(clock, 1000),
                med("pages_migrated", 1, "{:.0f}"),
                med("rss_reclaimed_mib", -1),
            ]
        )
    failed: dict[str, int] = {}
    for cell in cells:
        if not cell.ok:
            failed[cell.scenario] = failed.get(cell.scenario, 0) + 1
    for name, n in sorted(failed.items()):
        rows.append([name, "(cells failed)", f"{n} failed", "-", "-", "-", "-", "-"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def overhead_summary(cells: list[CellRecord]) -> str:
    totals = [c.timings.total for c in cells]
    overhead = [c.timings.overhead for c in cells]
    if not totals:
        return "no cells"
    share = sum(overhead) / sum(totals)
    starts = []
    for mode in sorted({c.condition.start for c in cells}):
        times = [c.timings.boot for c in cells if c.condition.start == mode]
        starts.append(f"{mode} to ready {statistics.median(times):.1f} s")
    built = [c for c in cells if c.context and c.context.state and c.context.state.built_here]
    states = (
        f"; {len(built)} saved state{'s' if len(built) != 1 else ''} built, getting the saved "
        f"states took {sum(c.timings.state_build for c in cells):.1f} s (in the cells' time)"
        if any(c.condition.start == "snapshot" for c in cells)
        else ""
    )
    return (
        f"{len(cells)} cells in {sum(totals) / 60:.1f} min; per cell median "
        f"{statistics.median(totals):.1f} s, {', '.join(starts)}, runner overhead "
        f"{statistics.median(overhead):.2f} s ({share * 100:.1f}% of cell time){states}"
    )


def dry_run_lines(suite: Suite, seed: int) -> list[str]:
    order = cells_in_order(suite, seed)
    total = sum(estimate_cell_s(c.scenario) for c in order)
    lines = [
        f"suite {suite.name}: {len(suite.scenarios)} scenarios, {len(order)} cells, "
        f"seed {seed}; estimated {total / 60:.1f} min under TCG"
    ]
    for i, c in enumerate(order, 1):
        s = c.scenario
        steps = ", ".join(str(x) for x in s.steps)
        lines.append(
            f"{i:4}. {c.id:40} {s.mechanism_config().label}, {format_size(s.memory)}, "
            f"{s.condition('tcg').workload_label}: {steps} (~{estimate_cell_s(s):.0f} s)"
        )
    return lines
