"""`dynamem report`: one run's raw results turned into report.md and index.html.

Every number comes from the metric table (`metrics.tidy`) under its one rule: cost and
latency figures from ok steps of ok cells only, with the share of resizes they represent
("4/5 ok") beside them; failures and partial resizes are counted in that share and in the
outcome tables, never averaged in. Mechanisms are compared only within one experimental
condition (every field of `record.Condition` equal); each interval states its real level.
Every sentence about the data is computed from the data; where a run holds nothing for a
question the report says which suite measures it instead of guessing.
"""

import datetime
import html
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import markdown
import numpy as np
import pandas as pd

from dynamem.qemu.config import ICOUNT
from dynamem.record import CellRecord, FreeStep, OomStep, RebootStep, RunMetadata
from dynamem.store import RunStore

from . import figures as F
from .metrics import (
    CONDITION_COLUMNS,
    METRICS,
    MiB,
    condition_of,
    driver_or_look,
    outcome_counts,
    resize_steps,
    tidy,
    usable,
)
from .stats import cliffs_delta, group_stats, hodges_lehmann, holm, mad_outliers, mann_whitney_p

ALPHA = 0.05
CONFIDENCE = 0.95
INTERVAL = (
    "median with the exact distribution-free order-statistic interval of the median; its "
    "real level is printed with it (95% where n allows, else the level n gives, e.g. 75% "
    "for n = 3, 94% for n = 5)"
)


ICOUNT_NOTE = (
    "**Deterministic mode (tcg-icount).** The guest's clock counts the instructions it ran "
    "(one per nanosecond; an idle guest's clock jumps to its next timer), so latency here is "
    "the guest-side duration on the guest's clock: from the moment the mechanism's driver "
    "took the request (its entry function, stamped by the guest's function tracer) to the "
    "end of its work (DIMM and virtio-mem: the end of the last memory block's onlining or "
    "offlining; the balloon: the sampler's look that saw completion); where a guest traced no "
    "entry, from the last look that saw no change to that look. It excludes the work done "
    "on the host (QEMU's discards, the host kernel's page freeing) and the time the request "
    "took to reach the guest, so it "
    "complements wall-clock results on a KVM or TCG run and never replaces them. "
    "Wall-clock fields are recorded but not meaningful in this mode: every guest timer and "
    "I/O exit runs in one host thread."
)


