"""What the asv suite in `bench/` tracks, read from a raw run through `metrics`.

Discovery only parses a suite's TOML (the parameter grid); nothing boots until asv calls
`load_cache`, which reads a finished raw run (`DYNAMEM_ASV_RAW`, what `dynamem nightly`
passes) or runs the suite now through the runner into `results/raw/<run-id>/`.

Every value is the median over the suite's cells of one metric of `METRICS`, for one
resize direction, taken from the rows the metric table allows (ok steps of ok cells), and
rounded to the metric's resolution: asv flags any upward step, and a change smaller than
what the metric resolves (a fragmentation index moving from 0 to 0.001) is not one.
asv takes an upward step for a regression, so a metric where higher is better is tracked
with its sign turned (host RSS reclaimed becomes QEMU's RSS change). `OkSteps` tracks how
many ok steps each value is the median of; `Failures` the share of resizes that were not
ok steps of ok cells. A grid point whose steps all failed raises, so asv records the
benchmark as failed. A grid point the suite does not hold, or a figure that does not
apply (a workload stall without the `impact` workload), is NaN (asv shows n/a).

`thresholds` derives asv's per-benchmark regression thresholds from the night-to-night
noise measured in earlier results (or, before there are enough nights, from the spread
within the run), so its regressions page does not flag noise.
"""

import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dynamem.errors import UserError
from dynamem.qemu.config import ICOUNT
from dynamem.scenario import Suite, load_suite, load_suite_text

from .metrics import (
    METRICS,
    MiB,
    cell_outcomes,
    driver_or_look,
    host_fingerprint,
    outcome_counts,
    tidy,
    usable,
)
from .stats import group_stats

ENV_RAW = "DYNAMEM_ASV_RAW"  # a finished raw run directory to read instead of booting
# the host fingerprint whose cells asv reads (a run over several hosts: one asv machine each)
ENV_HOST = "DYNAMEM_ASV_HOST"
ENV_SUITE = "DYNAMEM_ASV_SUITE"  # the suite to run when no raw run is given
DEFAULT_SUITE = "nightly"
# A suite whose parameter grid a run's grid is framed in (Grid.frame): `dynamem nightly`
# sets it to the main suite when it records the deterministic subset.
ENV_FRAME = "DYNAMEM_ASV_FRAME"
PARAM_NAMES = ["mechanism", "step size", "workload"]
SETUP_TIMEOUT_S = 3 * 3600.0  # the whole suite boots in setup_cache when asv runs alone


@dataclass(frozen=True)
class Track:
    """One asv benchmark: one metric of one resize direction, turned so lower is better."""

    metric: str  # a key of METRICS
    direction: str  # "shrink" or "grow"
    title: str  # asv's pretty_name
    unit: str
    sign: float = 1.0  # -1 turns a higher-is-better metric around

    def __post_init__(self) -> None:
        better = METRICS[self.metric].better
        if (better == "higher") != (self.sign < 0):
            raise ValueError(f"{self.metric} is better {better}; the sign must make lower better")


TRACKS: dict[str, Track] = {
    "shrink_latency": Track("latency_guest_s", "shrink", "Shrink latency", "seconds"),
    "grow_latency": Track("latency_guest_s", "grow", "Grow latency", "seconds"),
    "shrink_rss_change": Track(
        "rss_reclaimed_mib", "shrink", "Shrink: QEMU RSS change", "MiB", sign=-1.0
    ),
    "shrink_swap_out": Track("swap_out_pages", "shrink", "Shrink: guest swap-out", "pages"),
    "shrink_pages_migrated": Track("pages_migrated", "shrink", "Shrink: pages migrated", "pages"),
    "shrink_fragmentation": Track(
        "unusable_order9_change", "shrink", "Shrink: fragmentation change", "index"
    ),
    "shrink_watermark": Track(
        "watermark_high_change_kib", "shrink", "Shrink: high watermark change", "KiB"
    ),
    "shrink_workload_stall": Track(
        "workload_longest_stall_ms", "shrink", "Shrink: workload's longest stall", "ms"
    ),
}


