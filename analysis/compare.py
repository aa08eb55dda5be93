"""Two runs side by side, for CI: did anything get slower, worse, or start failing?

Three kinds of finding, each enough to fail the comparison:

- **Success share.** Per scenario and step, the share of resizes that were ok steps of
  ok cells. Any drop from A to B is a regression (5/5 -> 3/5 is two resizes that no longer
  work, whatever a test on five repeats would call it).
- **Missing.** A scenario, step or metric that A measured and B did not (B's resizes all
  failed, or the suite changed) is named; nothing is skipped silently.
- **Metrics**, over the usable rows only (ok steps of ok cells, `metrics.usable`). Strictly
  positive values: the ratio B/A of geometric means with a Welch t interval on the log
  scale (a latency ratio is what a regression is about). Values with zeros or negatives
  (page counts, RSS reclaimed, index changes): the difference of means B - A with a Welch
  t interval. Holm's correction runs over every test; a metric counts as changed only when
  significant after correction and moved by more than the noise threshold and the
  metric's own resolution. The noise threshold is 10% by default; for deterministic
  (tcg-icount) runs it is derived from the runs' own repeat-to-repeat spread
  (`spread_noise`), because there a 2% change is real and a fixed 10% would hide it.
  (Rank tests cannot serve here: five against five never goes
  below p = 0.0079, which Holm's correction over a suite's dozens of tests never lets
  through.)
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dynamem.errors import UserError

from .metrics import METRICS, POOLED, STEP_KEYS, outcome_counts, usable
from .stats import holm

# A scenario's step is compared within one host fingerprint (never pooled over hosts unless
# `--pool-hosts` merged them first: metrics.pool_hosts).
KEYS = [*STEP_KEYS, "host"]

# Runs that differ in any of these measure different things; they are never pooled.
IDENTITY = ("accel", "qemu_version", "guest_kernel", "host_cpu")


def identity_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in IDENTITY if a.get(k) != b.get(k)]


def host_mismatch(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """Why two runs' cells cannot be paired host by host, if they cannot."""
    ha, hb = set(a["host"]), set(b["host"])
    if ha == hb:
        return None
    only_a, only_b = sorted(ha - hb), sorted(hb - ha)
    return (
        f"host fingerprints differ: {'; '.join(only_a) or 'none'} only in A, "
        f"{'; '.join(only_b) or 'none'} only in B"
    )


