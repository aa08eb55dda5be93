"""The report's figures: one function per question, each readable on its own.

Every figure uses the same colour per mechanism (`PALETTE`), units on every axis, and
statistics from `stats` (the exact order-statistic interval, as in the tables beside
it). Figures show only ok steps of ok cells: the report passes `metrics.usable` rows, and
the figures drawn from records select the same with `metrics.resize_steps`. Series are
grouped by condition (`cond`, e.g. "C2: stress 614M"), never pooled across conditions.
A function returns None when the run holds no data for its figure; the report says so.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: reports are built on headless CI hosts

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from dynamem.record import CellRecord  # noqa: E402

from .metrics import FRAGMENTATION_ZONE, resize_steps  # noqa: E402
from .stats import group_stats  # noqa: E402

# Fixed colours, so a mechanism looks the same in every figure and every report.
MECHANISMS = [
    "balloon", "dimm", "virtio-mem/sbm", "virtio-mem/bbm",
    "balloon/doo", "balloon/fpr", "balloon/doo+fpr",
]  # fmt: skip
_COLOURS = sns.color_palette("colorblind", 10)
PALETTE = dict(zip(MECHANISMS, _COLOURS, strict=False))


def colours(labels: Any) -> dict[str, Any]:
    """PALETTE, extended (deterministically) to labels it does not know."""
    unknown = sorted(set(labels) - set(PALETTE))
    extra = {m: _COLOURS[(len(MECHANISMS) + i) % len(_COLOURS)] for i, m in enumerate(unknown)}
    return {**PALETTE, **extra}


MARKERS = {"idle": "o", "stress": "s", "pagecache": "^", "impact": "D"}
DPI = 110

LoadSeries = Callable[[str, int], dict[str, np.ndarray]]
CondOf = Callable[[CellRecord], str]  # a cell's condition label, e.g. "C2: stress 614M"
Shares = dict[tuple[str, str, str], tuple[int, int]]  # (mechanism, cond, direction) -> ok, n


def _style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # keeps a legend below the panels
    plt.close(fig)
    return path


def ordered(mechanisms: Any) -> list[str]:
    present = list(dict.fromkeys(mechanisms))
    return [m for m in MECHANISMS if m in present] + [m for m in present if m not in MECHANISMS]


def summarize(t: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Median and the exact order-statistic interval (with its level) per group."""
    if t.empty:
        return pd.DataFrame(columns=[*by, "n", "median", "ci_low", "ci_high", "level"])
    codes, keys = pd.factorize(pd.MultiIndex.from_frame(t[by]))
    g = group_stats(t["value"].to_numpy(float), codes, len(keys))
    out = pd.DataFrame(list(keys), columns=by)
    out["n"], out["median"], out["ci_low"], out["ci_high"] = g.n, g.median, g.ci_low, g.ci_high
    out["level"] = g.ci_level
    return out


def _share(shares: Shares | None, mech: str, cond: str, direction: str) -> str:
    if not shares or (mech, cond, direction) not in shares:
        return ""
    ok, n = shares[(mech, cond, direction)]
    return f" ({ok}/{n} ok)"


def _level_note(s: pd.DataFrame) -> str:
    levels = sorted({round(float(x) * 100) for x, n in zip(s.level, s.n, strict=True) if n > 1})
    return "interval levels " + ", ".join(f"{x}%" for x in levels) if levels else "n = 1"


def latency_vs_size(
    t: pd.DataFrame, path: Path, shares: Shares | None = None, metric: str = "latency_guest_s"
) -> Path | None:
    data = t[t.metric == metric]
    if data.empty:
        return None
    _style()
    s = summarize(data, ["direction", "mechanism", "cond", "size_mib"])
    directions = [d for d in ("shrink", "grow") if d in set(s.direction)]
    fig, axes = plt.subplots(1, len(directions), figsize=(5.2 * len(directions), 4.2))
    axes = np.atleast_1d(axes)
    mechs = ordered(s.mechanism)
    for ax, direction in zip(axes, directions, strict=True):
        part = s[s.direction == direction]
        for i, mech in enumerate(mechs):
            # Spread mechanisms a little along x so equal sizes do not hide each other.
            nudge = 1.0 + 0.06 * (i - (len(mechs) - 1) / 2)
            for cond, rows in part[part.mechanism == mech].groupby("cond"):
                rows = rows.sort_values("size_mib")
                err = np.vstack([rows["median"] - rows.ci_low, rows.ci_high - rows["median"]])
                ax.errorbar(
                    rows.size_mib * nudge,
                    rows["median"],
                    yerr=np.clip(err, 0, None),
                    color=colours([mech])[mech],
                    marker=MARKERS.get(str(cond).split(": ")[-1].split()[0], "o"),
                    linestyle="-" if len(rows) > 1 else "none",
                    capsize=3,
                    label=f"{mech}, {cond}" + _share(shares, mech, str(cond), direction),
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(
            {
                "latency_guest_driver_s": f"{direction}: driver entry to completion, guest clock",
                "latency_guest_clock_s": f"{direction}: guest-side duration, guest clock",
            }.get(metric, f"{direction}: request to guest-visible completion")
        )
        ax.set_xlabel("size of the step (MiB, log)")
        ax.set_ylabel(f"latency (s, log); median and interval\n({_level_note(part)})")
        sizes = sorted(set(part.size_mib))
        ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
    # One legend below the panels: inside one it hid points (a stress grow behind it).
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=min(3, len(labels)),
               bbox_to_anchor=(0.5, 0.0), frameon=False)  # fmt: skip
    return _save(fig, path)


