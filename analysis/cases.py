"""The case studies' part of the report: per-arm outcomes, figures, and the verdict.

Every number is computed from the arms' records and series (dynamem.caserecord). A failed
arm is listed with why and contributes nothing else; a phase killed by the OOM killer, a
move that was partial or refused, and a guest left under pressure with nothing to give it
are counted, never averaged away. Arms are compared only within one case study, whose
guests, budget, phases and guest configuration are equal by construction.
"""

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from dynamem.caserecord import CaseArm, load_arms, load_series
from dynamem.store import RunStore
from dynamem.units import format_size

from . import figures as F
from .stats import group_stats

CONFIDENCE = 0.95
LANE = 90  # MiB of the memory panel's y axis per guest's lane of busy phases
PAGE = 4096
ARM_ORDER = ["static", "balloon", "dimm", "virtio-mem"]


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def median_text(values: np.ndarray, unit: str = "s", scale: float = 1.0) -> str:
    """'median [low, high] level (n=k)' with the exact order-statistic interval."""
    values = np.asarray(values, dtype=np.float64) * scale
    if len(values) == 0:
        return "-"
    g = group_stats(values, np.zeros(len(values), dtype=np.int64), 1, confidence=CONFIDENCE)
    med = f"{float(g.median[0]):.2f} {unit}".strip()
    if len(values) < 2:
        return f"{med} (n=1, no interval)"
    lo, hi, level = float(g.ci_low[0]), float(g.ci_high[0]), float(g.ci_level[0])
    return f"{med} [{lo:.2f}, {hi:.2f}] {level:.0%} (n={len(values)})"


# -- per arm ---------------------------------------------------------------------------------


def reaction_times(arm: CaseArm, series: dict[str, np.ndarray]) -> tuple[np.ndarray, int, int]:
    """(seconds from the look that first saw a guest under pressure to the guest seeing
    memory arrive, for every episode served; episodes that ended without memory arriving;
    episodes whose grow moved memory that the guest was not seen to receive).

    An episode is a run of looks under pressure. Memory arrives with the first grow of
    that guest, decided in one of the episode's rounds, that moved something; its time is
    the guest-visible completion of that grow."""
    served, unserved, unseen = [], 0, 0
    for g in arm.guests:
        p = series.get(f"{g.name}_pressured")
        t = series.get(f"{g.name}_t_ns")
        if p is None or t is None or len(p) == 0:
            continue
        p = p.astype(bool)
        edges = np.flatnonzero(p & ~np.concatenate(([False], p[:-1])))
        falls = np.flatnonzero(~p)
        grows = [d for d in arm.decisions if d.guest == g.name and d.kind == "grow" and d.done > 0]
        for e in edges:
            later = falls[falls > e]
            end = int(later[0]) if len(later) else len(p)
            hits = [d for d in grows if e <= d.round < end]
            seen = [d.t_visible_ns for d in hits if d.t_visible_ns is not None]
            if seen:
                served.append((min(seen) - int(t[e])) / 1e9)
            elif hits:
                unseen += 1
            else:
                unserved += 1
    return np.array(served, dtype=np.float64), unserved, unseen


def longest_above(t: np.ndarray, values: np.ndarray, limit: float) -> float:
    """The longest stretch of `values` above `limit`, from the first sample above to the
    first one back under (to the last sample if it never came back: see `open_above`)."""
    above = values > limit
    if not above.any():
        return 0.0
    padded = np.concatenate(([False], above, [False])).astype(np.int8)
    starts = np.flatnonzero(np.diff(padded) == 1)
    stops = np.flatnonzero(np.diff(padded) == -1)  # index of the first sample back under
    ends_t = t[np.minimum(stops, len(t) - 1)]
    return float(np.max(ends_t - t[starts]) / 1e9)


