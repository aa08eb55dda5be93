"""`dynamem report`: one run's raw results turned into report.md and index.html.

Every sentence about the data is computed from the data; where a run holds nothing for a
question the report says which suite measures it instead of guessing. A winner is marked
only where it beats every other mechanism after Holm's correction over all comparisons
of the verdict table.
"""

import datetime
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import markdown
import numpy as np
import pandas as pd

from dynamem.analysis import figures as F
from dynamem.analysis.metrics import METRICS, resizes, tidy
from dynamem.analysis.stats import (
    cliffs_delta,
    group_stats,
    hodges_lehmann,
    holm,
    mad_outliers,
    mann_whitney_p,
)
from dynamem.analysis.stats import ratio_of_medians_ci as ratio_ci
from dynamem.store import RunStore

BOOTSTRAP_SEED = 20261126
ALPHA = 0.05


@dataclass
class Report:
    store: RunStore
    cells: list[dict[str, Any]]
    problems: list[str]
    table: pd.DataFrame
    out: Path
    lines: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, make: Callable[[Path], Path | None], name: str, alt: str) -> bool:
        path = make(self.out / name)
        if path is None:
            self.add(f"(No data in this run for the figure of {alt}.)", "")
            return False
        self.add(f"![{alt}]({name})", "")
        return True


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or not np.isfinite(x):
        return "-"
    if unit == "s":
        return f"{x * 1000:.0f} ms" if abs(x) < 1 else f"{x:.2f} s"
    if unit == "share":
        return f"{x + 0.0:.0%}".replace("-0%", "0%")
    suffix = f" {unit}" if unit not in ("count", "pages", "index", "x", "") else ""
    if abs(x) >= 100 or float(x).is_integer():
        return f"{x:,.0f}{suffix}"
    return f"{x:.3g}{suffix}"


def _values(t: pd.DataFrame, metric: str, **where: str) -> dict[str, np.ndarray]:
    part = t[t.metric == metric]
    for k, v in where.items():
        part = part[part[k] == v]
    return {m: g["value"].to_numpy(float) for m, g in part.groupby("mechanism")}


def _median_ci(values: np.ndarray) -> tuple[float, float, float]:
    g = group_stats(
        values, np.zeros(len(values), dtype=np.int64), 1, method="bootstrap", seed=BOOTSTRAP_SEED
    )
    return float(g.median[0]), float(g.ci_low[0]), float(g.ci_high[0])


# (label, metric, direction) rows of the verdict table, repeated per workload.
CRITERIA = [
    ("shrink latency", "latency_guest_s", "shrink"),
    ("grow latency", "latency_guest_s", "grow"),
    ("host RSS reclaimed / removed", "rss_reclaimed_share", "shrink"),
    ("swap-out caused by the shrink", "swap_out_pages", "shrink"),
    ("pages migrated by the shrink", "pages_migrated", "shrink"),
    ("fragmentation: order-9 unusable index change", "unusable_order9_change", "shrink"),
    ("watermark effect: high watermarks change", "watermark_high_change_kib", "shrink"),
    ("MemTotal change minus request", "memtotal_error_mib", "shrink"),
]