def representative_cells(
    cells: list[CellRecord], cond_of: CondOf
) -> tuple[str, dict[str, tuple[CellRecord, int]]]:
    """One condition (the one with a workload, and the most mechanisms, first) and, per
    mechanism, its ok shrink whose latency is the median in that condition."""
    candidates: dict[str, dict[str, list[tuple[float, CellRecord, int]]]] = {}
    for cell, k, step in resize_steps(cells):
        if step.direction == "shrink":
            latency = step.guest_latency_s or step.host_latency_s or 0.0
            by_mech = candidates.setdefault(cond_of(cell), {})
            by_mech.setdefault(cell.mechanism.label, []).append((latency, cell, k))
    if not candidates:
        return "", {}
    cond = max(
        candidates,
        key=lambda c: (len(candidates[c]), "idle" not in c, -sorted(candidates).index(c)),
    )
    chosen: dict[str, tuple[CellRecord, int]] = {}
    for mech, items in candidates[cond].items():
        items.sort(key=lambda x: x[0])
        _, cell, k = items[(len(items) - 1) // 2]
        chosen[mech] = (cell, k)
    return cond, chosen


def time_series(
    cells: list[CellRecord], load: LoadSeries, path: Path, cond_of: CondOf
) -> Path | None:
    cond, chosen = representative_cells(cells, cond_of)
    if not chosen:
        return None
    _style()
    panels: list[tuple[str, str, Callable[[dict[str, np.ndarray]], Any]]] = [
        ("guest MemTotal\n(MiB)", "full_t_ns", lambda s: s["full_MemTotal"] / 1024),
        ("host: QEMU RSS\n(MiB)", "host_t_ns", lambda s: s["host_rss_kb"] / 1024),
        (
            "guest swap-out\n(pages since request)",
            "full_t_ns",
            lambda s: s["full_pswpout"] - s["full_pswpout"][0],
        ),
        (
            "pages migrated\n(since request)",
            "full_t_ns",
            lambda s: s["full_pgmigrate_success"] - s["full_pgmigrate_success"][0],
        ),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 9.5), sharex=True)
    titles = []
    for mech in ordered(chosen):
        cell, k = chosen[mech]
        try:
            series = load(cell.cell, k)
        except (OSError, KeyError):
            continue
        t0 = int(series["t_request_ns"])
        for ax, (label, tkey, value) in zip(axes, panels, strict=True):
            if tkey not in series or len(series[tkey]) == 0:
                continue
            ax.plot(
                (series[tkey] - t0) / 1e9, value(series), color=colours([mech])[mech], label=mech
            )
            ax.set_ylabel(label, fontsize=9)
        titles.append(f"{mech}: {cell.scenario} r{cell.repeat}")
    if not titles:
        plt.close(fig)
        return None
    for ax in axes:
        ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_title(
        f"one ok shrink per mechanism in {cond} (the median-latency repeat)\n" + "; ".join(titles),
        fontsize=9,
    )
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("time since the request (s)")
    return _save(fig, path)


def rss_vs_requested(t: pd.DataFrame, path: Path) -> Path | None:
    data = t[t.metric == "rss_reclaimed_mib"]
    if data.empty:
        return None
    _style()
    conds = sorted(set(data.cond))
    fig, axes = plt.subplots(
        1, len(conds), figsize=(5.2 * len(conds), 4.6), squeeze=False, sharey=True
    )
    for ax, cond in zip(axes[0], conds, strict=True):
        part = data[data.cond == cond]
        sns.stripplot(
            data=part,
            x="size_mib",
            y="value",
            hue="mechanism",
            hue_order=ordered(part.mechanism),
            palette=colours(part.mechanism),
            dodge=True,
            jitter=0.15,
            ax=ax,
            marker="o",
            size=6,
        )
        sizes = sorted(set(part.size_mib))
        for i, size in enumerate(sizes):
            ax.hlines(size, i - 0.45, i + 0.45, color="black", linewidth=1.2, linestyle="--")
        ax.set_xticks(range(len(sizes)), [f"{s:g}" for s in sizes])
        ax.set_xlabel("memory removed (MiB)\ndashed line = all of it returned to the host")
        ax.set_ylabel("QEMU RSS reclaimed (MiB)")
        ax.set_title(str(cond), fontsize=9)
        ax.legend(fontsize=8, title=None)
    fig.suptitle("host memory given back by each ok shrink")
    return _save(fig, path)