def workload_label(raw: dict[str, object]) -> str:
    workload = str(raw.get("workload", "idle"))
    return workload if workload == "idle" else f"{workload} {raw.get('workload_size', '')}".strip()


def size_label(size_mib: float) -> str:
    return f"{size_mib:g} MiB"


@dataclass(frozen=True)
class Grid:
    """The suite's parameter grid: (mechanism label, workload label) -> scenario name."""

    suite: Suite
    scenarios: dict[tuple[str, str], str]
    sizes: dict[str, dict[str, list[str]]]  # scenario -> direction -> size labels
    # Another grid whose parameters this one's include: a subset suite (the deterministic
    # nightly's idle scenarios) keeps the nightly's parameters, so every asv machine has the
    # same benchmark parameters and the points it lacks are n/a.
    frame: "Grid | None" = None

    @property
    def params(self) -> list[list[str]]:
        mechs = {m for m, _ in self.scenarios}
        loads = {w for _, w in self.scenarios}
        sizes = {s for d in self.sizes.values() for v in d.values() for s in v}
        if self.frame is not None:
            fm, fs, fl = self.frame.params
            mechs, sizes, loads = mechs | set(fm), sizes | set(fs), loads | set(fl)
        return [sorted(mechs), sorted(sizes, key=lambda s: float(s.split()[0])), sorted(loads)]

    @property
    def failure_params(self) -> list[list[str]]:
        return [self.params[0], self.params[2]]


def grid_of(suite: Suite) -> Grid:
    scenarios: dict[tuple[str, str], str] = {}
    sizes: dict[str, dict[str, list[str]]] = {}
    for s in suite.scenarios:
        key = (s.mechanism_object().label, workload_label(s.raw))
        if key in scenarios:
            raise UserError(
                f"suite {suite.name}: scenarios {scenarios[key]!r} and {s.name!r} are both "
                f"{key[0]} with workload {key[1]!r}; the asv suite needs one scenario per "
                "mechanism and workload"
            )
        scenarios[key] = s.name
        by_dir: dict[str, list[str]] = {"shrink": [], "grow": []}
        for step in s.steps:
            if step.kind == "resize":
                direction = "grow" if step.delta > 0 else "shrink"
                by_dir[direction].append(size_label(abs(step.delta) / MiB))
        sizes[s.name] = by_dir
    return Grid(suite, scenarios, sizes)


def bench_grid() -> Grid:
    """The grid asv discovers: the raw run's suite if one is given, else the named suite."""
    raw = os.environ.get(ENV_RAW)
    if raw:
        from dynamem.store import RunStore

        run = RunStore.open(Path(raw)).run
        grid = grid_of(load_suite_text(run.suite.toml, f"run {run.run_id}"))
    else:
        grid = grid_of(load_suite(os.environ.get(ENV_SUITE) or DEFAULT_SUITE))
    return framed(grid, os.environ.get(ENV_FRAME))


def framed(grid: Grid, frame: str | None) -> Grid:
    """`grid` within the parameters of the suite `frame` (see Grid.frame), if given."""
    return replace(grid, frame=grid_of(load_suite(frame))) if frame else grid


@dataclass
class Cache:
    """What setup_cache hands every benchmark: one raw run as tidy rows."""

    run_id: str
    directory: str
    table: pd.DataFrame  # metrics.tidy
    outcomes: pd.DataFrame  # metrics.cell_outcomes
    problems: list[str]
    accel: str = "tcg"

    def metric_of(self, track: "Track") -> str:
        """Under tcg-icount a latency track is the guest-clock duration: its wall-clock
        latency is not meaningful there."""
        if self.accel == ICOUNT and track.metric == "latency_guest_s":
            return driver_or_look(self.table)
        return track.metric