def budget_check(arm: CaseArm, series: dict[str, np.ndarray]) -> dict[str, float]:
    """All guests' resident guest RAM against budget x rss_limit: its peak and longest
    stretch above, and whether it was still above at the last sample (open-ended); the
    same for QEMU's whole VmRSS, which also holds QEMU's own memory."""
    t = series.get("host_t_ns", np.zeros(0, dtype=np.int64))
    ram = series.get("host_ram_kb", np.zeros((0, 1), dtype=np.int64))
    vm = series.get("host_vmrss_kb", np.zeros((0, 1), dtype=np.int64))
    if len(t) == 0:
        return {"samples": 0}
    limit = arm.budget * arm.rss_limit
    total, total_vm = ram.sum(axis=1) * 1024, vm.sum(axis=1) * 1024
    return {
        "samples": float(len(t)),
        "period_s": float(np.median(np.diff(t)) / 1e9) if len(t) > 1 else 0.0,
        "peak": float(total.max()),
        "peak_vmrss": float(total_vm.max()),
        "longest_above_s": longest_above(t, total, limit),
        "open_above": float(total[-1] > limit),
        "vmrss_longest_above_s": longest_above(t, total_vm, limit),
    }


def budget_kept(arm: CaseArm, check: dict[str, float]) -> bool:
    """The issue's target: guest RAM above budget + 5% for no longer than one control
    interval, and not still above when sampling ended."""
    return bool(check.get("samples")) and (
        check["longest_above_s"] <= arm.interval_s and not check["open_above"]
    )


@dataclass
class ArmSummary:
    arm: CaseArm
    phases_done: int
    phases: int
    pages: int
    oom_kills: int | None  # None: not measured (a failed arm)
    psi_s: float | None
    swap_bytes: int | None
    moved: int  # bytes that arrived in guests (grows; each transfer counted once)
    moves: dict[str, int]
    starved: int  # rounds in which some guest under pressure had nothing to get
    reaction: np.ndarray
    unserved: int
    unseen: int
    budget: dict[str, float]
    rounds: np.ndarray  # seconds between consecutive control rounds' looks


def summarize(arm: CaseArm, series: dict[str, np.ndarray]) -> ArmSummary:
    busy = [p for g in arm.guests for p in g.phases if p.size]
    outcomes: dict[str, int] = {}
    for d in arm.decisions:
        if d.kind != "none":
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
    psi = [g.psi_some_s for g in arm.guests]
    reaction, unserved, unseen = reaction_times(arm, series)
    ooms = [g.oom_kills for g in arm.guests]
    swaps = [(g.swap_in_pages, g.swap_out_pages) for g in arm.guests]
    return ArmSummary(
        arm=arm,
        phases_done=sum(p.outcome == "completed" for p in busy),
        phases=len(busy),
        pages=sum(p.pages for p in busy),
        oom_kills=None if None in ooms else sum(x or 0 for x in ooms),
        psi_s=None if any(x is None for x in psi) else float(sum(x or 0 for x in psi)),
        swap_bytes=None
        if any(None in pair for pair in swaps)
        else sum((i or 0) + (o or 0) for i, o in swaps) * PAGE,
        moved=sum(d.done for d in arm.decisions if d.kind == "grow" and d.done > 0),
        moves=outcomes,
        starved=len({d.round for d in arm.decisions if d.kind == "none"}),
        reaction=reaction,
        unserved=unserved,
        unseen=unseen,
        budget=budget_check(arm, series),
        rounds=np.diff(series.get(f"{arm.guests[0].name}_t_ns", np.zeros(0)) / 1e9)
        if arm.guests
        else np.zeros(0),
    )


def work_vs_static(arm: CaseArm, static: CaseArm | None) -> np.ndarray:
    """Per busy phase: pages touched with this arm over pages in the same phase of the
    static baseline (1 = the same work; phases the baseline did no work in are left out)."""
    if static is None:
        return np.zeros(0)
    mine = np.array([p.pages for g in arm.guests for p in g.phases if p.size], dtype=np.float64)
    base = np.array([p.pages for g in static.guests for p in g.phases if p.size], dtype=np.float64)
    if len(mine) != len(base):
        return np.zeros(0)
    keep = base > 0
    return mine[keep] / base[keep]


# -- figures ---------------------------------------------------------------------------------