def verdict_table(t: pd.DataFrame, mechs: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of cells "median [CI]", the winner marked only where significant after Holm;
    and one row per comparison behind it (best mechanism of a row against each other):
    Hodges-Lehmann shift with its exact CI, Cliff's delta, p and Holm's p."""
    rows: list[list[str]] = []
    tests: list[tuple[int, str, str, str, float]] = []  # (row, best, other, effect, p)
    best_of: dict[int, str] = {}
    workloads = sorted(set(t.workload), key=lambda w: w != "idle")
    for workload in workloads:
        for label, metric, direction in CRITERIA:
            vals = _values(t[t.workload == workload], metric, direction=direction)
            if not vals:
                continue
            m = METRICS[metric]
            cells = []
            for mech in mechs:
                if mech not in vals:
                    cells.append("-")
                    continue
                med, lo, hi = _median_ci(vals[mech])
                cells.append(f"{fmt(med, m.unit)} [{fmt(lo, m.unit)}, {fmt(hi, m.unit)}]")
            r = len(rows)
            rows.append([f"{label} ({workload})", *cells])
            if m.better != "none" and len(vals) > 1:
                sign = 1 if m.better == "lower" else -1
                best = min(vals, key=lambda k: sign * float(np.median(vals[k])))
                best_of[r] = best
                for other in vals:
                    if other != best:
                        shift, lo, hi, level = hodges_lehmann(vals[best], vals[other])
                        effect = (
                            f"{fmt(shift, m.unit)} [{fmt(lo, m.unit)}, {fmt(hi, m.unit)}] "
                            f"({level:.0%}); delta {cliffs_delta(vals[best], vals[other]):+.2f}"
                        )
                        p = mann_whitney_p(vals[best], vals[other])
                        tests.append((r, best, other, effect, p))
    adjusted = holm([test[4] for test in tests])
    for r, best in best_of.items():
        ps = [adj for test, adj in zip(tests, adjusted, strict=True) if test[0] == r]
        if ps and max(ps) < ALPHA:
            k = 1 + mechs.index(best)
            rows[r][k] = f"**{rows[r][k]} ✓**"
    comparisons = [
        [rows[r][0], f"{best} vs {other}", effect, f"{p:.3g}", f"{adj:.3g}"]
        for (r, best, other, effect, p), adj in zip(tests, adjusted, strict=True)
    ]
    return rows, comparisons


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


def _setup(rep: Report) -> None:
    run, meta = rep.store.run, rep.store.run.get("metadata", {})
    pins = meta.get("guest_packages") or {}
    kernel_pin = (
        next((f"{k} {v}" for k, v in sorted(pins.items()) if str(k).startswith("linux-image")), "-")
        if isinstance(pins, dict)
        else "-"
    )
    ok = sum(c.get("status") == "ok" for c in rep.cells)
    suite_name = (run.get("suite") or {}).get("name", "?")
    rep.add("## Setup", "")
    rep.add(
        *md_table(
            ["setting", "value"],
            [
                ["run", f"`{run['run_id']}` (suite `{suite_name}`, seed {run.get('seed')})"],
                [
                    "cells",
                    f"{ok} ok, {len(rep.cells) - ok} failed, {len(run.get('order') or [])} planned"
                    + (f"; {len(rep.problems)} unreadable" if rep.problems else ""),
                ],
                ["accelerator", f"**{meta.get('accel')}** ({meta.get('accel_reason', '')})"],
                [
                    "host",
                    f"{meta.get('host_cpu')}, {meta.get('host_cpus')} CPUs, "
                    f"kernel {meta.get('host_kernel')}",
                ],
                ["QEMU", str(meta.get("qemu_version"))],
                ["guest kernel", f"{meta.get('guest_kernel')} (package {kernel_pin})"],
                [
                    "guest image",
                    f"`{str(meta.get('guest_image'))[:16]}` "
                    f"({len(pins) if isinstance(pins, dict) else '?'} pinned packages)",
                ],
                [
                    "dynamem",
                    f"{meta.get('dynamem_version')} at `{str(meta.get('git_commit'))[:12]}`",
                ],
                [
                    "statistics",
                    f"median and percentile-bootstrap 95% CI (2,000 resamples, seed "
                    f"{BOOTSTRAP_SEED}); Mann-Whitney U with Holm's correction, alpha {ALPHA}",
                ],
            ],
        )
    )
    failed = [c for c in rep.cells if c.get("status") != "ok"]
    if failed or rep.problems:
        rep.add("Failed cells (their figures are missing from everything below):", "")
        rep.add(*(f"- `{c.get('cell')}`: {c.get('error', '')}" for c in failed))
        rep.add(*(f"- unreadable record {p}" for p in rep.problems), "")


def _sentence_by_mech(t: pd.DataFrame, metric: str, mechs: list[str], **where: str) -> str:
    vals = _values(t, metric, **where)
    unit = METRICS[metric].unit
    parts = [
        f"{m} {fmt(float(np.median(vals[m])), unit)} (n={len(vals[m])})" for m in mechs if m in vals
    ]
    return "; ".join(parts) if parts else "no data"


def _questions(rep: Report, mechs: list[str]) -> None:
    t, cells = rep.table, rep.cells
    seed = BOOTSTRAP_SEED
    steps_of = [(c, s) for c in cells for s in c.get("steps") or [] if isinstance(s, dict)]
    rep.add("## The questions", "")

    rep.add("### 1. Do zone watermarks move?", "")
    rep.figure(lambda p: F.watermarks(cells, p), "watermarks.png", "watermark change")
    moved: dict[str, list[bool]] = {}
    for r in resizes(cells):
        wm = r.guest.get("watermarks_moved")
        if wm is not None:
            moved.setdefault(r.mechanism, []).append(any(wm.values()))
    if moved:
        rep.add(
            "Share of resizes after which any zone's min/low/high watermark differed: "
            + "; ".join(
                f"{m} {np.mean(moved[m]):.0%} of {len(moved[m])}" for m in mechs if m in moved
            )
            + ". Median change of the summed high watermarks on shrink: "
            + _sentence_by_mech(t, "watermark_high_change_kib", mechs, direction="shrink")
            + ".",
            "",
        )

    rep.add("### 2. Swap or migration when shrinking?", "")
    rows = []
    for workload in sorted(set(t.workload), key=lambda w: w != "idle"):
        part = t[(t.workload == workload) & (t.direction == "shrink")]
        for mech in mechs:

            def med(metric: str, p: pd.DataFrame = part, m: str = mech) -> str:
                v = p[(p.mechanism == m) & (p.metric == metric)]["value"]
                return fmt(float(v.median()), METRICS[metric].unit) if len(v) else "-"

            if (part.mechanism == mech).any():
                rows.append(
                    [
                        workload,
                        mech,
                        med("latency_guest_s"),
                        med("swap_out_pages"),
                        med("pages_migrated"),
                        med("compaction_stalls"),
                        med("oom_kills"),
                        med("succeeded"),
                    ]
                )
    rep.add(
        *md_table(
            [
                "workload",
                "mechanism",
                "shrink latency",
                "swap-out pages",
                "pages migrated",
                "compaction stalls",
                "OOM kills",
                "ok",
            ],
            rows,
        )
    )
    rep.figure(
        lambda p: F.time_series(cells, rep.store.load_series, p),
        "timeseries.png",
        "time series of one shrink per mechanism",
    )
    rep.add(
        "Medians per shrink; swap-out and migrations from the guest's /proc/vmstat over "
        "the step, the time series from the in-guest sampler and the host's smaps_rollup.",
        "",
    )

    rep.add("### 3. Does a mechanism give memory back to the host, and fragment it?", "")
    rep.figure(lambda p: F.rss_vs_requested(t, p), "rss_reclaimed.png", "RSS reclaimed")
    rep.add(
        "Host RSS reclaimed per MiB removed: "
        + _sentence_by_mech(t, "rss_reclaimed_share", mechs, direction="shrink")
        + ". QEMU AnonHugePages change on shrink (MiB): "
        + _sentence_by_mech(t, "anon_huge_change_mib", mechs, direction="shrink")
        + ". Memory the guest never touched was never in RSS, so idle shrinks reclaim "
        "little; `dynamem resize --touch` and the `study` suite's touched scenarios "
        "measure reclaim of used memory.",
        "",
    )

    rep.add("### 4. Granularity", "")
    grains: dict[str, set[str]] = {}
    for r in resizes(cells):
        cfg = r.step.get("mechanism_config")
        if not cfg:
            continue
        unit = cfg.get("block_size") or cfg.get("dimm_size")
        grains.setdefault(r.mechanism, set()).add(
            "4 KiB pages (balloon)" if unit is None else f"{unit >> 20} MiB blocks"
        )
    rep.add(
        "Unit each mechanism resized in: "
        + "; ".join(f"{m}: {', '.join(sorted(grains[m]))}" for m in mechs if m in grains)
        + ". Guest MemTotal change minus the request (MiB, median): "
        + _sentence_by_mech(t, "memtotal_error_mib", mechs)
        + ".",
        "",
    )

    rep.add("### 5. Latency as a function of size (plug is asynchronous)", "")
    rep.figure(lambda p: F.latency_vs_size(t, p, seed), "latency.png", "latency vs size")
    rep.add(
        "Host-side (QMP state polled every 2 ms) versus guest-visible completion, grow, "
        "median: host "
        + _sentence_by_mech(t, "latency_host_s", mechs, direction="grow")
        + "; guest "
        + _sentence_by_mech(t, "latency_guest_s", mechs, direction="grow")
        + ".",
        "",
    )

    variants = {m for m in mechs if m.startswith("virtio-mem/")}
    rep.add("### 6. Sub-Block Mode versus Big Block Mode", "")
    if len(variants) == 2:
        rep.add(
            "Shrink latency: "
            + _sentence_by_mech(t, "latency_guest_s", sorted(variants), direction="shrink")
            + ".",
            "",
        )
    else:
        rep.add(
            "Not measured in this run (one virtio-mem variant); the `study` suite runs both.", ""
        )

    rep.add("### 7. Failure and partial success", "")
    outcomes: dict[str, dict[str, int]] = {}
    for r in resizes(cells):
        counts = outcomes.setdefault(r.mechanism, {})
        outcome = str(r.step.get("outcome", "?"))
        counts[outcome] = counts.get(outcome, 0) + 1
    rep.add(
        "Outcomes of every resize: "
        + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes[m].items()))
            for m in mechs
            if m in outcomes
        )
        + f". Failed cells: "
        f"{sum(c.get('status') != 'ok' for c in cells)}.",
        "",
    )

    _step_kind_section(
        rep,
        steps_of,
        "oom",
        "### 8. Guest OOM: does the host hear of it?",
        lambda s: (
            f"OOM kills {s.get('oom_kills')}, balloon deflated "
            f"{(s.get('balloon_deflated_bytes') or 0) >> 20} MiB"
        ),
    )
    _step_kind_section(
        rep,
        steps_of,
        "reboot",
        "### 9. What a reboot does",
        lambda s: (
            f"host-side memory {(s.get('host_before_bytes') or 0) >> 20} -> "
            f"{(s.get('host_after_bytes') or 0) >> 20} MiB, MemTotal "
            f"{s.get('guest_memtotal_kb')} KiB"
        ),
    )
    _step_kind_section(
        rep,
        steps_of,
        "free",
        "### 10. Free page reporting",
        lambda s: (
            f"RSS released {(s.get('rss_released_bytes') or 0) >> 20} MiB in {s.get('seconds')} s"
        ),
    )
    rep.add(
        "### 11. Live migration",
        "",
        "Not measured: the harness has no migration scenario yet (the notes put it later).",
        "",
    )

    rep.add("### 12. Guest kernel settings", "")
    args = {c.get("scenario_config", {}).get("kernel_args", "") for c in cells}
    if len(args) > 1:
        rep.add(
            "Shrink latency by scenario: "
            + "; ".join(
                f"{name} {fmt(float(g['value'].median()), 's')}"
                for name, g in t[
                    (t.metric == "latency_guest_s") & (t.direction == "shrink")
                ].groupby("scenario")
            )
            + ".",
            "",
        )
    else:
        rep.add(
            "Not measured in this run (one kernel command line); the `study` suite varies "
            "`init_on_alloc`.",
            "",
        )

    rep.add("### 13. Who wins depends on the workload", "")
    for workload in sorted(set(t.workload), key=lambda w: w != "idle"):
        vals = _values(t[t.workload == workload], "latency_guest_s", direction="shrink")
        if vals:
            best = min(vals, key=lambda k: float(np.median(vals[k])))
            rep.add(
                f"- {workload}: fastest shrink {best} "
                f"({fmt(float(np.median(vals[best])), 's')} median)."
            )
    rep.add("")
    rep.figure(lambda p: F.fragmentation(cells, p), "fragmentation.png", "fragmentation")
    rep.figure(
        lambda p: F.workload_impact(t, p, seed),
        "impact.png",
        "workload impact (the `impact` workload's throughput and stalls)",
    )


def _step_kind_section(
    rep: Report,
    steps_of: list[tuple[dict[str, Any], dict[str, Any]]],
    kind: str,
    title: str,
    describe: Callable[[dict[str, Any]], str],
) -> None:
    rep.add(title, "")
    found = [(c, s) for c, s in steps_of if s.get("kind") == kind]
    if not found:
        rep.add(f"Not measured in this run (no `{kind}` step); the `study` suite has them.", "")
        return
    rep.add(*(f"- `{c.get('cell')}` ({c.get('mechanism')}): {describe(s)}" for c, s in found), "")


def _published(rep: Report) -> None:
    t = rep.table
    rep.add("## Compared with published results", "")
    rep.add(
        "HyperAlloc (EuroSys'25, KVM, 20 GiB guest with 19 GiB touched) shrank 20 -> 2 GiB "
        "with virtio-mem in about 0.58 s against about 21 s for the balloon (balloon / "
        "virtio-mem = 36x); Squeezy (EuroSys'26, Cloud Hypervisor) found virtio-mem unplug "
        "2.34x faster than the balloon on average. This run:",
        "",
    )
    any_row = False
    for workload in sorted(set(t.workload), key=lambda w: w != "idle"):
        vals = _values(t[t.workload == workload], "latency_guest_s", direction="shrink")
        for vm in (m for m in vals if m.startswith("virtio-mem")):
            if "balloon" not in vals:
                continue
            r, lo, hi = ratio_ci(vals[vm], vals["balloon"], seed=BOOTSTRAP_SEED)
            direction = (
                "the same direction"
                if lo > 1
                else ("the opposite direction" if hi < 1 else "no clear direction")
            )
            rep.add(
                f"- {workload}: balloon / {vm} shrink latency = {r:.2f}x "
                f"(95% CI {lo:.2f}-{hi:.2f}): {direction}."
            )
            any_row = True
    if not any_row:
        rep.add("- no balloon and virtio-mem shrinks in the same workload to compare.")
    accel = rep.store.run.get("metadata", {}).get("accel")
    rep.add(
        "",
        f"This run used **{accel}**, smaller guests and steps than the papers; "
        "the ratios are comparable in direction, not in magnitude.",
        "",
    )


def _appendix(rep: Report) -> None:
    t = rep.table
    rep.add("## Appendix: every metric", "")
    keys = ["scenario", "step", "metric"]
    codes, groups = pd.factorize(pd.MultiIndex.from_frame(t[keys]))
    values = t["value"].to_numpy(float)
    g = group_stats(values, codes, len(groups), method="bootstrap", seed=BOOTSTRAP_SEED)
    outliers = np.bincount(codes, weights=mad_outliers(values, codes), minlength=len(groups))
    rows = []
    for k, (scenario, step, metric) in enumerate(groups):
        unit = METRICS[metric].unit
        rows.append(
            [
                scenario,
                step,
                f"{METRICS[metric].label} ({unit})",
                str(g.n[k]),
                fmt(g.median[k], unit),
                fmt(g.iqr[k], unit),
                fmt(g.mean[k], unit),
                f"{fmt(g.ci_low[k], unit)} - {fmt(g.ci_high[k], unit)}",
                str(int(outliers[k])),
            ]
        )
    rep.add(
        *md_table(
            [
                "scenario",
                "step",
                "metric",
                "n",
                "median",
                "IQR",
                "mean",
                "95% CI of median",
                "MAD outliers",
            ],
            rows,
        )
    )


def build_report(store: RunStore, out: Path) -> tuple[Path, Path]:
    """Write report.md, index.html and the figures into `out`; returns (md, html)."""
    out.mkdir(parents=True, exist_ok=True)
    cells, problems = store.load_cells()
    table = tidy(cells, store.run["run_id"])
    rep = Report(store, cells, problems, table, out)
    mechs = F.ordered(table.mechanism) if not table.empty else []
    run = store.run
    rep.add(
        f"# dynamem report: {run['run_id']}",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC from "
        f"`{store.directory}`.",
        "",
    )
    _setup(rep)
    if table.empty:
        rep.add("No measured resize in this run: nothing to analyse.", "")
    else:
        rows, comparisons = verdict_table(table, mechs)
        rep.add(
            "## Verdict",
            "",
            f"Median [95% CI] per mechanism; ✓ marks a winner that beats every other "
            f"mechanism after Holm's correction over the {len(comparisons)} comparisons of this "
            "table (with n repeats per cell, Mann-Whitney cannot go below p = 2/C(2n, n), "
            "e.g. 0.0079 for n = 5, so few repeats rarely yield a marked winner).",
            "",
        )
        rep.add(*md_table(["criterion", *mechs], rows))
        rep.add(
            "Grow beyond boot RAM: the balloon can only deflate back to boot RAM (a grow "
            "past it is reported `unsupported`); DIMM and virtio-mem grow up to maxmem.",
            "",
        )
        if comparisons:
            rep.add(
                "Behind the marks: the best median of each row against every other mechanism. "
                "Shift = Hodges-Lehmann estimate of best minus other with its exact "
                "distribution-free interval (real level in brackets); delta = Cliff's delta "
                "(-1: every value of the best below every value of the other); Mann-Whitney "
                "p, and p after Holm over the whole table.",
                "",
            )
            rep.add(
                *md_table(["criterion", "comparison", "shift; delta", "p", "p (Holm)"], comparisons)
            )
        _questions(rep, mechs)
        _published(rep)
        _appendix(rep)
    md_path = out / "report.md"
    md_path.write_text("\n".join(rep.lines) + "\n")
    body = markdown.markdown(md_path.read_text(), extensions=["tables"])
    html_path = out / "index.html"
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(run['run_id'])}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    return md_path, html_path


CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2rem; }
"""
