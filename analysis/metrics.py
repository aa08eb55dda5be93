"""One tidy table of per-step metrics: the single view the report, `dynamem compare`, asv
and the runner's summary all read.

A row is one metric of one measured resize step of one cell, labelled with everything a
reader needs to keep it in context: the cell's status, the step's outcome, the mechanism
and every field of the experimental condition (`dynamem.record.Condition`). Failed cells
keep rows too, including one `succeeded = 0` row for each resize the cell never reached,
so a failure is always counted.

The one rule every consumer applies (`usable`): cost and latency figures come only from
`ok` steps of `ok` cells; failure and partial shares come from all rows (`outcome_counts`)
and are shown beside every figure they qualify. A resize that did less work looks faster,
so anything else would bias a comparison towards the failing mechanism.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from dynamem.record import CellRecord, ResizeStep
from dynamem.units import parse_size

MiB = 2**20
# Fragmentation is compared in one zone every x86-64 guest here has, so a balloon guest
# (Normal present) and a hotplug guest (Movable) are measured in the same place.
FRAGMENTATION_ZONE = "DMA32"

Getter = Callable[[CellRecord, ResizeStep], float | None]


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # what a reader sees on an axis or in a table
    unit: str
    better: Literal["lower", "higher", "none"]  # "none": a change in either direction matters
    get: Getter
    # Absolute change below which this metric cannot tell two runs apart (a page count
    # moves by hundreds on an idle guest, a share in steps of one cell).
    resolution: float
    kind: Literal["cost", "outcome"] = "cost"  # outcome metrics count every step


def _f(value: float | int | None, scale: float = 1.0) -> float | None:
    return None if value is None else float(value) * scale


def _only(direction: str, get: Getter) -> Getter:
    def wrapped(cell: CellRecord, step: ResizeStep) -> float | None:
        return get(cell, step) if step.direction == direction else None

    return wrapped


def _guest(field: str) -> Getter:
    def get(cell: CellRecord, step: ResizeStep) -> float | None:
        g = step.cost.guest
        return None if g is None else _f(getattr(g, field))

    return get


def _rss_reclaimed_mib(cell: CellRecord, step: ResizeStep) -> float | None:
    h = step.cost.host
    return None if h is None else h.rss_reclaimed_bytes / MiB


def _rss_reclaimed_share(cell: CellRecord, step: ResizeStep) -> float | None:
    """Host RSS given back per byte removed: 1.0 means all of it."""
    h = step.cost.host
    if h is None or not step.requested_bytes:
        return None
    return h.rss_reclaimed_bytes / abs(step.requested_bytes)


def _rss_settle_s(cell: CellRecord, step: ResizeStep) -> float | None:
    h = step.cost.host
    return None if h is None else h.rss_settle_s


def _unusable_order9_change(cell: CellRecord, step: ResizeStep) -> float | None:
    g = step.cost.guest
    if g is None:
        return None
    zone = next((z for z in g.fragmentation if z.endswith("/" + FRAGMENTATION_ZONE)), None)
    if zone is None:
        return None
    before, after = g.fragmentation[zone].unusable_order9
    return None if before is None or after is None else (after - before) / 1000


def _watermark_change_kib(cell: CellRecord, step: ResizeStep) -> float | None:
    """Sum over zones of the `high` watermark's change, in KiB (4 KiB pages)."""
    g = step.cost.guest
    if g is None or not g.watermarks:
        return None
    return float(sum(z.high[1] - z.high[0] for z in g.watermarks.values()) * 4)


def _memtotal_error_mib(cell: CellRecord, step: ResizeStep) -> float | None:
    seen = step.guest_memtotal_delta_bytes
    return None if seen is None else (seen - step.requested_bytes) / MiB


def _anon_huge_change_mib(cell: CellRecord, step: ResizeStep) -> float | None:
    h = step.cost.host
    return None if h is None else (h.anon_huge_after_kb - h.anon_huge_before_kb) / 1024


def _workload(field: str) -> Getter:
    def get(cell: CellRecord, step: ResizeStep) -> float | None:
        w = step.cost.workload
        return None if w is None else _f(getattr(w, field))

    return get


def _memtotal_start_mib(cell: CellRecord, step: ResizeStep) -> float | None:
    kb = cell.context.memtotal_start_kb if cell.context else None
    return None if kb is None else kb / 1024