def cache_of(directory: Path, host: str | None = None) -> Cache:
    """A raw run's tables; with `host`, only the cells that ran on that host fingerprint."""
    from dynamem.store import RunStore

    store = RunStore.open(directory)
    cells, problems = store.load_all()  # unfinished cells counted as failed
    if host is not None:
        cells = [c for c in cells if host_fingerprint(c) == host]
    missing = set(store.run.order) - store.completed()
    problems = [p for p in problems if not p.startswith("cell ")] + [
        f"cell {c} never finished" for c in sorted(missing)
    ]
    run_id = store.run.run_id
    return Cache(run_id, str(directory), tidy(cells, run_id), cell_outcomes(cells), problems,
                 store.run.metadata.accel)  # fmt: skip


def load_cache() -> Cache:
    """The raw run named by DYNAMEM_ASV_RAW, or a fresh run of the grid's suite (boots)."""
    raw = os.environ.get(ENV_RAW)
    if raw:
        return cache_of(Path(raw), os.environ.get(ENV_HOST))
    from dynamem import runner

    suite = bench_grid().suite
    options = {"accel_request": "auto", "qemu": "qemu-system-x86_64", "guest": "minimal"}
    store = runner.start_run(suite, suite.seed, **options)  # type: ignore[arg-type]
    runner.run_suite(store, **options)  # type: ignore[arg-type]
    return cache_of(store.directory)


def _failures(cache: Cache, scenario: str) -> str:
    out = cache.outcomes[cache.outcomes["scenario"] == scenario]
    failed = out[out["status"] != "ok"]
    notes = [f"{scenario}-r{r.repeat}: {r.error}" for r in failed.itertuples()]
    rows = cache.table[(cache.table["scenario"] == scenario) & (cache.table["outcome"] != "ok")]
    notes += sorted({f"{scenario}-r{r.repeat} {r.step}: {r.outcome}" for r in rows.itertuples()})
    return "; ".join(notes) or "no cell of it in the run"


def _point(cache: Cache, grid: Grid, direction: str, mechanism: str, size: str,
           workload: str) -> tuple[str, pd.DataFrame] | None:  # fmt: skip
    """(scenario, its usable rows for this direction and size), or None off the grid."""
    scenario = grid.scenarios.get((mechanism, workload))
    if scenario is None or size not in grid.sizes[scenario][direction]:
        return None
    t = usable(cache.table)
    rows = t[
        (t["scenario"] == scenario)
        & (t["direction"] == direction)
        & (t["size_mib"].map(size_label) == size)
    ]
    return scenario, rows


def quantize(value: float, resolution: float) -> float:
    """`value` rounded to the metric's resolution (0 stays 0; tiny changes become 0)."""
    if resolution <= 0:
        return value
    return float(np.round(value / resolution) * resolution) + 0.0


def track_value(
    cache: Cache, grid: Grid, track: Track, mechanism: str, size: str, workload: str
) -> float:
    point = _point(cache, grid, track.direction, mechanism, size, workload)
    if point is None:
        return math.nan  # not a point of this suite
    scenario, steps = point
    if steps.empty:
        raise RuntimeError(
            f"run {cache.run_id}: no {track.direction} {size} of {scenario} succeeded "
            f"({_failures(cache, scenario)})"
        )
    metric = cache.metric_of(track)
    values = steps[steps["metric"] == metric]["value"]
    if values.empty:
        return math.nan  # the figure does not apply here (e.g. a stall without `impact`)
    median = track.sign * float(statistics.median(values))
    return quantize(median, METRICS[metric].resolution)


def ok_steps(
    cache: Cache, grid: Grid, direction: str, mechanism: str, size: str, workload: str
) -> float:
    """How many ok steps of ok cells the values of this grid point are medians of."""
    point = _point(cache, grid, direction, mechanism, size, workload)
    if point is None:
        return math.nan
    _, steps = point
    return float(steps["cell"].nunique())


