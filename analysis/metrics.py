"""One tidy table of per-resize metrics, the single view every statistic and figure reads.

A row is one metric of one measured resize step of one cell. Keeping the extraction here
(and not in each consumer) is what lets the report, `dynamem compare` and asv agree on
what "shrink latency" or "RSS reclaimed" means.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

MiB = 2**20


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # what a reader sees on an axis or in a table
    unit: str
    better: Literal["lower", "higher", "none"]  # "none": a change in either direction matters
    get: Callable[[dict[str, Any]], float | None]


def _figure(
    *path: str, scale: float = 1.0, only: str | None = None
) -> Callable[[dict[str, Any]], float | None]:
    def get(step: dict[str, Any]) -> float | None:
        if only is not None and step.get("direction") != only:
            return None
        node: Any = step.get("figures", {})
        for key in path:
            if not isinstance(node, dict) or node.get(key) is None:
                return None
            node = node[key]
        return float(node) * scale

    return get


def _field(key: str, scale: float = 1.0) -> Callable[[dict[str, Any]], float | None]:
    def get(step: dict[str, Any]) -> float | None:
        value = step.get(key)
        return None if value is None else float(value) * scale

    return get


def _rss_reclaimed_share(step: dict[str, Any]) -> float | None:
    """Host RSS given back per byte removed (shrinks only): 1.0 means all of it."""
    reclaimed = step.get("figures", {}).get("host", {}).get("rss_reclaimed_bytes")
    if step.get("direction") != "shrink" or reclaimed is None or not step.get("requested_bytes"):
        return None
    return float(reclaimed) / abs(float(step["requested_bytes"]))


def main_zone(zones: dict[str, Any]) -> str | None:
    """The zone most of the guest's kernel memory lives in (Normal, else DMA32)."""
    for suffix in ("/Normal", "/DMA32"):
        for name in zones:
            if name.endswith(suffix):
                return name
    return None


def _unusable_order9_change(step: dict[str, Any]) -> float | None:
    frag = step.get("figures", {}).get("guest", {}).get("fragmentation", {})
    zone = main_zone(frag)
    if zone is None:
        return None
    before, after = frag[zone].get("unusable_order9", [None, None])
    return None if before is None or after is None else float(after - before) / 1000


def _watermark_change_kib(step: dict[str, Any]) -> float | None:
    """Sum over zones of the `high` watermark's change, in KiB (4 KiB pages)."""
    marks = step.get("figures", {}).get("guest", {}).get("watermarks")
    if not marks:
        return None
    return float(sum(z["high"][1] - z["high"][0] for z in marks.values()) * 4)


def _memtotal_error_mib(step: dict[str, Any]) -> float | None:
    seen, asked = step.get("guest_memtotal_delta_bytes"), step.get("requested_bytes")
    if seen is None or asked is None:
        return None
    return float(seen - asked) / MiB


def _anon_huge_change_mib(step: dict[str, Any]) -> float | None:
    host = step.get("figures", {}).get("host", {})
    if host.get("anon_huge_before_kb") is None or host.get("anon_huge_after_kb") is None:
        return None
    return float(host["anon_huge_after_kb"] - host["anon_huge_before_kb"]) / 1024


