"""The asv suite's grid and values, from cell records captured from a real quick run."""

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from dynamem import benchdata, runner
from dynamem.benchdata import TRACKS, Track, cache_of, failure_share, grid_of, track_value
from dynamem.errors import UserError
from dynamem.scenario import load_suite, load_suite_text
from dynamem.store import RunStore

FIXTURES = Path(__file__).parents[1] / "fixtures"
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


def fixture_cell(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def failed(cell: dict, repeat: int, error: str) -> dict:
    out = copy.deepcopy(cell)
    out.update(repeat=repeat, cell=f"{cell['scenario']}-r{repeat}", status="failed", error=error)
    out["steps"] = []
    return out


def make_run(tmp_path: Path, cells: list[dict]) -> Path:
    suite = load_suite_text(TWO, "two.toml")
    store = RunStore.create(tmp_path / "run", runner.new_run(suite, 1, {"accel": "tcg"}))
    for cell in cells:
        store.write_cell(cell["cell"], cell, [])
    return store.directory


@pytest.fixture
def run_dir(tmp_path):
    vmem = fixture_cell("cell-virtio-mem-stress.json")
    balloon = fixture_cell("cell-balloon-idle.json")
    second = copy.deepcopy(balloon)
    second.update(repeat=2, cell="balloon-idle-r2")
    second["steps"][0]["guest_latency_s"] = 3.0
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
    assert track_value(cache, grid, TRACKS["shrink_latency"], *vmem) == pytest.approx(9.903858181)
    assert track_value(cache, grid, TRACKS["shrink_rss_change"], *vmem) == pytest.approx(
        -53739520 / 2**20
    )
    assert track_value(cache, grid, TRACKS["shrink_pages_migrated"], *vmem) == 71770
    balloon = ("balloon", "256 MiB", "idle")
    first = fixture_cell("cell-balloon-idle.json")["steps"][0]["guest_latency_s"]
    assert track_value(cache, grid, TRACKS["shrink_latency"], *balloon) == pytest.approx(
        (first + 3.0) / 2
    )
    # not a scenario of the suite; a figure that does not apply: n/a, not a failure
    assert math.isnan(
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "256 MiB", "stress 60%")
    )
    assert math.isnan(track_value(cache, grid, TRACKS["shrink_workload_stall"], *balloon))
    assert math.isnan(
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "1 GiB", "idle")
    )


def test_failures_are_counted_and_a_point_with_no_success_fails(tmp_path, run_dir):
    cache = cache_of(run_dir)
    grid = grid_of(load_suite_text(TWO, "two.toml"))
    assert failure_share(cache, grid, "virtio-mem/sbm", "stress 60%") == 0.5
    assert failure_share(cache, grid, "balloon", "idle") == 0.0
    balloon = fixture_cell("cell-balloon-idle.json")
    balloon["steps"][0]["outcome"] = "timeout"
    bad = make_run(
        tmp_path / "bad", [balloon, failed(balloon, 2, "QEMU exited"), *two_vmem_cells()]
    )
    cache = cache_of(bad)
    with pytest.raises(RuntimeError, match=r"balloon-idle-r2: QEMU exited.*shrink 256M: timeout"):
        track_value(cache, grid, TRACKS["shrink_latency"], "balloon", "256 MiB", "idle")
    assert failure_share(cache, grid, "balloon", "idle") == 1.0


def two_vmem_cells() -> list[dict]:
    vmem = fixture_cell("cell-virtio-mem-stress.json")
    second = copy.deepcopy(vmem)
    second.update(repeat=2, cell="virtio-mem-stress-r2")
    return [vmem, second]


def test_unfinished_cells_are_reported(tmp_path):
    cache = cache_of(make_run(tmp_path, two_vmem_cells()))
    assert cache.problems == [
        "cell balloon-idle-r1 never finished",
        "cell balloon-idle-r2 never finished",
    ]


def test_discovery_reads_the_suite_and_boots_nothing(monkeypatch, run_dir):
    def no_boot(*args, **kwargs):
        raise AssertionError("discovery booted a guest")

    monkeypatch.setattr(runner, "run_suite", no_boot)
    monkeypatch.setattr(benchdata, "load_cache", no_boot)
    for env, mechs in ((None, 3), (str(run_dir), 2)):
        if env:
            monkeypatch.setenv(benchdata.ENV_RAW, env)
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
