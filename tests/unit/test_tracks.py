"""The asv suite's grid and values, from cell records captured from a real quick run."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
from dynamem.analysis import tracks
from dynamem.analysis.tracks import (
    TRACKS,
    Track,
    cache_of,
    failure_share,
    grid_of,
    night_to_night_noise,
    ok_steps,
    quantize,
    thresholds,
    track_value,
)

from dynamem import runner
from dynamem.errors import UserError
from dynamem.record import CellRecord
from dynamem.scenario import load_suite, load_suite_text
from dynamem.store import RunStore

from .records import fixture_cell, run_record

BENCH = Path(__file__).parents[2] / "bench" / "resize.py"

TWO = """
name = "two"
repeats = 2
seed = 1
[defaults]
memory = "1G"
swap_size = "512M"
steps = ["shrink 256M", "grow 256M"]
warmup = false
[[scenario]]
name = "balloon-idle"
mechanism = "balloon"
[[scenario]]
name = "virtio-mem-stress"
mechanism = "virtio-mem"
workload = "stress"
workload_size = "60%"
"""


def renamed(cell: CellRecord, repeat: int, **changes: object) -> CellRecord:
    out = dataclasses.replace(cell, repeat=repeat, cell=f"{cell.scenario}-r{repeat}", **changes)
    out.steps = [dataclasses.replace(s) for s in cell.steps]
    return out


def failed(cell: CellRecord, repeat: int, error: str) -> CellRecord:
    return renamed(cell, repeat, status="failed", error=error, steps=[])


def make_run(tmp_path: Path, cells: list[CellRecord]) -> Path:
    suite = load_suite_text(TWO, "two.toml")
    order = [c.id for c in runner.cells_in_order(suite, 1)]
    store = RunStore.create(tmp_path / "run", dataclasses.replace(run_record(order, TWO), seed=1))
    for cell in cells:
        store.write_cell(cell)
    return store.directory


def balloon_cell() -> CellRecord:
    cell = fixture_cell("cell-balloon-idle.json")
    # The fixture comes from the study suite (3 GiB, a settle step): give it this suite's
    # steps, so it is a cell of `two`'s balloon-idle scenario.
    cell.scenario, cell.cell = "balloon-idle", "balloon-idle-r1"
    cell.steps = [s for s in cell.steps if s.kind == "resize"]
    for s in cell.steps:
        s.requested_bytes = 256 << 20 if s.requested_bytes > 0 else -(256 << 20)
    cell.condition = dataclasses.replace(cell.condition, steps=("shrink 256M", "grow 256M"))
    return cell


@pytest.fixture
def run_dir(tmp_path):
    vmem = fixture_cell("cell-virtio-mem-stress.json")
    balloon = balloon_cell()
    second = renamed(balloon, 2)
    second.steps[0].guest_latency_s = 3.0
    return make_run(
        tmp_path, [vmem, failed(vmem, 2, "GuestNotReady: no SSH after 60 s"), balloon, second]
    )


def test_grid_of_the_quick_suite():
    grid = grid_of(load_suite("quick"))
    assert grid.params == [
        ["balloon", "dimm", "virtio-mem/sbm"],
        ["256 MiB"],
        ["idle", "stress 60%"],
    ]
    assert grid.failure_params == [["balloon", "dimm", "virtio-mem/sbm"], ["idle", "stress 60%"]]
    assert grid.scenarios[("virtio-mem/sbm", "stress 60%")] == "virtio-mem-stress"


def test_nightly_suite_measures_every_track():
    grid = grid_of(load_suite("nightly"))
    assert grid.params[2] == ["idle", "impact 256M", "stress 60%"]


def test_two_scenarios_on_one_grid_point_are_refused():
    text = TWO.replace('name = "virtio-mem-stress"', 'name = "again"').replace(
        'mechanism = "virtio-mem"\nworkload = "stress"\nworkload_size = "60%"',
        'mechanism = "balloon"',
    )
    with pytest.raises(UserError, match="'balloon-idle' and 'again' are both balloon"):
        grid_of(load_suite_text(text, "t.toml"))


def test_every_track_is_lower_is_better():
    for track in TRACKS.values():  # __post_init__ checks the sign against METRICS
        assert track.metric and track.unit
    with pytest.raises(ValueError, match="better higher"):
        Track("rss_reclaimed_mib", "shrink", "t", "MiB")


def test_values_are_medians_of_ok_steps_turned_lower_is_better(run_dir):
    cache = cache_of(run_dir)
    grid = grid_of(load_suite_text(TWO, "two.toml"))
    vmem = ("virtio-mem/sbm", "256 MiB", "stress 60%")
    assert track_value(cache, grid, TRACKS["shrink_latency"], *vmem) == pytest.approx(9.904)
    assert track_value(cache, grid, TRACKS["shrink_rss_change"], *vmem) == pytest.approx(-51.0)
    assert track_value(cache, grid, TRACKS["shrink_pages_migrated"], *vmem) == 71680  # 256s
    balloon = ("balloon", "256 MiB", "idle")
    first = balloon_cell().steps[0].guest_latency_s
    assert track_value(cache, grid, TRACKS["shrink_latency"], *balloon) == pytest.approx(
        quantize((first + 3.0) / 2, 0.002)
    )
    assert ok_steps(cache, grid, "shrink", *vmem) == 1  # the failed cell's is not one
    assert ok_steps(cache, grid, "shrink", *balloon) == 2
    # not a scenario of the suite; a figure that does not apply: n/a, not a failure
    assert math.isnan(
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "256 MiB", "stress 60%")
    )
    assert math.isnan(track_value(cache, grid, TRACKS["shrink_workload_stall"], *balloon))
    assert math.isnan(
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "1 GiB", "idle")
    )


def test_values_are_rounded_to_what_the_metric_resolves():
    assert quantize(0.001, 0.02) == 0.0 and quantize(-0.001, 0.02) == 0.0
    assert quantize(0.051, 0.02) == pytest.approx(0.06) and quantize(71770, 256) == 71680


def test_failures_are_counted_and_a_point_with_no_success_fails(tmp_path, run_dir):
    cache = cache_of(run_dir)
    grid = grid_of(load_suite_text(TWO, "two.toml"))
    assert failure_share(cache, grid, "virtio-mem/sbm", "stress 60%") == 0.5
    assert failure_share(cache, grid, "balloon", "idle") == 0.0
    balloon = balloon_cell()
    balloon.steps[0].outcome = "timeout"
    bad = make_run(
        tmp_path / "bad", [balloon, failed(balloon, 2, "QEMU exited"), *two_vmem_cells()]
    )
    cache = cache_of(bad)
    with pytest.raises(RuntimeError, match=r"balloon-idle-r2: QEMU exited.*shrink 256M: timeout"):
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "256 MiB", "idle")
    # 4 resizes: a timed-out shrink, an ok grow of that cell, and the failed cell's two.
    assert failure_share(cache, grid, "balloon", "idle") == 0.75


def two_vmem_cells() -> list[CellRecord]:
    vmem = fixture_cell("cell-virtio-mem-stress.json")
    return [vmem, renamed(vmem, 2)]


def test_unfinished_cells_are_reported(tmp_path):
    cache = cache_of(make_run(tmp_path, two_vmem_cells()))
    assert cache.problems == [
        "cell balloon-idle-r1 never finished",
        "cell balloon-idle-r2 never finished",
    ]


def test_thresholds_come_from_night_to_night_noise_or_the_run(run_dir):
    cache = cache_of(run_dir)
    assert night_to_night_noise([[1.0, 1.1, 1.0, 1.1]], 0.002) == pytest.approx(0.1, rel=0.1)
    assert night_to_night_noise([[1.0, 2.0]], 0.002) is None  # too few nights
    # A series around zero is measured against the metric's resolution, never divided by 0.
    assert night_to_night_noise([[0.0, 0.01, 0.0, 0.01]], 0.02) == pytest.approx(0.5)
    history = {"shrink_latency": [[1.0, 1.3, 1.0, 1.3, 1.0]]}
    out = thresholds(cache, history)
    assert out[r".*\.track_shrink_latency\b"] == pytest.approx(2 * (0.3 + 0.3 / 1.3) / 2, abs=1e-3)
    ok_steps = out.pop(r".*\.track_ok_steps_")
    assert ok_steps == 100.0  # informational: never a regression
    assert all(0.05 <= v <= 1.0 for v in out.values())
    assert len(out) == len(TRACKS)


def test_discovery_reads_the_suite_and_boots_nothing(monkeypatch, run_dir):
    def no_boot(*args, **kwargs):
        raise AssertionError("discovery booted a guest")

    monkeypatch.setattr(runner, "run_suite", no_boot)
    monkeypatch.setattr(tracks, "load_cache", no_boot)
    for env, mechs in ((None, 3), (str(run_dir), 2)):
        if env:
            monkeypatch.setenv(tracks.ENV_RAW, env)
        spec = importlib.util.spec_from_file_location("bench_resize_under_test", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[spec.name]
        assert len(module.ShrinkLatency.params[0]) == mechs
        assert module.ShrinkLatency.unit == "seconds"
        assert module.ShrinkLatency.track_shrink_latency.pretty_name == "Shrink latency"
        assert module.Failures.param_names == ["mechanism", "workload"]
        assert module.OkSteps.unit == "ok steps"
