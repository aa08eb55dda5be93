"""`dynamem run`: a suite's cells in seeded, interleaved order, each recorded as it ends.

A cell is one repeat of one scenario on a fresh guest: boot, preparation (plug what the
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynamem import __version__
from dynamem.errors import DynamemError, UserError
from dynamem.faults import Injector
from dynamem.launch import plan_vm
from dynamem.paths import repo_root
from dynamem.probes.guestmem import parse_vmstat
from dynamem.qemu.machine import VM
from dynamem.resize import ResizeResult, resize
from dynamem.scenario import Scenario, Step, Suite, load_suite_text
from dynamem.single import context_of, cpu_model, plan_for, prepare
from dynamem.steps import free_step, oom_step, reboot_step, split_series
from dynamem.store import RunStore
from dynamem.units import GiB
from dynamem.workloads import Impact, impact_figures
from dynamem.workloads import make as make_workload


@dataclass(frozen=True)
class Cell:
    scenario: Scenario
    repeat: int

    @property
    def id(self) -> str:
        return f"{self.scenario.name}-r{self.repeat}"


def cells_in_order(suite: Suite, seed: int) -> list[Cell]:
    """Every (scenario, repeat), shuffled with `seed` so host drift spreads over all."""
    cells = [Cell(s, r) for s in suite.scenarios for r in range(1, s.repeats + 1)]
    random.Random(seed).shuffle(cells)
    return cells


# Rough costs under TCG on a 2-core host, for --dry-run estimates only.
_BOOT_S, _STEP_FIXED_S = 8.0, 1.6
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
    return _BOOT_S + steps + warmup + _WORKLOAD_PER_GIB_S[s.workload] * s.workload_size / GiB


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_root()), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(accel_request: str | None, qemu: str, guest: str) -> dict[str, Any]:
    plan = plan_vm(memory=GiB, accel_request=accel_request, qemu=qemu, guest=guest)
    return {
        "host_kernel": platform.release(),
        "host_cpu": cpu_model(),
        "host_cpus": os.cpu_count(),
        "qemu_version": ".".join(map(str, plan.qemu_version)),
        "accel": plan.accel.accel,
        "accel_reason": plan.accel.reason,
        "guest": guest,
        "guest_kernel": plan.image.kernel_release,
        "guest_image": plan.image.manifest.get("cache_key"),
        "guest_packages": plan.image.manifest.get("packages"),
        "dynamem_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
    }


def new_run(suite: Suite, seed: int, metadata: dict[str, Any]) -> dict[str, Any]:
    stamp = datetime.datetime.now(datetime.UTC)
    return {
        "run_id": f"{stamp:%Y%m%d-%H%M%S}-{suite.name}",
        "created": stamp.isoformat(timespec="seconds"),
        "suite": {"name": suite.name, "toml": suite.source},
        "seed": seed,
        "order": [c.id for c in cells_in_order(suite, seed)],
        "metadata": metadata,
    }


def suite_of(run: dict[str, Any]) -> Suite:
    try:
        text, seed = run["suite"]["toml"], run["seed"]
    except (KeyError, TypeError):
        raise UserError(f"run {run['run_id']}: run.json holds no suite and seed") from None
    suite = load_suite_text(text, f"run {run['run_id']}")
    if not isinstance(seed, int) or {c.id for c in cells_in_order(suite, seed)} != set(
        run["order"]
    ):
        raise UserError(f"run {run['run_id']}: run.json's order does not match its suite")
    return suite


def run_cell(
    cell: Cell, *, accel_request: str | None, qemu: str, guest: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One cell; returns its record and the series of each step. Only Ctrl-C escapes."""
    s = cell.scenario
    t0 = time.monotonic()
    timings: dict[str, float] = {
        "preparation": 0.0,
        "warmup": 0.0,
        "workload_start": 0.0,
        "steps": 0.0,
        "boot": 0.0,
    }
    record: dict[str, Any] = {
        "scenario": s.name,
        "repeat": cell.repeat,
        "cell": cell.id,
        "mechanism": s.mechanism,
        "workload": s.workload,
        "scenario_config": s.raw,
        "status": "failed",
        "error": "",
        "steps": [],
        "context": {},
        "timings": timings,
    }
    series: list[dict[str, Any]] = []
    vm: VM | None = None
    phase = "plan"  # where a failure happened, recorded with it
    inject = Injector(s.inject)
    try:
        mech = s.mechanism_object()
        mplan = s.memory_plan(mech)
        plan = plan_for(
            mech, mplan, guest=guest, cpus=s.cpus, accel_request=accel_request, qemu=qemu,
            memhp_default_state=s.memhp_default_state, kernel_args=s.kernel_args,
            swap=s.swap, swap_size=s.swap_size,
            data_size=s.workload_size if s.workload == "pagecache" else 0,
        )  # fmt: skip
        vm = VM(plan.config)
        with vm:
            phase = "boot"
            vm.start()
            timings["boot"] = time.monotonic() - t0
            record["context"] = context_of(plan, vm, mplan)
            phase = "preparation"
            _, timings["preparation"], timings["warmup"] = prepare(
                vm, mech, mplan, warmup=s.warmup, deadline_s=s.deadline
            )
            phase = "workload start"
            workload = make_workload(s.workload, s.workload_size)
            inject.before_workload(vm)
            timings["workload_start"] = workload.start(vm, timeout=s.deadline)
            results: list[ResizeResult] = []
            t = time.monotonic()
            for k, step in enumerate(s.steps):
                phase = f"step {k} ({step})"
                inject.before_step(k, vm, mech)
                if step.kind != "resize":
                    extra = _other_step(vm, mech, workload, step)
                    extra, arrays = split_series(extra)
                    record["steps"].append({"step": str(step), **extra})
                    series.append(arrays)
                else:
                    r = resize(vm, mech, step.delta, deadline_s=s.deadline)
                    results.append(r)
                    record["steps"].append({"step": str(step), "kind": "resize", **r.to_dict()})
                    series.append({"t_request_ns": np.int64(r.t_request_ns or 0), **r.series})
                vm.check_health()
            timings["steps"] = time.monotonic() - t
            phase = "workload stop"
            # (a free step stops the workload on purpose; an oom step may kill it)
            expect_alive = not any(step.kind in ("oom", "free") for step in s.steps)
            if expect_alive and not workload.alive(vm):
                raise WorkloadDied(
                    f"workload {s.workload} died during the steps (guest OOM kills so far: "
                    f"{_oom_kills(vm)})"
                )
            log = workload.stop(vm)
            if isinstance(workload, Impact) and log:
                _add_impact(vm, log, record, results)
            record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded outcome
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DynamemError) else str(exc)
        reason = vm.diagnosis if vm is not None else None
        record["failed_at"] = phase
        known = reason is None or reason in message
        record["error"] = f"{phase}: " + (message if known else f"{reason}; {message}")
        if vm is not None:
            record["console_tail"] = vm.console()[-3000:]
    if inject.fault is not None:
        record["injected"] = {"fault": str(inject.fault), "fired": inject.fired}
    timings["total"] = time.monotonic() - t0
    timings["overhead"] = timings["total"] - sum(
        timings[k] for k in ("boot", "preparation", "warmup", "workload_start", "steps")
    )
    return record, series