def _frag_rows(cells: list[CellRecord], cond_of: CondOf) -> pd.DataFrame:
    rows = []
    for cell, _, step in resize_steps(cells):
        g = step.cost.guest
        if g is None or step.direction != "shrink":
            continue
        zone = next((z for z in g.fragmentation if z.endswith("/" + FRAGMENTATION_ZONE)), None)
        if zone is None:
            continue
        frag = g.fragmentation[zone]
        label = cond_of(cell)
        for when, values in (("before", frag.unusable_milli_before),
                             ("after", frag.unusable_milli_after)):  # fmt: skip
            for order, v in enumerate(values or []):
                rows.append((cell.mechanism.label, label, zone, when, order, v / 1000))
    return pd.DataFrame(rows, columns=["mechanism", "workload", "zone", "when", "order", "index"])


def fragmentation(cells: list[CellRecord], path: Path, cond_of: CondOf) -> Path | None:
    rows = _frag_rows(cells, cond_of)
    if rows.empty:
        return None
    _style()
    mechs = ordered(rows.mechanism)
    workloads = sorted(set(rows.workload))
    fig, axes = plt.subplots(
        len(workloads),
        len(mechs),
        figsize=(3.4 * len(mechs), 3.0 * len(workloads)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for r, workload in enumerate(workloads):
        for c, mech in enumerate(mechs):
            ax = axes[r][c]
            part = rows[(rows.mechanism == mech) & (rows.workload == workload)]
            med = part.groupby(["when", "order"])["index"].median().reset_index()
            for when, style in (("before", "--"), ("after", "-")):
                line = med[med.when == when]
                ax.plot(line.order, line["index"], style, color=colours([mech])[mech], label=when)
            ax.set_title(f"{mech}, {workload}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            if r == len(workloads) - 1:
                ax.set_xlabel("allocation order (9 = 2 MiB THP)")
            if c == 0:
                ax.set_ylabel("unusable free space index")
            ax.axvline(9, color="grey", linewidth=0.6, linestyle=":")
    axes[0][0].legend(fontsize=8, title="around the shrink")
    fig.suptitle(
        f"guest fragmentation of the {FRAGMENTATION_ZONE} zone before and after a shrink (median)"
    )
    return _save(fig, path)


def _watermark_rows(cells: list[CellRecord], cond_of: CondOf) -> pd.DataFrame:
    rows = []
    for cell, _, step in resize_steps(cells):
        g = step.cost.guest
        for zone, z in (g.watermarks if g else {}).items():
            for level in ("min", "low", "high"):
                before, after = getattr(z, level)
                change = (after - before) * 4
                rows.append((cell.mechanism.label, f"{step.step}, {cond_of(cell)}",
                             zone.split("/")[-1], level, change))  # fmt: skip
    return pd.DataFrame(rows, columns=["mechanism", "direction", "zone", "level", "change_kib"])


def watermarks(cells: list[CellRecord], path: Path, cond_of: CondOf) -> Path | None:
    rows = _watermark_rows(cells, cond_of)
    if rows.empty:
        return None
    _style()
    data = rows[rows.level == "high"]
    directions = sorted(set(data.direction))  # each step of each condition: one panel
    cols = min(len(directions), 3)
    nrows = -(-len(directions) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), sharey=True, squeeze=False
    )
    for ax in axes.flat[len(directions) :]:
        ax.set_visible(False)
    for ax, direction in zip(axes.flat, directions, strict=False):
        sns.barplot(
            data=data[data.direction == direction],
            x="zone",
            y="change_kib",
            hue="mechanism",
            hue_order=ordered(data.mechanism),
            palette=colours(data.mechanism),
            estimator="median",
            errorbar=None,
            ax=ax,
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{direction}: high watermark change", fontsize=9)
        ax.set_xlabel("zone")
        ax.set_ylabel("high watermark change (KiB, median)")
        ax.legend(fontsize=8)
    return _save(fig, path)


def workload_impact(t: pd.DataFrame, path: Path) -> Path | None:
    data = t[t.metric.isin(["workload_slowdown", "workload_longest_stall_ms"])]
    if data.empty:
        return None
    _style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (metric, label) in zip(
        axes,
        [
            ("workload_slowdown", "throughput before / during the resize (x)"),
            ("workload_longest_stall_ms", "longest stall during the resize (ms)"),
        ],
        strict=True,
    ):
        s = summarize(data[data.metric == metric].assign(
            step=lambda d: d["step"] + "\n" + d["cond"]), ["step", "mechanism"])  # fmt: skip
        if s.empty:
            ax.set_visible(False)
            continue
        steps = list(dict.fromkeys(s.step))
        mechs = ordered(s.mechanism)
        for i, mech in enumerate(mechs):
            rows = s[s.mechanism == mech]
            x = np.array([steps.index(v) for v in rows.step]) + 0.12 * (i - (len(mechs) - 1) / 2)
            err = np.vstack([rows["median"] - rows.ci_low, rows.ci_high - rows["median"]])
            ax.errorbar(x, rows["median"], yerr=np.clip(err, 0, None), fmt="o", capsize=3,
                        color=colours([mech])[mech], label=mech)  # fmt: skip
        ax.set_xticks(range(len(steps)), steps)
        ax.set_ylabel(f"{label}\nmedian and interval ({_level_note(s)})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("what the workload felt (impact probe: pages touched per second)")
    return _save(fig, path)