def failure_share(cache: Cache, grid: Grid, mechanism: str, workload: str) -> float:
    """Share of the scenario's resizes that were not ok steps of ok cells (failed cells'
    resizes, reached or not, included)."""
    scenario = grid.scenarios.get((mechanism, workload))
    if scenario is None:
        return math.nan
    counts = outcome_counts(cache.table[cache.table["scenario"] == scenario], ["scenario"])
    if counts.empty:
        raise RuntimeError(f"run {cache.run_id}: no cell of {scenario} finished")
    row = counts.iloc[0]
    return float(1 - row["ok"] / row["n"])


# -- regression thresholds for asv ------------------------------------------------------------

THRESHOLD_FLOOR = 0.05  # asv's own default; below it a night-to-night change is noise here
THRESHOLD_DEFAULT = 0.10  # before there is anything to measure noise from
MIN_NIGHTS = 4  # nights of a series before its night-to-night noise is used


def night_to_night_noise(series: Iterable[list[float]], resolution: float) -> float | None:
    """Median relative change between consecutive nights over every series with at least
    MIN_NIGHTS values (NaNs skipped); None if there is no such series."""
    steps: list[float] = []
    for values in series:
        v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
        if len(v) < MIN_NIGHTS:
            continue
        scale = np.maximum(np.abs(v[:-1]), resolution)
        steps.extend((np.abs(np.diff(v)) / scale).tolist())
    return float(np.median(steps)) if steps else None


def within_run_noise(cache: Cache, metric: str) -> float | None:
    """Median over the run's groups of the relative half-width of the median's
    order-statistic interval (what one night's median may wander by)."""
    rows = usable(cache.table)
    rows = rows[rows["metric"] == metric]
    if rows.empty:
        return None
    codes, groups = pd.factorize(pd.MultiIndex.from_frame(rows[["scenario", "step_index"]]))
    g = group_stats(rows["value"].to_numpy(float), codes, len(groups))
    resolution = METRICS[metric].resolution
    scale = np.maximum(np.abs(g.median), resolution)
    half = np.maximum(g.median - g.ci_low, g.ci_high - g.median) / scale
    half = half[(g.n > 1) & np.isfinite(half)]
    return float(np.median(half)) if len(half) else None


def thresholds(cache: Cache, history: dict[str, list[list[float]]]) -> dict[str, float]:
    """asv `regressions_thresholds`: benchmark-name regex -> relative threshold, per track.

    `history` maps a track name to its grid points' series of earlier nightly values.
    Twice the typical night-to-night change once MIN_NIGHTS nights exist, else twice the
    within-run half-width; never below THRESHOLD_FLOOR.
    """
    out: dict[str, float] = {}
    for name, track in TRACKS.items():
        metric = cache.metric_of(track)
        resolution = METRICS[metric].resolution
        noise = night_to_night_noise(history.get(name, []), resolution)
        if noise is None:
            noise = within_run_noise(cache, metric)
        value = THRESHOLD_DEFAULT if noise is None else max(THRESHOLD_FLOOR, 2 * noise)
        out[rf".*\.track_{name}\b"] = round(min(value, 1.0), 3)
    # How many ok steps a value is of: informational (more is better, and `Failures`
    # carries the regression), so asv never flags it.
    out[r".*\.track_ok_steps_"] = 100.0
    return out


def history(results: Path, machine: str, grid: Grid) -> dict[str, list[list[float]]]:
    """Earlier nightlies' values of every track, per grid point, oldest first (asv's own
    results API reads its files)."""
    from asv.results import iter_results_for_machine

    runs = sorted(iter_results_for_machine(str(results), machine), key=lambda r: r.date or 0)
    out: dict[str, list[list[float]]] = {}
    for name in TRACKS:
        series: list[list[float]] = []
        for r in runs:
            key = next((k for k in r.get_all_result_keys() if k.endswith(f".track_{name}")), None)
            if key is None:
                continue
            values = r.get_result_value(key, grid.params)
            if not series:
                series = [[] for _ in values]
            for i, v in enumerate(values[: len(series)]):
                series[i].append(math.nan if v is None else float(v))
        out[name] = series
    return out