def _succeeded(cell: CellRecord, step: ResizeStep) -> float:
    return 1.0 if cell.ok and step.outcome == "ok" else 0.0


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("latency_host_s", "host-side latency", "s", "lower",
               lambda c, s: s.host_latency_s, 0.002),
        Metric("latency_guest_s", "guest-visible latency", "s", "lower",
               lambda c, s: s.guest_latency_s, 0.002),
        Metric("latency_guest_clock_s", "guest-side duration (guest clock)", "s", "lower",
               lambda c, s: s.guest_clock_s, 0.0005),
        Metric("latency_guest_driver_s", "driver entry to end of its work (guest clock)",
               "s", "lower", lambda c, s: s.guest_driver_s, 0.0005),
        Metric("succeeded", "ok step of an ok cell", "share", "higher", _succeeded, 0.0,
               kind="outcome"),
        Metric("rss_reclaimed_mib", "host RSS reclaimed", "MiB", "higher",
               _only("shrink", _rss_reclaimed_mib), 1.0),
        Metric("rss_reclaimed_share", "host RSS reclaimed / removed", "share", "higher",
               _only("shrink", _rss_reclaimed_share), 0.02),
        Metric("rss_settle_s", "time until host RSS settled", "s", "lower",
               _only("shrink", _rss_settle_s), 0.05),
        Metric("swap_out_pages", "guest swap-out", "pages", "lower",
               _guest("swap_out_pages"), 256),
        Metric("swap_in_pages", "guest swap-in", "pages", "lower", _guest("swap_in_pages"), 256),
        Metric("pages_migrated", "pages migrated", "pages", "lower",
               _guest("pages_migrated"), 256),
        Metric("migrations_failed", "page migrations failed", "pages", "lower",
               _guest("migrations_failed"), 16),
        Metric("compaction_stalls", "compaction stalls", "count", "lower",
               _guest("compaction_stalls"), 2),
        Metric("oom_kills", "guest OOM kills", "count", "lower", _guest("oom_kills"), 1),
        Metric("unusable_order9_change",
               f"unusable free space index, order 9, {FRAGMENTATION_ZONE} zone, change",
               "index", "lower", _unusable_order9_change, 0.02),
        Metric("watermark_high_change_kib", "zone high watermarks, change", "KiB", "none",
               _watermark_change_kib, 64),
        Metric("anon_huge_change_mib", "QEMU AnonHugePages change", "MiB", "higher",
               _anon_huge_change_mib, 2),
        Metric("memtotal_error_mib", "guest MemTotal change minus request", "MiB", "none",
               _memtotal_error_mib, 1),
        Metric("memtotal_start_mib", "guest MemTotal when the steps start", "MiB", "none",
               _memtotal_start_mib, 1),
        Metric("workload_longest_stall_ms", "workload's longest stall", "ms", "lower",
               _workload("longest_stall_ms"), 5),
        Metric("workload_slowdown", "workload slowdown during the resize", "x", "lower",
               _workload("slowdown"), 0.05),
        # What watching cost: the in-guest sampler's CPU from the request to the host-side
        # outcome (the work the resize competed with), and how late the guest-visible
        # completion may be stamped.
        Metric("sampler_request_share", "sampler CPU during the request, share of a vCPU",
               "share", "lower", lambda c, s: s.sampler_request_share, 0.005),
        Metric("guest_bound_s", "guest-visible completion stamped late by at most", "s",
               "lower", lambda c, s: s.guest_bound_s, 0.002),
    ]
}  # fmt: skip


def driver_or_look(table: pd.DataFrame) -> str:
    """The guest-clock duration a run's views use: from the driver's entry where the guest
    traced it (every resize of a run from one guest image does or none does), else from
    the sampler's last look before the change."""
    driver = table[(table.metric == "latency_guest_driver_s") & table.value.notna()]
    return "latency_guest_driver_s" if len(driver) else "latency_guest_clock_s"


CONDITION_COLUMNS = [
    "accel", "cpu_model", "cpus", "memory_mib", "workload", "workload_mib", "touch_mib",
    "swap", "swap_mib", "memhp", "kernel_args", "warmup", "observer", "start", "steps", "guest",
    "host",
]  # fmt: skip
ROW_KEYS = [
    "run_id", "cell", "scenario", "repeat", "cell_status", "mechanism", "variant",
    *CONDITION_COLUMNS, "condition", "workload_label", "reproduces", "step_index", "step",
    "direction", "size_mib", "outcome", "metric", "value",
]  # fmt: skip
NOT_RUN = "not run"  # the outcome of a resize a failed cell never reached


def _planned_resizes(cell: CellRecord) -> Iterator[tuple[int, str, str, float]]:
    """(index, label, direction, MiB) of every resize the scenario's steps hold."""
    for k, label in enumerate(cell.condition.steps):
        words = label.split()
        if len(words) == 2 and words[0] in ("shrink", "grow"):
            yield k, label, words[0], parse_size(words[1]) / MiB


POOLED = "pooled hosts"  # the host of every row once `--pool-hosts` merged them
HOST_PART = "; host "  # how a condition's text names its host fingerprint (always last)


def host_fingerprint(cell: CellRecord) -> str:
    """The fingerprint of the host a cell ran on ("" for records from before cells kept it)."""
    return cell.host.fingerprint if cell.host is not None else ""