class WorkloadDied(DynamemError):
    """The workload's processes are gone before the steps ended (e.g. the OOM killer)."""


def _oom_kills(vm: VM) -> int | str:
    try:
        vmstat = vm.sampler.snapshot(["/proc/vmstat"])["/proc/vmstat"]
    except DynamemError:
        return "unknown"
    return parse_vmstat(vmstat).get("oom_kill", 0)


def _other_step(vm: VM, mech: Any, workload: Any, step: Step) -> dict[str, Any]:
    if step.kind == "settle":
        time.sleep(step.seconds)
        return {"kind": "settle"}
    if step.kind == "free":
        return free_step(vm, workload, step.seconds)
    if step.kind == "oom":
        return oom_step(vm, mech, step.size)
    if step.kind == "reboot":
        return reboot_step(vm, mech)
    raise ValueError(f"unknown step {step}")


def _add_impact(
    vm: VM, log: dict[str, Any], record: dict[str, Any], results: list[ResizeResult]
) -> None:
    samples = vm.sampler.samples[-2000:]
    offset = int(np.median([s.arrival_ns - s.guest_ns for s in samples])) if samples else 0
    k = 0
    for step in record["steps"]:
        if step["kind"] != "resize":
            continue
        r = results[k]
        k += 1
        done = r.t_guest_done_ns or r.t_host_done_ns
        step.setdefault("figures", {})["workload"] = impact_figures(
            log, offset, r.t_request_ns or 0, done
        )


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
) -> list[dict[str, Any]]:
    """Run every cell of the store's run not yet completed; returns all cell records."""
    run = store.run
    suite = suite_of(run)
    for problem in store.set_aside_invalid():
        report(f"unreadable cell record {problem}; set aside as .invalid, the cell runs again")
    by_id = {c.id: c for c in cells_in_order(suite, run["seed"])}
    todo = [by_id[i] for i in run["order"] if i not in store.completed()]
    progress = Progress(len(run["order"]), sum(estimate_cell_s(c.scenario) for c in todo))
    progress.done = progress.done_before = len(run["order"]) - len(todo)
    for cell in todo:
        progress.show(f"{cell.id}")
        record, series = run_cell(cell, accel_request=accel_request, qemu=qemu, guest=guest)
        store.write_cell(cell.id, record, series)
        progress.done += 1
        if record["status"] != "ok":
            progress.finish()
            report(f"cell {cell.id} failed: {record['error']}")
    progress.show("done")
    progress.finish()
    cells, problems = store.load_cells()
    for problem in problems:
        report(f"unreadable cell record: {problem}")
    return cells