@dataclass
class Report:
    store: RunStore
    cells: list[CellRecord]
    problems: list[str]
    table: pd.DataFrame  # every row (metrics.tidy)
    out: Path
    lines: list[str] = field(default_factory=list)
    conditions: dict[str, str] = field(default_factory=dict)  # description -> "C1"

    @property
    def good(self) -> pd.DataFrame:
        """The rows statistics may use (ok steps of ok cells)."""
        return usable(self.table)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, make: Callable[[Path], Path | None], name: str, alt: str) -> bool:
        path = make(self.out / name)
        if path is None:
            self.add(f"(No data in this run for the figure of {alt}.)", "")
            return False
        self.add(f"![{alt}]({name})", "")
        return True

    @property
    def icount(self) -> bool:
        """A tcg-icount run: its wall-clock figures are not meaningful, its guest-clock
        ones are nearly deterministic."""
        return self.store.run.metadata.accel == ICOUNT

    @property
    def latency(self) -> str:
        """The latency every view of this run uses: guest-visible wall clock, or under
        tcg-icount the guest-side duration on the guest's clock."""
        if not self.icount:
            return "latency_guest_s"
        return driver_or_look(self.table)

    def cid(self, condition: str) -> str:
        return self.conditions.get(condition, "C?")

    def cond_of(self, cell: CellRecord) -> str:
        """A cell's condition as figures label it, e.g. "C2: stress 614M"."""
        return f"{self.cid(condition_of(cell))}: {cell.condition.workload_label}"

    def direction_shares(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(mechanism, cond, direction) -> (ok, n), for figure legends."""
        return {
            (str(m), str(c), str(d)): v
            for (m, c, d), v in _shares(self.table, ["mechanism", "cond", "direction"]).items()
        }


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


def median_interval(values: np.ndarray, unit: str) -> str:
    """'median [low, high] level': the exact order-statistic interval and its real level."""
    if len(values) == 0:
        return "-"
    g = group_stats(values, np.zeros(len(values), dtype=np.int64), 1, confidence=CONFIDENCE)
    med = fmt(float(g.median[0]), unit)
    if len(values) < 2:
        return f"{med} (n=1, no interval)"
    lo, hi, level = float(g.ci_low[0]), float(g.ci_high[0]), float(g.ci_level[0])
    return f"{med} [{fmt(lo, unit)}, {fmt(hi, unit)}] {level:.0%}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


def _shares(table: pd.DataFrame, by: list[str]) -> dict[tuple[object, ...], tuple[int, int]]:
    counts = outcome_counts(table, by)
    return {tuple(r[: len(by)]): (int(r.ok), int(r.n)) for r in counts.itertuples(index=False)}


# -- setup and conditions ---------------------------------------------------------------------


def _guest_image(meta: RunMetadata, packages: int) -> str:
    """The embedded guest's cache key, or what the cloud image is and whether its base
    stayed unwritten."""
    image = meta.cloud_image
    if image is None:
        return f"`{str(meta.guest_image)[:16]}` ({packages} pinned packages)"
    if image.sha256_after is None:
        kept = "not read again yet (the run did not finish)"
    elif image.sha256_after == image.sha256:
        kept = "unchanged after the run (sha256 read again)"
    else:
        kept = f"**changed during the run** (sha256 after: `{image.sha256_after[:16]}`)"
    return (
        f"cloud image **{image.name}** (`{image.path}`, {image.format}, sha256 "
        f"`{image.sha256[:16]}`): {image.os}, {packages} packages, root {image.root}; "
        f"memory onlined by the kernel's memhp_default_state, by the image itself: "
        f"{image.onlining}; base {kept}"
    )


def _start_mode(rep: Report) -> str:
    """How the run's guests started, and what a saved state makes identical across cells."""
    parts = []
    fresh = sum(c.condition.start == "boot" for c in rep.cells)
    if fresh:
        parts.append(f"{fresh} cells booted fresh")
    saved = [c for c in rep.cells if c.condition.start == "snapshot"]
    if saved:
        started = [c for c in saved if c.context and c.context.state]
        builds: dict[str, set[str]] = {}
        for c in started:
            assert c.context is not None and c.context.state is not None
            builds.setdefault(condition_of(c), set()).add(
                f"{c.context.state.key}/{c.context.state.build}"
            )
        identical = rep.store.run.metadata.start_identical or (
            started[0].context.state.identical if started and started[0].context
            and started[0].context.state else []
        )  # fmt: skip
        n_states = len(set().union(*builds.values())) if builds else 0
        parts.append(
            f"{len(started)} cells started from {n_states} saved post-boot "
            f"state{'s' if n_states != 1 else ''}"
            + (
                f" ({len(saved) - len(started)} more failed before starting)"
                if len(saved) > len(started)
                else ""
            )  # fmt: skip
            + f"; identical in every cell of one state by construction: "
            f"{', '.join(identical) or 'unknown'}"
        )
        rebuilt = [cond for cond, b in builds.items() if len(b) > 1]
        if rebuilt:
            parts.append(
                f"the cells of {len(rebuilt)} condition{'s' if len(rebuilt) > 1 else ''} came "
                "from more than one build of their state (rebuilt during the run), so they do "
                "not all share one starting point"
            )
    return "; ".join(parts) + " (start modes are never pooled: part of the condition)"


def _unbalanced(cells: list[CellRecord]) -> list[str]:
    """(host, condition) blocks whose mechanisms ran different numbers of ok cells: there
    a host's speed can pass for a mechanism's."""
    runs: dict[tuple[str, str], Counter[str]] = {}
    mechanisms: dict[str, set[str]] = {}
    for c in cells:
        cond = condition_of(c)
        mechanisms.setdefault(cond, set()).add(c.mechanism.label)
        block = runs.setdefault((c.host.name if c.host else "", cond), Counter())
        block[c.mechanism.label] += c.ok
    return [
        f"{host or 'host'} ({', '.join(f'{m} {n}' for m, n in sorted(counts.items()))})"
        for (host, cond), counts in sorted(runs.items())
        if len({counts.get(m, 0) for m in mechanisms[cond]}) > 1
    ]


def _hosts(rep: Report) -> str:
    """Where the cells ran: each host fingerprint (never pooled: part of the condition)
    with its cells and workers, how busy its CPUs were during the steps, lost workers."""
    cluster = rep.store.run.metadata.cluster
    by_fp: dict[str, list[CellRecord]] = {}
    for c in rep.cells:
        by_fp.setdefault(c.host.fingerprint if c.host else "not recorded", []).append(c)
    parts = [f"cluster `{cluster}`" if cluster else "serial (one cell at a time)"]
    for k, (fp, cells) in enumerate(sorted(by_fp.items()), 1):
        workers = sorted({f"{c.host.worker}@{c.host.name}" for c in cells if c.host})
        loads = [c.host.load.busy_all for c in cells if c.host and c.host.load]
        busy = f", host CPUs {np.median(loads):.0%} busy during the steps (median)" if loads else ""
        parts.append(
            f"H{k} {fp}: {len(cells)} cells on {len(workers)} worker"
            f"{'s' if len(workers) != 1 else ''}{busy}"
        )
    unbalanced = _unbalanced(rep.cells) if cluster else []  # serial: shown by the k/n
    if unbalanced:
        parts.append(
            "not every mechanism of a condition ran equally often on each host (failed or "
            "moved cells): " + ", ".join(unbalanced[:5])
            + (f" and {len(unbalanced) - 5} more" if len(unbalanced) > 5 else "")
        )  # fmt: skip
    lost = [c for c in rep.cells if c.lost_attempts]
    if lost:
        parts.append(
            f"{len(lost)} cells lost a worker and ran again ({sum(c.ok for c in lost)} then ok)"
        )
    return "; ".join(parts) + (
        " (cells from different host fingerprints are never pooled: part of the condition)"
        if len(by_fp) > 1
        else ""
    )


def _setup(rep: Report) -> None:
    run, meta = rep.store.run, rep.store.run.metadata
    pins = meta.guest_packages or {}
    kernel_pin = next((f"{k} {v}" for k, v in sorted(pins.items()) if k.startswith("linux-image")),
                      "-")  # fmt: skip
    ok = sum(c.ok for c in rep.cells)
    observers = sorted({c.condition.observer for c in rep.cells})
    rep.add("## Setup", "")
    rep.add(
        *md_table(
            ["setting", "value"],
            [
                [
                    "run",
                    f"`{run.run_id}` (suite `{run.suite.name}`, seed {run.seed}, results "
                    f"format {rep.store.format})",
                ],
                [
                    "cells",
                    f"{ok} ok, {len(rep.cells) - ok} failed, {len(run.order)} planned"
                    + (f"; {len(rep.problems)} problems" if rep.problems else ""),
                ],
                ["accelerator", f"**{meta.accel}** ({meta.accel_reason})"],
                ["host", f"{meta.host_cpu}, {meta.host_cpus} CPUs, kernel {meta.host_kernel}"],
                ["QEMU", meta.qemu_version],
                ["guest kernel", f"{meta.guest_kernel} (package {kernel_pin})"],
                ["guest image", _guest_image(meta, len(pins))],
                ["dynamem", f"{meta.dynamem_version} at `{meta.git_commit[:12]}`"],
                ["observer", ", ".join(observers)],
                ["start", _start_mode(rep)],
                ["where", _hosts(rep)],
                ["statistics", f"{INTERVAL}; Mann-Whitney U with Holm's correction, alpha {ALPHA}"],
                [
                    "what is counted",
                    "latency and cost figures come only from resizes whose "
                    "outcome is `ok` in cells that completed; every figure shows beside it how "
                    "many of the resizes it stands for were (`k/n ok`); failed cells and partial, "
                    "refused or timed-out resizes are counted there and in question 7, never "
                    "averaged in",
                ],
            ],
        )  # fmt: skip
    )
    failed = [c for c in rep.cells if not c.ok]
    if failed or rep.problems:
        rep.add("Failed cells (counted as failures in every share below; none of their "
                "measurements enter a figure):", "")  # fmt: skip
        rep.add(*(f"- `{c.cell}`: {c.error}" for c in failed))
        rep.add(*(f"- problem: {p}" for p in rep.problems), "")


def _conditions(rep: Report) -> None:
    t = rep.table
    rep.add("## Conditions", "")
    rep.add(
        "Mechanisms are compared only within one condition: every field below equal. "
        "(The mechanism's own devices and boot size differ by design: a hotplug guest boots "
        "small and plugs up to the starting size, a balloon guest boots at it.)",
        "",
    )
    rows = []
    for k, (cond, part) in enumerate(t.groupby("condition", sort=False), 1):
        rep.conditions[str(cond)] = f"C{k}"
        mechs = ", ".join(F.ordered(part.mechanism))
        scenarios = ", ".join(sorted(set(part.scenario)))
        rows.append([f"C{k}", str(cond), mechs, scenarios])
    rep.add(*md_table(["", "condition", "mechanisms", "scenarios"], rows))
    start = rep.good[rep.good.metric == "memtotal_start_mib"]
    if not start.empty:
        per = start.drop_duplicates(["cell"]).groupby(["condition", "mechanism"])["value"]
        lines = []
        for cond, part in per.median().groupby(level=0):
            vals = {m: v for (_, m), v in part.items()}
            spread = (max(vals.values()) - min(vals.values())) / max(vals.values())
            lines.append(
                f"- {rep.cid(str(cond))}: "
                + "; ".join(f"{m} {v:,.0f} MiB" for m, v in vals.items())
                + (f" ({spread:.1%} apart)" if len(vals) > 1 else "")
            )
        rep.add(
            "Guest MemTotal when the measured steps start (median per mechanism): a guest "
            "with less usable memory starts under more pressure.",
            "",
            *lines,
            "",
        )


# -- verdict ----------------------------------------------------------------------------------

# (label, metric, directions it applies to)
CRITERIA = [
    ("latency", "latency_guest_s", ("shrink", "grow")),
    ("host RSS reclaimed / removed", "rss_reclaimed_share", ("shrink",)),
    ("swap-out", "swap_out_pages", ("shrink",)),
    ("pages migrated", "pages_migrated", ("shrink",)),
    ("fragmentation change", "unusable_order9_change", ("shrink",)),
    ("high watermarks change", "watermark_high_change_kib", ("shrink", "grow")),
    ("MemTotal change minus request", "memtotal_error_mib", ("shrink", "grow")),
]
VERDICT_KEYS = ["condition", "step_index", "step", "direction"]


def verdict_table(rep: Report, mechs: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows "median [interval] level, k/n ok" per mechanism within one condition and step,
    the winner marked only where significant after Holm over the whole table; and one
    row per comparison behind the marks."""
    good, t = rep.good, rep.table
    shares = _shares(t, [*VERDICT_KEYS[:3], "mechanism"])
    rows: list[list[str]] = []
    tests: list[tuple[int, str, str, str, float]] = []  # (row, best, other, effect, p)
    best_of: dict[int, str] = {}
    steps = t[t.metric == "succeeded"].drop_duplicates(VERDICT_KEYS)[VERDICT_KEYS]
    for cond, k, label, direction in steps.itertuples(index=False):
        part = good[(good.condition == cond) & (good.step_index == k)]
        wl = t[t.condition == cond].workload_label.iloc[0]
        for name, metric, directions in CRITERIA:
            if metric == "latency_guest_s" and rep.icount:
                name, metric = "guest-clock duration", rep.latency
            if direction not in directions:
                continue
            sub = part[part.metric == metric]
            vals = {m: g["value"].to_numpy(float) for m, g in sub.groupby("mechanism")}
            m = METRICS[metric]
            cells = []
            for mech in mechs:
                ok, n = shares.get((cond, k, label, mech), (0, 0))
                if n == 0:
                    cells.append("-")
                elif mech not in vals:
                    cells.append(f"- ({ok}/{n} ok)")
                else:
                    cells.append(f"{median_interval(vals[mech], m.unit)}, {ok}/{n} ok")
            if all(c == "-" for c in cells):
                continue
            r = len(rows)
            rows.append([f"{label}: {name} ({rep.cid(str(cond))}, {wl})", *cells])
            if m.better == "none" or len(vals) < 2:
                continue
            sign = 1 if m.better == "lower" else -1
            best = min(vals, key=lambda key: sign * float(np.median(vals[key])))
            best_of[r] = best
            for other in vals:
                if other == best:
                    continue
                shift, lo, hi, level = hodges_lehmann(vals[best], vals[other])
                effect = (
                    f"{fmt(shift, m.unit)} [{fmt(lo, m.unit)}, {fmt(hi, m.unit)}] "
                    f"{level:.0%}; delta {cliffs_delta(vals[best], vals[other]):+.2f}"
                )
                tests.append((r, best, other, effect, mann_whitney_p(vals[best], vals[other])))
    adjusted = holm([test[4] for test in tests])
    for r, best in best_of.items():
        ps = [adj for test, adj in zip(tests, adjusted, strict=True) if test[0] == r]
        if ps and max(ps) < ALPHA:
            col = 1 + mechs.index(best)
            rows[r][col] = f"**{rows[r][col]} ✓**"
    comparisons = [
        [rows[r][0], f"{best} vs {other}", effect, f"{p:.3g}", f"{adj:.3g}"]
        for (r, best, other, effect, p), adj in zip(tests, adjusted, strict=True)
    ]
    return rows, comparisons


def _verdict(rep: Report, mechs: list[str]) -> None:
    rows, comparisons = verdict_table(rep, mechs)
    rep.add(
        "## Verdict",
        "",
        f"Per condition (see Conditions) and step: {INTERVAL}; then how many of that "
        "mechanism's resizes of this step the figure stands for. ✓ marks a mechanism that "
        f"beats every other one after Holm's correction over the {len(comparisons)} "
        "comparisons of this table (with n repeats per cell, Mann-Whitney cannot go below "
        "p = 2/C(2n, n), e.g. 0.0079 for n = 5, so few repeats rarely yield a marked winner).",
        "",
    )
    rep.add(*md_table(["criterion", *mechs], rows))
    if (rep.table.observer == "minimal").any():
        rep.add(
            "Conditions watched by the `minimal` control arm have no guest-visible latency "
            "(the guest is not looked at while the request is in flight): their latency "
            "rows show `-`, and their host-side latency is set against the watched twin's "
            'in "What watching cost".',
            "",
        )
    if rep.icount:
        rep.add(ICOUNT_NOTE, "")
    rep.add(
        "Grow beyond boot RAM: the balloon can only deflate back to boot RAM (a grow past "
        "it is reported `unsupported`); DIMM and virtio-mem grow up to maxmem.",
        "",
    )
    if comparisons:
        rep.add(
            "Behind the marks: the best median of each row against every other mechanism. "
            "Shift = Hodges-Lehmann estimate of best minus other with its exact "
            "distribution-free interval and that interval's real level; delta = Cliff's "
            "delta (-1: every value of the best below every value of the other); "
            "Mann-Whitney p, and p after Holm over the whole table.",
            "",
        )
        rep.add(
            *md_table(["criterion", "comparison", "shift; delta", "p", "p (Holm)"], comparisons)
        )


# -- the questions ----------------------------------------------------------------------------


def _by_mech(rep: Report, metric: str, **where: object) -> str:
    """'mech median (k/n ok); ...' for one metric, grouped within conditions and steps."""
    good, t = rep.good, rep.table
    part, base = good[good.metric == metric], t[t.metric == "succeeded"]
    for k, v in where.items():
        part, base = part[part[k] == v], base[base[k] == v]
    if part.empty:
        return "no data"
    unit = METRICS[metric].unit
    out = []
    keys = ["condition", "step_index", "step"]
    shares = _shares(base, [*keys, "mechanism"])
    for (cond, k, step), g in part.groupby(keys, sort=False):
        inner = []
        for mech in F.ordered(g.mechanism):
            vals = g[g.mechanism == mech]["value"]
            ok, n = shares.get((cond, k, step, mech), (len(vals), len(vals)))
            inner.append(f"{mech} {fmt(float(vals.median()), unit)} ({ok}/{n} ok)")
        out.append(f"{step}, {rep.cid(str(cond))}: " + ", ".join(inner))
    return "; ".join(out)


def _q_watermarks(rep: Report, mechs: list[str]) -> None:
    rep.add("### 1. Do zone watermarks move?", "")
    rep.figure(
        lambda p: F.watermarks(rep.cells, p, rep.cond_of), "watermarks.png", "watermark change"
    )
    moved: dict[tuple[str, int, str, str], list[bool]] = {}
    for cell, k, step in resize_steps(rep.cells):
        if step.cost.guest is not None:
            key = (condition_of(cell), k, step.step, cell.mechanism.label)
            moved.setdefault(key, []).append(any(step.cost.guest.watermarks_moved.values()))
    shares = _shares(rep.table, ["condition", "step_index", "mechanism"])
    if moved:
        parts = [
            f"{step} ({rep.cid(cond)}) {mech} {np.mean(v):.0%} "
            f"({shares.get((cond, k, mech), (len(v), len(v)))[0]}/"
            f"{shares.get((cond, k, mech), (len(v), len(v)))[1]} ok)"
            for (cond, k, step, mech), v in moved.items()
        ]
        rep.add(
            "Share of ok resizes after which any zone's min/low/high watermark differed: "
            + "; ".join(parts)
            + ". Median change of the summed high watermarks: "
            + _by_mech(rep, "watermark_high_change_kib")
            + ".",
            "",
        )


def _q_swap(rep: Report, mechs: list[str]) -> None:
    rep.add("### 2. Swap or migration when shrinking?", "")
    good, t = rep.good, rep.table
    shares = _shares(t, ["condition", "step_index", "mechanism"])
    rows = []
    shrinks = t[(t.direction == "shrink") & (t.metric == "succeeded")]
    for (cond, k, step), _ in shrinks.groupby(["condition", "step_index", "step"], sort=False):
        part = good[(good.condition == cond) & (good.step_index == k)]
        for mech in mechs:
            ok, n = shares.get((cond, k, mech), (0, 0))
            if n == 0:
                continue

            def med(metric: str, p: pd.DataFrame = part, m: str = mech) -> str:
                v = p[(p.mechanism == m) & (p.metric == metric)]["value"]
                return fmt(float(v.median()), METRICS[metric].unit) if len(v) else "-"

            rows.append([
                f"{step} ({rep.cid(str(cond))})", mech, f"{ok}/{n}", med(rep.latency),
                med("swap_out_pages"), med("pages_migrated"), med("compaction_stalls"),
                med("oom_kills"),
            ])  # fmt: skip
    rep.add(*md_table(["step", "mechanism", "ok", "latency", "swap-out pages", "pages migrated",
                       "compaction stalls", "OOM kills"], rows))  # fmt: skip
    rep.figure(
        lambda p: F.time_series(rep.cells, rep.store.load_series, p, rep.cond_of),
        "timeseries.png",
        "time series of one shrink per mechanism",
    )
    rep.add(
        "Medians over ok shrinks of ok cells (`ok` = how many of all); swap-out and "
        "migrations from the guest's /proc/vmstat over the step, the time series from the "
        "in-guest sampler and the host's smaps_rollup.",
        "",
    )


def _q_host(rep: Report) -> None:
    rep.add("### 3. Does a mechanism give memory back to the host, and fragment it?", "")
    rep.figure(lambda p: F.rss_vs_requested(rep.good, p), "rss_reclaimed.png", "RSS reclaimed")
    rep.add(
        "Host RSS reclaimed per MiB removed: "
        + _by_mech(rep, "rss_reclaimed_share", direction="shrink")
        + ". QEMU AnonHugePages change on shrink (MiB): "
        + _by_mech(rep, "anon_huge_change_mib", direction="shrink")
        + ". Memory the guest never touched was never in RSS, so idle shrinks reclaim "
        "little; scenarios with `touch` (the `study` suite's HyperAlloc experiment) measure "
        "reclaim of used memory.",
        "",
    )


def _q_granularity(rep: Report, mechs: list[str]) -> None:
    rep.add("### 4. Granularity", "")
    grains: dict[str, set[str]] = {}
    for cell in rep.cells:
        m = cell.mechanism
        unit = m.block_size or m.dimm_size
        grains.setdefault(m.label, set()).add(
            "4 KiB pages (balloon)" if unit is None else f"{unit >> 20} MiB blocks"
        )
    rep.add(
        "Unit each mechanism resized in: "
        + "; ".join(f"{m}: {', '.join(sorted(grains[m]))}" for m in mechs if m in grains)
        + ". Guest MemTotal change minus the request (MiB, median): "
        + _by_mech(rep, "memtotal_error_mib")
        + ".",
        "",
    )


def _q_latency(rep: Report, mechs: list[str]) -> None:
    rep.add("### 5. Latency as a function of size (plug is asynchronous)", "")
    rep.figure(
        lambda p: F.latency_vs_size(rep.good, p, rep.direction_shares(), rep.latency),
        "latency.png",
        "latency vs size",
    )
    rep.add(
        "Host-side (QMP state polled) versus guest-visible completion of grows, median: "
        "host " + _by_mech(rep, "latency_host_s", direction="grow")
        + "; guest " + _by_mech(rep, rep.latency, direction="grow") + ".",
        "",
    )  # fmt: skip
    variants = {m for m in mechs if m.startswith("virtio-mem/")}
    rep.add("### 6. Sub-Block Mode versus Big Block Mode", "")
    if len(variants) == 2:
        rep.add("Shrink latency: " + _by_mech(rep, rep.latency, direction="shrink") + ".", "")
    else:
        rep.add(
            "Not measured in this run (one virtio-mem variant); the `study` suite runs both.", ""
        )


def _q_failures(rep: Report, mechs: list[str]) -> None:
    rep.add("### 7. Failure and partial success", "")
    counts = outcome_counts(rep.table, ["cond", "mechanism", "step"])
    cols = ["cond", "mechanism", "step", "n", "ok", "partial", "refused", "timeout",
            "unsupported", "error", "skipped", "cell_failed"]  # fmt: skip
    rows = [[str(getattr(r, c)) for c in cols] for r in counts.itertuples(index=False)]
    rep.add(*md_table(["condition", "mechanism", "step", "n", "ok", "partial", "refused", "timeout",
                       "unsupported", "error", "skipped", "cell failed"], rows))  # fmt: skip
    rep.add(
        "`skipped`: not attempted, because an earlier step of the cell left the guest off "
        "its planned size; `cell failed`: the cell stopped (its steps count here, reached "
        "or not).",
        "",
    )
    messages = sorted({
        f"{c.mechanism.label} {s.step}: {s.outcome}: {s.message}"
        for c in rep.cells for _, s in c.resizes() if s.outcome != "ok" and s.message
    })  # fmt: skip
    if messages:
        rep.add("Why resizes were not ok:", "", *(f"- {m}" for m in messages[:30]), "")


def _steps_of(rep: Report, kind: type) -> list[tuple[CellRecord, object]]:
    return [(c, s) for c in rep.cells for s in c.steps if isinstance(s, kind)]


def _q_other_steps(rep: Report) -> None:
    def section(kind: type, title: str, name: str, describe: Callable[[object], str]) -> None:
        rep.add(title, "")
        found = _steps_of(rep, kind)
        planned = [c for c in rep.cells if any(w.split()[0] == name for w in c.condition.steps)]
        if not found and not planned:
            rep.add(f"Not measured in this run (no `{name}` step); the `study` suite has them.",
                    "")  # fmt: skip
            return
        good = [(c, s) for c, s in found if c.ok]
        rep.add(*(f"- `{c.cell}` ({c.mechanism.label}, {rep.cid(condition_of(c))}): "
                  f"{describe(s)}" for c, s in good))  # fmt: skip
        failed = sorted(c.cell for c in planned if not c.ok)
        rep.add(f"{len(good)} of {len(planned)} cells with a `{name}` step completed"
                + (f"; not shown, their cells failed: {', '.join(failed)}" if failed else "")
                + ".", "")  # fmt: skip

    def oom(s: object) -> str:
        assert isinstance(s, OomStep)
        return f"OOM kills {s.oom_kills}, balloon deflated {s.balloon_deflated_bytes >> 20} MiB"

    def reboot(s: object) -> str:
        assert isinstance(s, RebootStep)
        return (f"host-side memory {s.host_before_bytes >> 20} -> {s.host_after_bytes >> 20} "
                f"MiB, MemTotal {list(s.guest_memtotal_kb)} KiB")  # fmt: skip

    def free(s: object) -> str:
        assert isinstance(s, FreeStep)
        return f"RSS released {s.rss_released_bytes >> 20} MiB in {s.seconds:g} s"

    section(OomStep, "### 8. Guest OOM: does the host hear of it?", "oom", oom)
    section(RebootStep, "### 9. What a reboot does", "reboot", reboot)
    section(FreeStep, "### 10. Free page reporting", "free", free)
    rep.add(
        "### 11. Live migration",
        "",
        "Not measured: the harness has no migration scenario yet (the notes put it later).",
        "",
    )


def _q_kernel_and_workload(rep: Report) -> None:
    t = rep.table
    rep.add("### 12. Guest kernel settings", "")
    if t.kernel_args.nunique() > 1:
        rep.add(
            "Shrink latency by kernel command line (within each condition otherwise equal): "
            + _by_mech(rep, rep.latency, direction="shrink")
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
    good = rep.good
    shrink = good[(good.metric == rep.latency) & (good.direction == "shrink")]
    shares = _shares(rep.table, ["condition", "step_index", "mechanism"])
    for (cond, k, step), part in shrink.groupby(["condition", "step_index", "step"], sort=False):
        med = part.groupby("mechanism")["value"].median()
        if len(med) > 1:
            best = str(med.idxmin())
            counts = ", ".join(
                f"{m} {shares[(cond, k, m)][0]}/{shares[(cond, k, m)][1]} ok"
                for m in F.ordered(t[(t.condition == cond) & (t.step_index == k)].mechanism)
            )
            rep.add(
                f"- {step}, {rep.cid(str(cond))} ({part.workload_label.iloc[0]}): fastest "
                f"median of the ok shrinks {best} ({fmt(float(med[best]), 's')}; {counts}); "
                "significance in the verdict."
            )
    rep.add("")
    rep.figure(
        lambda p: F.fragmentation(rep.cells, p, rep.cond_of), "fragmentation.png", "fragmentation"
    )
    rep.figure(
        lambda p: F.workload_impact(rep.good, p),
        "impact.png",
        "workload impact (the `impact` workload's throughput and stalls)",
    )


# -- published results ------------------------------------------------------------------------

PAPER = "hyperalloc"


def _published_one(rep: Report, cond: str, mine: pd.DataFrame, good: pd.DataFrame) -> None:
    c = next(cell.condition for cell in rep.cells
             if cell.reproduces == PAPER and condition_of(cell) == cond)  # fmt: skip
    rep.add(
        f"Scaled to this host ({rep.cid(str(cond))}): a {c.memory / 2**30:g} GiB guest "
        f"instead of 20 GiB, {c.touch / c.memory:.0%} of it touched and freed (HyperAlloc: "
        "95%), then " + ", ".join(c.steps) + f"; {c.accel} with -cpu {c.cpu_model} instead "
        "of KVM.",
        "",
    )
    sub = good[(good.reproduces == PAPER) & (good.condition == cond)
               & (good.metric == rep.latency)]  # fmt: skip
    shares = _shares(mine, ["step_index", "mechanism"])
    for (k, step), part in sub.groupby(["step_index", "step"], sort=False):
        vals = {m: np.log(g["value"].to_numpy(float)) for m, g in part.groupby("mechanism")}
        counts = ", ".join(f"{m} {shares[(k, m)][0]}/{shares[(k, m)][1]} ok"
                           for m in sorted(vals))  # fmt: skip
        vm = next((m for m in vals if m.startswith("virtio-mem")), None)
        if vm is None or "balloon" not in vals or min(len(v) for v in vals.values()) < 2:
            rep.add(f"- {step}: not enough ok resizes of both mechanisms ({counts}).")
            continue
        shift, lo, hi, level = hodges_lehmann(vals["balloon"], vals[vm])
        if level < CONFIDENCE:
            says = (
                f"no direction stated: too few ok resizes for a {CONFIDENCE:.0%} interval "
                f"(this one is {level:.0%})"
            )
        elif lo > 0:
            says = "the same direction as the papers (virtio-mem faster)"
        elif hi < 0:
            says = "the opposite direction (the balloon faster)"
        else:
            says = "no direction: the interval holds 1"
        rep.add(
            f"- {step}: balloon / {vm} latency = {np.exp(shift):.2f}x (Hodges-Lehmann on "
            f"log latencies, exact interval {np.exp(lo):.2f}-{np.exp(hi):.2f} at {level:.0%}; "
            f"{counts}): {says}."
        )


def _published(rep: Report) -> None:
    rep.add("## Compared with published results", "")
    rep.add(
        "HyperAlloc (EuroSys'25, KVM, QEMU 8.2, Linux 6.1) touched 19 GiB of a 20 GiB guest, "
        "freed it and shrank the guest to 2 GiB: virtio-mem about 0.58 s, the balloon about "
        "21 s (balloon / virtio-mem = 36x); growing back took about 0.2 s and 8.5 s. Squeezy "
        "(EuroSys'26, Cloud Hypervisor) found virtio-mem unplug 2.34x faster than the "
        "balloon on average. Only a scenario that runs that experiment is compared with it "
        '(`reproduces = "hyperalloc"` in the suite, part of `study`).',
        "",
    )
    t, good = rep.table, rep.good
    mine = t[t.reproduces == PAPER] if "reproduces" in t else t.iloc[0:0]
    if mine.empty:
        rep.add("This run holds no such scenario: no comparison is made.", "")
        return
    for cond, part_of in mine.groupby("condition", sort=False):  # one per host fingerprint
        _published_one(rep, str(cond), part_of, good)
    rep.add("", "Magnitudes are not comparable across accelerators and scales; directions are.", "")


# -- appendix ---------------------------------------------------------------------------------


def _observer_cost(rep: Report, mechs: list[str]) -> None:
    """What watching cost, from every run: the sampler's CPU while the request was in
    flight and the bound on the guest-visible stamp; with a control arm (`control_arm`,
    the same condition watched by the minimal observer) also its effect on host latency."""
    good, t = rep.good, rep.table
    rep.add(
        "## What watching cost",
        "",
        "The in-guest sampler's CPU from the request to the host-side outcome, as a share of "
        f"one vCPU (what the resize competed with), and how late the guest-visible completion "
        f"may be stamped; {INTERVAL}.",
        "",
    )
    shares = _shares(t, ["condition", "step_index", "step", "mechanism"])
    rows = []
    keys = ["condition", "step_index", "step", "mechanism"]
    part = good[good.metric.isin(["sampler_request_share", "guest_bound_s"])]
    for (cond, k, step, mech), g in part.groupby(keys, sort=False):
        share = g[g.metric == "sampler_request_share"]["value"].to_numpy(float)
        bound = g[g.metric == "guest_bound_s"]["value"].to_numpy(float)
        ok, n = shares.get((cond, k, step, mech), (0, 0))
        observer = t[t.condition == cond].observer.iloc[0]
        rows.append([rep.cid(str(cond)), observer, str(mech), str(step),
                     median_interval(share, "share"), fmt(float(np.median(bound)), "s")
                     if len(bound) else "-", f"{ok}/{n}"])  # fmt: skip
    if rows:
        rep.add(*md_table(["condition", "observer", "mechanism", "step",
                           "sampler CPU during the request", "stamp late by at most (median)",
                           "ok"], rows))  # fmt: skip
    else:
        rep.add("No resize in this run recorded the sampler's CPU (results format 1 did not).", "")
    rep.add(*_control_arm(rep))


def _control_arm(rep: Report) -> list[str]:
    """Host-side latency watched as usual over the same condition watched minimally: the
    ratio of medians and the Hodges-Lehmann ratio (on logs) with its exact interval."""
    good = rep.good
    lat = good[good.metric == "latency_host_s"].copy()
    if "minimal" not in set(lat.observer) or len(set(lat.observer)) < 2:
        return [
            "This run has no control arm, so the observer's effect on latency is not "
            "measured here; `dynamem run --control-arm` interleaves a twin of every scenario "
            "watched by the minimal observer (no guest-visible latency) and the report then "
            "puts the ratio here.",
            "",
        ]
    # The condition without its observer: the pairing key of an arm and its control.
    lat["pair"] = (
        lat[[c for c in CONDITION_COLUMNS if c != "observer"]].astype(str).agg(" | ".join, axis=1)
    )
    rows = []
    for (_, _, step, mech), g in lat.groupby(["pair", "step_index", "step", "mechanism"]):
        control = g[g.observer == "minimal"]["value"].to_numpy(float)
        for observer, arm in g[g.observer != "minimal"].groupby("observer"):
            watched = arm["value"].to_numpy(float)
            if len(control) < 2 or len(watched) < 2:
                continue
            shift, lo, hi, level = hodges_lehmann(np.log(watched), np.log(control))
            ratio = float(np.median(watched) / np.median(control))
            rows.append([
                rep.cid(str(arm.condition.iloc[0])), str(mech), str(step), str(observer),
                f"{len(watched)} / {len(control)}", f"{ratio:.2f}",
                f"{np.exp(shift):.2f} [{np.exp(lo):.2f}, {np.exp(hi):.2f}] {level:.0%}",
                f"{mann_whitney_p(watched, control):.3g}",
            ])  # fmt: skip
    if not rows:
        return ["The control arm has fewer than two ok resizes per step: no ratio.", ""]
    return [
        "Host-side latency watched by the observer over the same condition watched by the "
        "minimal control arm (interleaved cells): ratio of medians, and the Hodges-Lehmann "
        "ratio with its exact interval and real level. 1.00 means watching did not slow the "
        "resize; an interval that excludes 1 means it did.",
        "",
        *md_table(["condition", "mechanism", "step", "observer", "n (arm / control)",
                   "ratio of medians", "HL ratio [interval] level", "Mann-Whitney p"], rows),
    ]  # fmt: skip


def _appendix(rep: Report) -> None:
    good = rep.good
    rep.add("## Appendix: every metric", "")
    rep.add(f"Over ok steps of ok cells; {INTERVAL}.", "")
    if good.empty:
        rep.add("No ok resize in this run.", "")
        return
    keys = ["scenario", "host", "step_index", "step", "metric"]  # hosts never pooled
    codes, groups = pd.factorize(pd.MultiIndex.from_frame(good[keys]))
    values = good["value"].to_numpy(float)
    g = group_stats(values, codes, len(groups), confidence=CONFIDENCE)
    outliers = np.bincount(codes, weights=mad_outliers(values, codes), minlength=len(groups))
    shares = _shares(rep.table, ["scenario", "host", "step_index"])
    hosts = {h: f" (H{k})" for k, h in enumerate(sorted(set(good.host)), 1)}
    rows = []
    for k, (name, host, index, step, metric) in enumerate(groups):
        unit = METRICS[metric].unit
        ok, n = shares.get((name, host, index), (0, 0))
        scenario = name + (hosts[host] if len(hosts) > 1 else "")
        interval = (f"{fmt(g.ci_low[k], unit)} - {fmt(g.ci_high[k], unit)} ({g.ci_level[k]:.0%})"
                    if g.n[k] > 1 else "-")  # fmt: skip
        rows.append([
            scenario, step, f"{METRICS[metric].label} ({unit})", f"{g.n[k]} ({ok}/{n} ok)",
            fmt(g.median[k], unit), fmt(g.iqr[k], unit), fmt(g.mean[k], unit), interval,
            str(int(outliers[k])),
        ])  # fmt: skip
    rep.add(*md_table(["scenario", "step", "metric", "n", "median", "IQR", "mean",
                       "interval of the median (level)", "MAD outliers"], rows))  # fmt: skip


def build_report(store: RunStore, out: Path) -> tuple[Path, Path]:
    """Write report.md, index.html and the figures into `out`; returns (md, html)."""
    from dynamem.cases import is_case_run

    if is_case_run(store):
        from .cases import build_case_report

        return build_case_report(store, out)
    out.mkdir(parents=True, exist_ok=True)
    cells, problems = store.load_all()
    table = tidy(cells, store.run.run_id)
    rep = Report(store, cells, problems, table, out)
    mechs = F.ordered(table.mechanism) if not table.empty else []
    run = store.run
    rep.add(
        f"# dynamem report: {run.run_id}",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC from "
        f"`{store.directory}`.",
        "",
    )
    _setup(rep)
    if table.empty:
        rep.add("No measured resize in this run: nothing to analyse.", "")
    else:
        _conditions(rep)
        rep.table["cond"] = rep.table.condition.map(rep.conditions) + ": " + table.workload_label
        _verdict(rep, mechs)
        rep.add("## The questions", "")
        _q_watermarks(rep, mechs)
        _q_swap(rep, mechs)
        _q_host(rep)
        _q_granularity(rep, mechs)
        _q_latency(rep, mechs)
        _q_failures(rep, mechs)
        _q_other_steps(rep)
        _q_kernel_and_workload(rep)
        _published(rep)
        _observer_cost(rep, mechs)
        _appendix(rep)
    return write_pages(out, rep.lines, run.run_id)


def write_pages(out: Path, lines: list[str], title: str) -> tuple[Path, Path]:
    """report.md from `lines`, and index.html rendered from it; returns (md, html)."""
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    body = markdown.markdown(md_path.read_text(), extensions=["tables"])
    html_path = out / "index.html"
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    return md_path, html_path


CSS = """
body { font-family: system-ui, sans-serif; max-width: 74rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2rem; }
"""

__all__ = ["MiB", "build_report", "fmt", "median_interval", "verdict_table"]