def condition_mismatch(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """Scenarios both runs hold whose conditions differ (a changed suite, CPU model...)."""
    ca = a.drop_duplicates(["scenario", "host"]).set_index(["scenario", "host"])["condition"]
    cb = b.drop_duplicates(["scenario", "host"]).set_index(["scenario", "host"])["condition"]
    common = ca.index.intersection(cb.index)
    return [f"scenario {s[0]}: {ca[s]!r} vs {cb[s]!r}" for s in common if ca[s] != cb[s]]


def check_comparable(diffs: list[str], run_a: str, run_b: str, allow_mixed: bool) -> list[str]:
    """The differences; a UserError unless they were allowed."""
    if diffs and not allow_mixed:
        raise UserError(
            f"runs {run_a} and {run_b} differ in {diffs[0]}"
            + (f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else "")
            + ": their numbers are not comparable (pass --allow-mixed to compare anyway)"
        )
    return diffs


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.05
    # A change smaller than this share is never a verdict. None: derived per metric from the
    # runs' own spread (`spread_noise`), what a deterministic (tcg-icount) run uses.
    noise: float | None = 0.10


NOISE_SPREADS = 2.0  # a derived threshold: this many robust spreads of the noisier run


def robust_spread(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal data,
    unmoved by one wild repeat."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def spread_noise(a: np.ndarray, b: np.ndarray, relative: bool) -> float:
    """The derived noise threshold: NOISE_SPREADS robust spreads of the noisier run, as a
    share of its median (ratios) or in the metric's unit (differences). Under tcg-icount
    repeats differ by well under 1%, so this detects changes a fixed 10% would hide."""
    spreads = []
    for v in (a, b):
        s = robust_spread(v)
        med = abs(float(np.median(v)))
        spreads.append((s / med if med else np.inf) if relative else s)
    return NOISE_SPREADS * max(spreads)


def log_ratio_test(a: np.ndarray, b: np.ndarray, confidence: float) -> tuple[float, ...]:
    """(ratio, CI low, CI high, p) of B over A from Welch's t on log values."""
    la, lb = np.log(a), np.log(b)
    res = stats.ttest_ind(lb, la, equal_var=False)
    diff = lb.mean() - la.mean()
    if not np.isfinite(res.statistic):  # no spread at all in either run
        same = np.isclose(diff, 0.0)
        return float(np.exp(diff)), float(np.exp(diff)), float(np.exp(diff)), 1.0 if same else 0.0
    ci = res.confidence_interval(confidence)
    return float(np.exp(diff)), float(np.exp(ci.low)), float(np.exp(ci.high)), float(res.pvalue)


def difference_test(a: np.ndarray, b: np.ndarray, confidence: float) -> tuple[float, ...]:
    """(mean B - mean A, CI low, CI high, p) from Welch's t on the values themselves."""
    diff = float(b.mean() - a.mean())
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread: equal, or certainly different
        return diff, diff, diff, 1.0 if diff == 0 else 0.0
    res = stats.ttest_ind(b, a, equal_var=False)
    ci = res.confidence_interval(confidence)
    return diff, float(ci.low), float(ci.high), float(res.pvalue)


def _metric_row(
    key: tuple[Any, ...], va: np.ndarray, vb: np.ndarray, confidence: float
) -> dict[str, Any]:
    metric = METRICS[key[-1]]
    row: dict[str, Any] = dict(zip([*KEYS, "metric"], key, strict=True))
    row.update(
        unit=metric.unit, better=metric.better, n_a=len(va), n_b=len(vb),
        median_a=float(np.median(va)), median_b=float(np.median(vb)),
    )  # fmt: skip
    if len(va) < 2 or len(vb) < 2:
        row["note"] = "fewer than 2 values in a run"
    elif np.all(va > 0) and np.all(vb > 0):
        row["method"] = "ratio"
        row["ratio"], row["ci_low"], row["ci_high"], row["p"] = log_ratio_test(va, vb, confidence)
        row["spread_noise"] = spread_noise(va, vb, relative=True)
    else:
        row["method"] = "difference"
        row["difference"], row["ci_low"], row["ci_high"], row["p"] = difference_test(
            va, vb, confidence
        )
        row["spread_noise"] = spread_noise(va, vb, relative=False)
    return row


def compare_tables(
    a: pd.DataFrame, b: pd.DataFrame, thresholds: Thresholds = Thresholds()
) -> tuple[pd.DataFrame, list[str]]:
    """(one row per compared scenario, step and metric with its verdict; what A has and B
    lacks, one line each)."""
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    oa, ob = outcome_counts(a, KEYS), outcome_counts(b, KEYS)
    width = len(KEYS)
    ob_by = {tuple(r[:width]): r for r in ob.itertuples(index=False)}
    for r in oa.itertuples(index=False):
        key = tuple(r[:width])
        other = ob_by.get(key)
        where = f"{r.scenario} step {r.step_index} ({r.step})" + (
            f" on {r.host}" if r.host and r.host != POOLED else ""
        )
        if other is None:
            missing.append(f"{where}: in A ({r.ok}/{r.n} ok), missing in B")
            continue
        row: dict[str, Any] = dict(zip(KEYS, key, strict=True))
        row.update(metric="succeeded", unit="share", better="higher", n_a=r.n, n_b=other.n,
                   median_a=r.share, median_b=other.share,
                   note=f"{r.ok}/{r.n} -> {other.ok}/{other.n}")  # fmt: skip
        row["verdict"] = "worse" if other.share < r.share else "no change"
        rows.append(row)
    ua, ub = usable(a), usable(b)
    keys = [*KEYS, "metric"]
    grouped_b = {k: g["value"].to_numpy(float) for k, g in ub.groupby(keys)}
    present_b = {tuple(r[:width]) for r in ob.itertuples(index=False)}
    tested: list[dict[str, Any]] = []
    for key, ga in ua.groupby(keys):
        if key not in grouped_b:
            if tuple(key[:width]) in present_b:
                missing.append(
                    f"{key[0]} step {key[1]} ({key[2]}): metric {key[-1]} in A "
                    f"({len(ga)} values), none usable in B"
                )
            continue
        row = _metric_row(key, ga["value"].to_numpy(float), grouped_b[key], 1 - thresholds.alpha)
        rows.append(row)
        if "p" in row:
            tested.append(row)
    for row, p_holm in zip(tested, holm([r["p"] for r in tested]), strict=True):
        row["p_holm"] = float(p_holm)
    for row in rows:
        if "verdict" not in row:
            row["verdict"] = _verdict(row, thresholds)
    table = pd.DataFrame(rows)
    for col in (
        "method",
        "ratio",
        "difference",
        "ci_low",
        "ci_high",
        "p",
        "p_holm",
        "spread_noise",
        "note",
    ):
        if col not in table:
            table[col] = np.nan if col != "note" else ""
    if not table.empty:
        table["note"] = table["note"].fillna("")
    return table, missing


def _verdict(row: dict[str, Any], t: Thresholds) -> str:
    p = row.get("p_holm")
    if p is None or not np.isfinite(p):
        return "not compared"
    derived = row["spread_noise"]
    if row["method"] == "ratio":
        big = abs(np.log(row["ratio"])) > np.log1p(t.noise if t.noise is not None else derived)
        up = row["ratio"] > 1
        size = abs(row["median_b"] - row["median_a"])
    else:
        limit = t.noise * abs(row["median_a"]) if t.noise is not None else derived
        big = abs(row["difference"]) > limit
        up = row["difference"] > 0
        size = abs(row["difference"])
    if p >= t.alpha or not big or size < METRICS[row["metric"]].resolution:
        return "no significant change"
    if row["better"] == "none":  # a change in either direction matters (a starting point,
        return "changed"  # a watermark effect): it needs explaining before it passes
    worse = up if row["better"] == "lower" else not up
    if row["unit"] == "s":
        return "slower" if worse else "faster"
    return "worse" if worse else "better"


REGRESSIONS = ("slower", "worse", "changed")


def regressed(table: pd.DataFrame, missing: list[str]) -> bool:
    return bool(missing) or bool(not table.empty and table["verdict"].isin(REGRESSIONS).any())


def format_rows(table: pd.DataFrame, alpha: float = 0.05) -> list[list[str]]:
    """The comparison as text rows (header first), for the terminal. The Welch interval's
    level is nominal: with 3 to 5 values per run it is approximate."""
    rows = [["scenario", "step", "metric", "A", "B", "B/A or B-A",
             f"Welch {1 - alpha:.0%} interval (approx.)", "p (Holm)", "verdict"]]  # fmt: skip
    hosts = sorted(set(table["host"])) if "host" in table and not table.empty else []
    label = {h: f"H{k}" for k, h in enumerate(hosts, 1)}
    for r in table.itertuples():
        scenario = r.scenario + (f" ({label[r.host]})" if len(hosts) > 1 else "")
        if r.metric == "succeeded":
            rows.append([scenario, r.step, "success share", f"{r.median_a:.0%}",
                         f"{r.median_b:.0%}", "-", r.note, "-", r.verdict])  # fmt: skip
            continue
        if r.method == "ratio":
            effect, ci = f"x{r.ratio:.2f}", f"{r.ci_low:.2f}-{r.ci_high:.2f}"
        elif r.method == "difference":
            effect, ci = f"{r.difference:+.4g}", f"{r.ci_low:+.4g} to {r.ci_high:+.4g}"
        else:
            effect, ci = "-", r.note
        rows.append([
            scenario, r.step, r.metric, f"{r.median_a:.4g}", f"{r.median_b:.4g}", effect, ci,
            f"{r.p_holm:.3g}" if np.isfinite(r.p_holm) else "-", r.verdict,
        ])  # fmt: skip
    return rows