def _succeeded(step: dict[str, Any]) -> float:
    return 1.0 if step.get("outcome") == "ok" else 0.0


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("latency_host_s", "host-side latency", "s", "lower", _field("host_latency_s")),
        Metric("latency_guest_s", "guest-visible latency", "s", "lower", _field("guest_latency_s")),
        Metric("succeeded", "outcome ok", "share", "higher", _succeeded),
        Metric("rss_reclaimed_mib", "host RSS reclaimed", "MiB", "higher",
               _figure("host", "rss_reclaimed_bytes", scale=1 / MiB, only="shrink")),
        Metric("rss_reclaimed_share", "host RSS reclaimed / removed", "share", "higher",
               _rss_reclaimed_share),
        Metric("rss_settle_s", "time until host RSS settled", "s", "lower",
               _figure("host", "rss_settle_s", only="shrink")),
        Metric("swap_out_pages", "guest swap-out", "pages", "lower",
               _figure("guest", "swap_out_pages")),
        Metric("swap_in_pages", "guest swap-in", "pages", "lower",
               _figure("guest", "swap_in_pages")),
        Metric("pages_migrated", "pages migrated", "pages", "lower",
               _figure("guest", "pages_migrated")),
        Metric("migrations_failed", "page migrations failed", "pages", "lower",
               _figure("guest", "migrations_failed")),
        Metric("compaction_stalls", "compaction stalls", "count", "lower",
               _figure("guest", "compaction_stalls")),
        Metric("oom_kills", "guest OOM kills", "count", "lower", _figure("guest", "oom_kills")),
        Metric("unusable_order9_change", "unusable free space index, order 9, change",
               "index", "lower", _unusable_order9_change),
        Metric("watermark_high_change_kib", "zone high watermarks, change", "KiB", "none",
               _watermark_change_kib),
        Metric("anon_huge_change_mib", "QEMU AnonHugePages change", "MiB", "higher",
               _anon_huge_change_mib),
        Metric("memtotal_error_mib", "guest MemTotal change minus request", "MiB", "none",
               _memtotal_error_mib),
        Metric("workload_longest_stall_ms", "workload's longest stall", "ms", "lower",
               _figure("workload", "longest_stall_ms")),
        Metric("workload_slowdown", "workload slowdown during the resize", "x", "lower",
               _figure("workload", "slowdown")),
    ]
}  # fmt: skip

ROW_KEYS = [
    "run_id", "scenario", "mechanism", "variant", "workload", "repeat", "step_index", "step",
    "direction", "size_mib", "outcome", "metric", "value",
]  # fmt: skip


def variant_label(mechanism: str, variant: str | None) -> str:
    """`virtio-mem/sbm`, `balloon`: the name a reader sees; colours key on it."""
    return mechanism if not variant or variant == "default" else f"{mechanism}/{variant}"


@dataclass(frozen=True)
class Resize:
    """One measured resize step with what every view keys on, defaults filled in."""

    cell: dict[str, Any]
    index: int  # the step's position in the cell
    step: dict[str, Any]

    @property
    def mechanism(self) -> str:
        mech = self.step.get("mechanism") or self.cell.get("mechanism", "?")
        return variant_label(str(mech), self.step.get("variant"))

    @property
    def workload(self) -> str:
        return str(self.cell.get("workload", "idle"))

    @property
    def direction(self) -> str:
        return str(self.step.get("direction", ""))

    @property
    def label(self) -> str:
        return str(self.step.get("step", f"step {self.index}"))

    @property
    def guest(self) -> dict[str, Any]:
        figures = self.step.get("figures") or {}
        return figures.get("guest") or {}


def resizes(cells: Iterable[dict[str, Any]]) -> Iterator[Resize]:
    for cell in cells:
        for k, step in enumerate(cell.get("steps") or []):
            if isinstance(step, dict) and step.get("kind") == "resize":
                yield Resize(cell, k, step)


def tidy(cells: Iterable[dict[str, Any]], run_id: str = "") -> pd.DataFrame:
    """Rows for every metric a resize step has (missing figures give no row)."""
    rows: list[tuple[Any, ...]] = []
    for r in resizes(cells):
        step = r.step
        key = (
            run_id,
            r.cell["scenario"],
            r.mechanism,
            step.get("variant") or "default",
            r.workload,
            r.cell["repeat"],
            r.index,
            r.label,
            r.direction,
            abs(step.get("requested_bytes") or 0) / MiB,
            step.get("outcome", ""),
        )
        for metric in METRICS.values():
            value = metric.get(step)
            if value is not None:
                rows.append((*key, metric.name, value))
    return pd.DataFrame(rows, columns=ROW_KEYS)


def cell_outcomes(cells: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell: status and error, so failed cells are counted, never dropped."""
    return pd.DataFrame(
        [
            (c["scenario"], c.get("mechanism", ""), c["repeat"], c["status"], c.get("error", ""))
            for c in cells
        ],
        columns=["scenario", "mechanism", "repeat", "status", "error"],
    )