def condition_of(cell: CellRecord) -> str:
    """The condition a cell's numbers belong to: its scenario's condition and the host
    fingerprint it ran on. Cells differing in either are never pooled."""
    host = host_fingerprint(cell)
    return cell.condition.describe() + (HOST_PART + host if host else "")


def pool_hosts(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every host fingerprint merged into one (`--pool-hosts`): what is
    compared is then the mixture of hosts each run happened to use."""
    if table.empty:
        return table
    out = table.copy()
    out["host"] = POOLED
    out["condition"] = out["condition"].str.split(HOST_PART, n=1, regex=False).str[0]
    return out


def tidy(cells: Iterable[CellRecord], run_id: str = "") -> pd.DataFrame:
    """Rows for every metric a resize step has (missing figures give no row), for every
    cell, failed ones included; a resize a failed cell never reached gives one
    `succeeded = 0` row with the outcome `not run`."""
    rows: list[tuple[object, ...]] = []
    for cell in cells:
        c = cell.condition
        host = host_fingerprint(cell)
        head = (
            run_id, cell.cell, cell.scenario, cell.repeat, cell.status, cell.mechanism.label,
            cell.mechanism.variant, c.accel, c.cpu_model, c.cpus, c.memory / MiB, c.workload,
            c.workload_size / MiB, c.touch / MiB, c.swap, c.swap_size / MiB,
            c.memhp_default_state, " ".join(c.kernel_args), c.warmup, c.observer, c.start,
            ", ".join(c.steps), c.guest, host, condition_of(cell), c.workload_label,
            cell.reproduces or "",
        )  # fmt: skip
        recorded = dict(cell.resizes())
        for k, label, direction, size in _planned_resizes(cell):
            step = recorded.pop(k, None)
            if step is None:
                rows.append((*head, k, label, direction, size, NOT_RUN, "succeeded", 0.0))
                continue
            key = (*head, k, step.step or label, step.direction,
                   abs(step.requested_bytes) / MiB, step.outcome)  # fmt: skip
            for metric in METRICS.values():
                value = metric.get(cell, step)
                if value is not None:
                    rows.append((*key, metric.name, value))
        for k, step in recorded.items():  # a step the condition does not list (never expected)
            rows.append((*head, k, step.step, step.direction, abs(step.requested_bytes) / MiB,
                         step.outcome, "succeeded", _succeeded(cell, step)))  # fmt: skip
    return pd.DataFrame(rows, columns=ROW_KEYS)


def usable(table: pd.DataFrame) -> pd.DataFrame:
    """The rows cost and latency statistics may use: ok steps of ok cells, cost metrics."""
    if table.empty:
        return table
    cost = table["metric"].map(lambda m: METRICS[m].kind == "cost")
    return table[(table["cell_status"] == "ok") & (table["outcome"] == "ok") & cost]


STEP_KEYS = ["scenario", "step_index", "step"]


def outcome_counts(table: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per group (default: scenario and step): n resizes, how many were usable (`ok`), and
    how many of each other outcome; failed cells' steps counted as `cell_failed`."""
    keys = by or STEP_KEYS
    cols = [*keys, "n", "ok", "partial", "refused", "timeout", "unsupported", "error",
            "skipped", "cell_failed", "share"]  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=cols)
    steps = table[table["metric"] == "succeeded"].copy()
    # A failed cell's steps count as `cell_failed`, whatever their own outcome (or none).
    steps["what"] = steps["outcome"].where(steps["cell_status"] == "ok", "cell_failed")
    counts = pd.crosstab([steps[k] for k in keys], steps["what"])
    out = counts.reindex(columns=cols[len(keys) + 1 : -1], fill_value=0)
    out.insert(0, "n", counts.sum(axis=1))
    out["share"] = out["ok"] / out["n"]
    return out.reset_index()[cols]


def share_text(ok: int, n: int) -> str:
    return f"{ok}/{n} ok"


def variant_label(mechanism: str, variant: str | None) -> str:
    """`virtio-mem/sbm`, `balloon`: the name a reader sees; colours key on it."""
    return mechanism if not variant or variant == "default" else f"{mechanism}/{variant}"


def cell_outcomes(cells: Iterable[CellRecord]) -> pd.DataFrame:
    """One row per cell: status and error, so failed cells are counted, never dropped."""
    return pd.DataFrame(
        [(c.scenario, c.mechanism.label, c.repeat, c.status, c.error) for c in cells],
        columns=["scenario", "mechanism", "repeat", "status", "error"],
    )


def resize_steps(
    cells: Iterable[CellRecord], *, usable_only: bool = True
) -> Iterator[tuple[CellRecord, int, ResizeStep]]:
    """(cell, index, step) of every resize, by default only ok steps of ok cells (what a
    figure drawn from records rather than the table may show)."""
    for cell in cells:
        if usable_only and not cell.ok:
            continue
        for k, step in cell.resizes():
            if not usable_only or step.outcome == "ok":
                yield cell, k, step
