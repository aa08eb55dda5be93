"""Two runs side by side, metric by metric: did anything get slower (for CI)?

The ratio is B over A of geometric means with a Welch t interval on the log scale: a
latency ratio is what a regression is about, and with the few repeats a suite has, a rank
test cannot reach significance once corrected for the many comparisons (five against five
never goes below p = 0.0079). Holm's correction runs over every comparison made; a metric
counts as changed only when it is significant after correction and moved by more than the
noise threshold. Metrics with zeros (counts such as pages migrated) have no log scale and
are listed as not compared rather than tested on a different footing.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dynamem.analysis.metrics import METRICS
from dynamem.analysis.stats import holm
from dynamem.errors import UserError

# Runs that differ in any of these measure different things; they are never pooled.
IDENTITY = ("accel", "qemu_version", "guest_kernel", "host_cpu")


def identity_mismatch(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    ma, mb = a.get("metadata", {}), b.get("metadata", {})
    return [f"{k} {ma.get(k)!r} vs {mb.get(k)!r}" for k in IDENTITY if ma.get(k) != mb.get(k)]


def check_comparable(a: dict[str, Any], b: dict[str, Any], allow_mixed: bool) -> list[str]:
    """The differences; a UserError unless they were allowed."""
    diffs = identity_mismatch(a, b)
    if diffs and not allow_mixed:
        raise UserError(
            f"runs {a.get('run_id')} and {b.get('run_id')} differ in {'; '.join(diffs)}: "
            "their numbers are not comparable (pass --allow-mixed to compare anyway)"
        )
    return diffs


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.05
    noise: float = 0.10  # a change smaller than this share is never a verdict


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


def compare_tables(
    a: pd.DataFrame, b: pd.DataFrame, thresholds: Thresholds = Thresholds()
) -> pd.DataFrame:
    """One row per (scenario, step, metric) present in both runs, with its verdict."""
    keys = ["scenario", "step_index", "step", "metric"]
    rows: list[dict[str, Any]] = []
    grouped_b = dict(list(b.groupby(keys)))
    for key, ga in a.groupby(keys):
        metric = METRICS[key[3]]
        if metric.better == "none" or key not in grouped_b:
            continue
        va, vb = ga["value"].to_numpy(float), grouped_b[key]["value"].to_numpy(float)
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row.update(
            unit=metric.unit,
            better=metric.better,
            n_a=len(va),
            n_b=len(vb),
            median_a=float(np.median(va)),
            median_b=float(np.median(vb)),
        )
        if len(va) < 2 or len(vb) < 2:
            row["note"] = "fewer than 2 values in a run"
        elif np.any(va <= 0) or np.any(vb <= 0):
            row["note"] = "zeros or negatives: no ratio"
        else:
            row["ratio"], row["ci_low"], row["ci_high"], row["p"] = log_ratio_test(
                va, vb, 1 - thresholds.alpha
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for col in ("ratio", "ci_low", "ci_high", "p", "note"):
        if col not in table:
            table[col] = np.nan if col != "note" else ""
    table["note"] = table["note"].fillna("")
    tested = table["p"].notna()
    table["p_holm"] = np.nan
    table.loc[tested, "p_holm"] = holm(table.loc[tested, "p"].to_numpy())
    table["verdict"] = [_verdict(r, thresholds) for r in table.itertuples()]
    return table


def _verdict(row: Any, t: Thresholds) -> str:
    if not np.isfinite(row.p_holm):
        return "not compared"
    if row.p_holm >= t.alpha or abs(np.log(row.ratio)) <= np.log1p(t.noise):
        return "no significant change"
    up = row.ratio > 1
    worse = up if row.better == "lower" else not up
    if row.unit == "s":
        return "slower" if worse else "faster"
    return "worse" if worse else "better"


def regressed(table: pd.DataFrame) -> bool:
    return bool(not table.empty and table["verdict"].isin(["slower", "worse"]).any())