def summary_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    """Per scenario and step: outcomes and medians of the headline figures."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    failed: dict[str, int] = {}
    for cell in cells:
        if cell["status"] != "ok":
            failed[cell["scenario"]] = failed.get(cell["scenario"], 0) + 1
        for k, step in enumerate(cell["steps"]):
            if step["kind"] == "resize":
                groups.setdefault((cell["scenario"], k, step["step"]), []).append(step)

    def med(values: list[float | None], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        vals = [v * scale for v in values if v is not None]
        return fmt.format(statistics.median(vals)) if vals else "-"

    rows = [["scenario", "step", "ok/n", "host ms", "guest ms", "migrated", "QEMU RSS change MiB"]]
    for (name, _, label), steps in sorted(groups.items()):
        ok = sum(1 for s in steps if s["outcome"] == "ok")
        rows.append(
            [
                name,
                label,
                f"{ok}/{len(steps)}",
                med([s["host_latency_s"] for s in steps], 1000),
                med([s["guest_latency_s"] for s in steps], 1000),
                med(
                    [s.get("figures", {}).get("guest", {}).get("pages_migrated") for s in steps],
                    1,
                    "{:.0f}",
                ),
                med(
                    [
                        s.get("figures", {}).get("host", {}).get("rss_reclaimed_bytes")
                        for s in steps
                    ],
                    -1 / 2**20,
                ),
            ]
        )
    for name, n in sorted(failed.items()):
        rows.append([name, "(cells failed)", f"0/{n}", "-", "-", "-", "-"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def overhead_summary(cells: list[dict[str, Any]]) -> str:
    totals = [c["timings"]["total"] for c in cells]
    overhead = [c["timings"]["overhead"] for c in cells]
    boot = [c["timings"]["boot"] for c in cells]
    if not totals:
        return "no cells"
    share = sum(overhead) / sum(totals)
    return (
        f"{len(cells)} cells in {sum(totals) / 60:.1f} min; per cell median "
        f"{statistics.median(totals):.1f} s, boot {statistics.median(boot):.1f} s, runner "
        f"overhead {statistics.median(overhead):.2f} s ({share * 100:.1f}% of cell time)"
    )


def default_out() -> Path:
    return repo_root() / "results" / "raw"