def case_figure(
    case: str, arms: list[CaseArm], series: dict[str, dict[str, np.ndarray]], path: Path
) -> Path | None:
    """Per arm (rows): each guest's size with the controller's moves and its working set;
    each guest's memory pressure (PSI some avg10); all guests' resident RAM on the host."""
    arms = [a for a in arms if series.get(a.arm)]
    if not arms:
        return None
    F._style()
    fig, axes = plt.subplots(
        len(arms), 3, figsize=(16, 2.9 * len(arms) + 0.8), sharex=True, squeeze=False
    )
    colours = dict(zip([g.name for g in arms[0].guests], sns.color_palette("tab10"), strict=False))
    for row, arm in zip(axes, arms, strict=True):
        s = series[arm.arm]
        t0 = arm.t0_ns
        mem, psi, host = row
        for i, g in enumerate(arm.guests):
            c = colours.get(g.name, "grey")
            t = (s.get(f"{g.name}_t_ns", np.zeros(0)) - t0) / 1e9
            mem.step(
                t,
                s.get(f"{g.name}_size", np.zeros(0)) / 2**20,
                where="post",
                color=c,
                label=f"{g.name} size",
            )
            # its busy phases as a bar below zero, one lane per guest, where each really
            # started (when the guest said so), labelled with the working set
            offset = (g.workload_start_ns - t0) / 1e9
            lane = -(i + 1) * LANE
            for ph in g.phases:
                if ph.size:
                    x0 = (ph.started_s if ph.started_s is not None else ph.start_s) + offset
                    mem.broken_barh([(x0, ph.seconds)], (lane, LANE * 0.7), color=c, alpha=0.45)
                    mem.text(x0 + 1, lane + LANE * 0.12, f"{g.name} {format_size(ph.size)}",
                             fontsize=6.5)  # fmt: skip
            psi.plot(t, s.get(f"{g.name}_psi_avg10", np.zeros(0)), color=c, label=g.name)
            for d in arm.decisions:
                if d.guest != g.name or d.kind == "none" or d.t_request_ns is None:
                    continue
                ok = d.outcome == "ok"
                mem.scatter(
                    [(d.t_request_ns - t0) / 1e9],
                    [0],
                    marker="^" if d.kind == "grow" else "v",
                    color=c if ok else "red",
                    s=28,
                    zorder=3,
                    edgecolors="black" if not ok else "none",
                )
        ht = (s.get("host_t_ns", np.zeros(0)) - t0) / 1e9
        if len(ht):
            host.plot(ht, s["host_ram_kb"].sum(axis=1) / 1024, color="black", label="guest RAM RSS")
            host.plot(
                ht,
                s["host_vmrss_kb"].sum(axis=1) / 1024,
                color="grey",
                linestyle="--",
                label="QEMU VmRSS (with TCG's own)",
            )
        host.axhline(arm.budget / 2**20, color="red", linewidth=1, label="budget")
        host.axhline(
            arm.budget * arm.rss_limit / 2**20,
            color="red",
            linestyle=":",
            linewidth=1,
            label=f"budget +{arm.rss_limit - 1:.0%}",
        )
        status = "" if arm.ok else f" — FAILED: {arm.failed_at}"
        mem.set_title(
            f"{arm.mechanism}{status}: guest size (MiB); ▲ grow ▼ shrink, red = not ok; "
            "bars: busy phases",
            fontsize=9,
        )
        mem.set_ylabel("MiB")
        mem.set_ylim(bottom=-(len(arm.guests) + 0.5) * LANE)
        psi.set_title(f"{arm.mechanism}: memory pressure, PSI some avg10 (%)", fontsize=9)
        host.set_title(f"{arm.mechanism}: host, all guests (MiB)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("seconds from the workloads' start")
    axes[0][0].legend(fontsize=7, ncol=2, loc="upper right")
    axes[0][1].legend(fontsize=7, loc="upper right")
    axes[0][2].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{arms[0].title} ({len(arms[0].guests)} guests, budget "
        f"{format_size(arms[0].budget)}, control every {arms[0].interval_s:g} s)"
    )
    return F._save(fig, path)


# -- the report section ----------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    from .report import md_table

    return md_table(header, rows)


def _arm_row(s: ArmSummary, static: CaseArm | None) -> list[str]:
    a = s.arm
    if not a.ok:
        return [a.mechanism, f"**failed** at {a.failed_at}: {a.error[:160]}"] + ["-"] * 8
    ratio = work_vs_static(a, static)
    work = f"{s.pages / 1e6:,.1f} M pages"
    if a.mechanism != "static" and len(ratio):
        work += "; x static per phase: " + median_text(ratio, "x")
    moves = ", ".join(f"{v} {k}" for k, v in sorted(s.moves.items())) or "none"
    b = s.budget
    if b.get("samples"):
        verdict = "kept" if budget_kept(a, b) else "**NOT kept**"
        host = (
            f"{verdict}: peak {_mib(b['peak'])} ({b['peak'] / a.budget:.0%} of budget); above "
            f"+5% for {b['longest_above_s']:.1f} s at most (one interval: {a.interval_s:g} s)"
            + ("; still above at the end" if b["open_above"] else "")
            + f". With QEMU's own memory (VmRSS): peak {_mib(b['peak_vmrss'])} "
            f"({b['peak_vmrss'] / a.budget:.0%}), above +5% for "
            f"{b['vmrss_longest_above_s']:.1f} s at most"
        )
    else:
        host = "not sampled"
    react = median_text(s.reaction) if len(s.reaction) else "-"
    if s.unserved:
        react += f"; {s.unserved} episode(s) without memory arriving"
    if s.unseen:
        react += f"; {s.unseen} episode(s) whose memory the guest was not seen to receive"
    if len(s.rounds):  # a round that makes moves takes longer than the interval
        react += (
            f"; rounds every {np.median(s.rounds):.1f} s (median), {s.rounds.max():.1f} s at most"
        )
    return [
        a.mechanism,
        f"{s.phases_done}/{s.phases}",
        "-" if s.oom_kills is None else str(s.oom_kills),
        work,
        "-" if s.psi_s is None else f"{s.psi_s:.1f} s",
        "-" if s.swap_bytes is None else _mib(s.swap_bytes),
        f"{_mib(s.moved)} to guests; moves: {moves}"
        + (f"; {s.starved} rounds with a starved guest" if s.starved else ""),
        react if a.mechanism != "static" else "(no controller)",
        host,
        f"{a.wall_s:.0f} s",
    ]


HEADER = [
    "arm",
    "phases completed",
    "OOM kills",
    "work done",
    "time under pressure (PSI some, all guests)",
    "swap traffic",
    "memory moved to guests (grows); moves by outcome",
    "reaction: pressure seen -> memory in guest",
    "host: guest RAM resident",
    "arm wall time",
]


# measure -> (higher is better, the arm's value, how it is printed)
MEASURES: dict[str, tuple[bool, Callable[[ArmSummary], float], Callable[[float], str]]] = {
    "work done": (True, lambda s: float(s.pages), lambda v: f"{v / 1e6:,.1f} M pages"),
    "time under pressure": (
        False,
        lambda s: s.psi_s if s.psi_s is not None else np.inf,
        lambda v: f"{v:.1f} s",
    ),
    "swap traffic": (
        False,
        lambda s: float(s.swap_bytes) if s.swap_bytes is not None else np.inf,
        _mib,
    ),
    "reaction (median)": (
        False,
        lambda s: float(np.median(s.reaction)) if len(s.reaction) else np.inf,
        lambda v: f"{v:.2f} s",
    ),
}


def _eligible(s: ArmSummary) -> str:
    """Why an arm may not lead ('' if it may): it failed, a guest was OOM-killed, a busy
    phase did not complete, or the budget was not kept."""
    if not s.arm.ok:
        return f"{s.arm.mechanism} failed"
    if s.oom_kills:
        return f"{s.arm.mechanism} had {s.oom_kills} OOM kill(s)"
    if s.phases_done < s.phases:
        return f"{s.arm.mechanism} completed {s.phases_done} of {s.phases} busy phases"
    if not budget_kept(s.arm, s.budget):
        return f"{s.arm.mechanism} did not keep the budget"
    return ""


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """The two medians' exact intervals overlap (either sample too small counts as yes)."""
    if len(a) < 2 or len(b) < 2:
        return True
    ga = group_stats(a, np.zeros(len(a), dtype=np.int64), 1, confidence=CONFIDENCE)
    gb = group_stats(b, np.zeros(len(b), dtype=np.int64), 1, confidence=CONFIDENCE)
    return bool(ga.ci_low[0] <= gb.ci_high[0] and gb.ci_low[0] <= ga.ci_high[0])


def verdict(summaries: dict[str, list[ArmSummary]]) -> str:
    """Whether this run agrees with "no absolute winner": which mechanism leads on each
    measure in each case study, by how much over the next one, and how many of the leads
    each mechanism holds. Only mechanism arms that completed every busy phase without OOM
    kills and kept the budget may lead (the others are named); a tie is no lead, and a
    reaction-time lead whose interval overlaps the next one's says so."""
    leads: list[tuple[str, str, str, str]] = []  # (case, measure, mechanism, margin text)
    excluded: list[str] = []
    for case, rows in summaries.items():
        mechs = [s for s in rows if s.arm.mechanism != "static"]
        excluded += [f"{case}: {why}" for s in mechs if (why := _eligible(s))]
        mechs = [s for s in mechs if not _eligible(s)]
        if len(mechs) < 2:
            continue
        for name, (higher, value, show) in MEASURES.items():
            ranked = sorted(mechs, key=value, reverse=higher)
            best, nxt = ranked[0], ranked[1]
            if not np.isfinite(value(best)) or value(best) == value(nxt):
                continue  # unmeasured, or a tie: no lead
            margin = f"{show(value(best))} against {nxt.arm.mechanism}'s {show(value(nxt))}"
            if name.startswith("reaction") and _overlap(best.reaction, nxt.reaction):
                margin += ", intervals overlap"
            leads.append((case, name, best.arm.mechanism, margin))
    note = f" Not eligible to lead: {'; '.join(excluded)}." if excluded else ""
    if not leads:
        return (
            "This run cannot say whether there is an absolute winner: no case study has two "
            f"mechanism arms that may lead.{note}"
        )
    count: dict[str, int] = {}
    for _, _, m, _ in leads:
        count[m] = count.get(m, 0) + 1
    top = max(count, key=lambda m: count[m])
    detail = "; ".join(f"{case}, {name}: **{m}** ({margin})" for case, name, m, margin in leads)
    caveat = (
        "Each arm ran once, so a lead is one run's: the intervals in the tables above (over "
        "the busy phases and the pressure episodes) are the only uncertainty this run has."
    )
    tally = ", ".join(
        f"{m} {k} of {len(leads)}" for m, k in sorted(count.items(), key=lambda x: -x[1])
    )
    if len(count) == 1:
        head = (
            f'This run does **not** agree with "no absolute winner": {top} leads on every measure'
        )
    elif count[top] >= 0.75 * len(leads):
        head = (
            f'This run mostly does **not** agree with "no absolute winner": {top} leads on '
            f"{count[top]} of {len(leads)} measures (leads: {tally})"
        )
    else:
        head = (
            f'This run agrees with "no absolute winner": the lead changes with the measure and '
            f"the case study (leads: {tally})"
        )
    return f"{head}. {detail}.{note} {caveat}"


def case_section(store: RunStore, out: Path) -> list[str]:
    arms, problems = load_arms(store.directory)
    by_case: dict[str, list[CaseArm]] = {}
    for a in arms:
        by_case.setdefault(a.case, []).append(a)
    lines = ["## Case studies", ""]
    lines += [
        "Each case study runs once per arm on fresh guests: `static` (each guest keeps its "
        "starting size: the baseline) and each mechanism moved by the controller. Work done is "
        "the pages dynamem-impact touched in the busy phases (timed, so more memory means more "
        "work, not a shorter run); 'x static per phase' is each busy phase's work over the same "
        "phase's in the static arm, with the exact order-statistic interval of its median over "
        "the phases and its real level. Reaction times run from the controller's look that first "
        "saw a guest under pressure (the crossing happened at most one round earlier: a "
        "round lasts the interval or, when it moves memory, as long as its moves) to "
        "the guest seeing the grow complete, one value per pressure episode; episodes that "
        "ended with no memory arriving are counted beside them. The host check reads every "
        "QEMU's resident guest RAM from /proc/PID/smaps (its large private anonymous "
        "mappings) every 0.5 s; QEMU's own memory (TCG's code cache, devices) is shown apart "
        "as VmRSS and is not part of the budget.",
        "",
    ]
    missing = [a for a in store.run.order if a not in {x.arm for x in arms}]
    if missing or problems:
        lines += ["Arms without a record (counted as failed):", ""]
        lines += [f"- `{m}`: never finished" for m in missing]
        lines += [f"- problem: {p}" for p in problems]
        lines.append("")
    summaries: dict[str, list[ArmSummary]] = {}
    for case, case_arms in by_case.items():
        case_arms.sort(
            key=lambda a: (
                ARM_ORDER.index(a.mechanism) if a.mechanism in ARM_ORDER else 9,
                a.repeat,
            )
        )
        series = {a.arm: load_series(store.directory, a.arm) for a in case_arms}
        static = next((a for a in case_arms if a.mechanism == "static" and a.ok), None)
        rows = [summarize(a, series[a.arm]) for a in case_arms]
        summaries[case] = rows
        first = next((a for a in case_arms if a.mechanism != "static"), case_arms[0])
        pol = first.policy
        start, floor, ceiling = (
            (first.guests[0].start, first.guests[0].floor, first.guests[0].ceiling)
            if first.guests
            else (0, 0, 0)  # an arm that failed before its guests were planned
        )
        st = next((a for a in case_arms if a.mechanism == "static" and a.guests), None)
        static_size = format_size(st.guests[0].start) if st else "not run"
        lines += [f"### {first.title}", ""]
        guests = "; ".join(
            f"{g.name}: "
            + ", ".join(
                (format_size(p.size) if p.size else "idle") + f" {p.seconds:g}s" for p in g.phases
            )
            for g in first.guests
        )
        lines += [
            f"{len(first.guests)} guests ({first.cpus} vCPU each, -cpu {first.cpu_model}, "
            f"{first.accel}, swap {first.swap} {format_size(first.swap_size)}, kernel "
            f"{' '.join(first.kernel_args) or '-'}), budget {format_size(first.budget)}, each "
            f"between {format_size(floor)} and {format_size(ceiling)}, starting at "
            f"{format_size(start)} (the static arm: {static_size}, the budget shared out); "
            f"control every {first.interval_s:g} s, "
            f"policy {pol.get('name')} (target {format_size(pol.get('target', 0))}, "
            f"low {format_size(pol.get('low', 0))}, PSI {pol.get('psi_avg10')}%), "
            f"a move may take {first.move_deadline_s:g} s. Phases: {guests}.",
            "",
        ]
        name = f"case-{case}.png"
        fig = case_figure(case, case_arms, series, out / name)
        if fig is not None:
            lines += [
                f"![{first.title}: memory per guest, pressure and host RSS per arm]({name})",
                "",
            ]
        lines += _table(HEADER, [_arm_row(s, static) for s in rows])
        lines += _decision_summary(case_arms)
    lines += ["### Is there an absolute winner?", "", verdict(summaries), ""]
    return lines


def _decision_summary(arms: list[CaseArm]) -> list[str]:
    """The moves that did not go as asked, each with its reason (all decisions are in the
    arm's record)."""
    odd = [(a, d) for a in arms for d in a.decisions if d.kind != "none" and d.outcome != "ok"]
    if not odd:
        return ["Every move the controller made completed (`ok`).", ""]
    out = ["Moves that did not complete as asked:", ""]
    for a, d in odd[:20]:
        out.append(
            f"- {a.mechanism}, round {d.round}, {d.guest} {d.kind} "
            f"{format_size(d.requested)}: **{d.outcome}**, moved {format_size(abs(d.done))}"
            f"{' (' + d.message + ')' if d.message else ''}"
        )
    if len(odd) > 20:
        out.append(f"- ... and {len(odd) - 20} more (in the arms' records)")
    return [*out, ""]


def build_case_report(store: RunStore, out: Path) -> tuple[Path, Path]:
    from .report import write_pages

    out.mkdir(parents=True, exist_ok=True)
    run, meta = store.run, store.run.metadata
    lines = [
        f"# dynamem report: {run.run_id}",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC from "
        f"`{store.directory}`.",
        "",
        "## Setup",
        "",
        *_table(
            ["setting", "value"],
            [
                ["run", f"`{run.run_id}` (case suite `{run.suite.name}`, {len(run.order)} arms)"],
                ["accelerator", f"**{meta.accel}** ({meta.accel_reason})"],
                ["host", f"{meta.host_cpu}, {meta.host_cpus} CPUs, kernel {meta.host_kernel}"],
                ["QEMU", meta.qemu_version],
                ["guest", f"{meta.guest}, kernel {meta.guest_kernel}"],
                ["dynamem", f"{meta.dynamem_version} at `{meta.git_commit[:12]}`"],
            ],
        ),
    ]
    lines += case_section(store, out)
    return write_pages(out, lines, run.run_id)


__all__ = ["build_case_report", "case_section", "reaction_times", "budget_check", "verdict"]
