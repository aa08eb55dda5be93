"""What the asv suite in `bench/` tracks, read from a raw run through `analysis.metrics`.

Discovery only parses a suite's TOML (the parameter grid); nothing boots until asv calls
`load_cache`, which reads a finished raw run (`DYNAMEM_ASV_RAW`, what `dynamem nightly`
passes) or runs the suite now through the runner into `results/raw/<run-id>/`.

Every value is the median over the suite's cells of one metric of `METRICS`, for one
resize direction, taken from steps whose outcome is `ok`. asv takes an upward step for a
regression, so a metric where higher is better is tracked with its sign turned (host RSS
reclaimed becomes QEMU's RSS change). A grid point of the suite whose steps all failed
raises, so asv records the benchmark as failed; `Failures` tracks the share of cells that
failed or had a resize that was not `ok`. A grid point the suite does not hold, or a
figure that does not apply (a workload stall without the `impact` workload), is NaN
(asv shows n/a).
"""

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dynamem.analysis.metrics import METRICS, MiB, cell_outcomes, tidy
from dynamem.errors import UserError
from dynamem.scenario import Suite, load_suite, load_suite_text

ENV_RAW = "DYNAMEM_ASV_RAW"  # a finished raw run directory to read instead of booting
ENV_SUITE = "DYNAMEM_ASV_SUITE"  # the suite to run when no raw run is given
DEFAULT_SUITE = "nightly"
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


def workload_label(raw: dict[str, Any]) -> str:
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

    @property
    def params(self) -> list[list[str]]:
        mechs = sorted({m for m, _ in self.scenarios})
        loads = sorted({w for _, w in self.scenarios})
        sizes = sorted(
            {s for d in self.sizes.values() for v in d.values() for s in v},
            key=lambda s: float(s.split()[0]),
        )
        return [mechs, sizes, loads]

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
        return grid_of(load_suite_text(run["suite"]["toml"], f"run {run['run_id']}"))
    return grid_of(load_suite(os.environ.get(ENV_SUITE) or DEFAULT_SUITE))


@dataclass
class Cache:
    """What setup_cache hands every benchmark: one raw run as tidy rows."""

    run_id: str
    directory: str
    table: pd.DataFrame  # analysis.metrics.tidy
    outcomes: pd.DataFrame  # analysis.metrics.cell_outcomes
    problems: list[str]


def cache_of(directory: Path) -> Cache:
    from dynamem.store import RunStore

    store = RunStore.open(directory)
    cells, problems = store.load_cells()
    missing = set(store.run["order"]) - store.completed()
    problems = problems + [f"cell {c} never finished" for c in sorted(missing)]
    run_id = store.run["run_id"]
    return Cache(run_id, str(directory), tidy(cells, run_id), cell_outcomes(cells), problems)


def load_cache() -> Cache:
    """The raw run named by DYNAMEM_ASV_RAW, or a fresh run of the grid's suite (boots)."""
    raw = os.environ.get(ENV_RAW)
    if raw:
        return cache_of(Path(raw))
    from dynamem import runner
    from dynamem.store import RunStore

    suite = bench_grid().suite
    metadata = runner.run_metadata("auto", "qemu-system-x86_64", "minimal")
    run = runner.new_run(suite, suite.seed, metadata)
    store = RunStore.create(runner.default_out() / run["run_id"], run)
    runner.run_suite(store, accel_request="auto", qemu="qemu-system-x86_64", guest="minimal")
    return cache_of(store.directory)


def _failures(cache: Cache, scenario: str) -> str:
    out = cache.outcomes[cache.outcomes["scenario"] == scenario]
    failed = out[out["status"] != "ok"]
    notes = [f"{scenario}-r{r.repeat}: {r.error}" for r in failed.itertuples()]
    rows = cache.table[(cache.table["scenario"] == scenario) & (cache.table["outcome"] != "ok")]
    notes += sorted({f"{scenario}-r{r.repeat} {r.step}: {r.outcome}" for r in rows.itertuples()})
    return "; ".join(notes) or "no cell of it in the run"


def track_value(
    cache: Cache, grid: Grid, track: Track, mechanism: str, size: str, workload: str
) -> float:
    scenario = grid.scenarios.get((mechanism, workload))
    if scenario is None or size not in grid.sizes[scenario][track.direction]:
        return math.nan  # not a point of this suite
    t = cache.table
    steps = t[
        (t["scenario"] == scenario)
        & (t["direction"] == track.direction)
        & (t["size_mib"].map(size_label) == size)
        & (t["outcome"] == "ok")
    ]
    if steps.empty:
        raise RuntimeError(
            f"run {cache.run_id}: no {track.direction} {size} of {scenario} succeeded "
            f"({_failures(cache, scenario)})"
        )
    values = steps[steps["metric"] == track.metric]["value"]
    if values.empty:
        return math.nan  # the figure does not apply here (e.g. a stall without `impact`)
    return track.sign * float(statistics.median(values))


def failure_share(cache: Cache, grid: Grid, mechanism: str, workload: str) -> float:
    """Share of the scenario's cells that failed or had a resize whose outcome is not ok."""
    scenario = grid.scenarios.get((mechanism, workload))
    if scenario is None:
        return math.nan
    out = cache.outcomes[cache.outcomes["scenario"] == scenario]
    if out.empty:
        raise RuntimeError(f"run {cache.run_id}: no cell of {scenario} finished")
    t = cache.table
    ok = t[(t["scenario"] == scenario) & (t["metric"] == "succeeded")]
    bad_repeats = set(out[out["status"] != "ok"]["repeat"]) | set(ok[ok["value"] < 1]["repeat"])
    return len(bad_repeats) / len(out)
