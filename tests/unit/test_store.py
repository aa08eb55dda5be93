import dataclasses
import json
import shutil

import numpy as np
import pytest

from dynamem.errors import UserError
from dynamem.record import FORMAT_VERSION, to_json_data
from dynamem.scenario import load_suite_text
from dynamem.store import RunStore, atomic_write

from .records import FORMAT1_QUICK, QUICK_TOML, quick_pair, run_record

ONE = 'name = "s"\n[[scenario]]\nname = "a"\nmechanism = "balloon"\nsteps = ["shrink 4K"]\n'


def one_run(order=None, toml=ONE):
    from dynamem import runner

    if order is None:
        order = [c.id for c in runner.cells_in_order(load_suite_text(toml, "s"), 20261126)]
    return run_record(order, toml)


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write(tmp_path / "a.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_create_refuses_a_used_directory(tmp_path):
    RunStore.create(tmp_path / "run", run_record([]))
    with pytest.raises(UserError, match="not empty; use --resume"):
        RunStore.create(tmp_path / "run", run_record([]))


def test_format_version_is_checked(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"format": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match=f"results format {FORMAT_VERSION + 1}"):
        RunStore.open(tmp_path)
    with pytest.raises(UserError, match="not a dynamem run"):
        RunStore.open(tmp_path / "nothing")


def test_cells_round_trip_with_their_series_and_corrupt_ones_are_reported(tmp_path):
    store = RunStore.create(tmp_path / "run", run_record(["s-r1", "b-r1"]))
    record = quick_pair("s", 1, 1.0)
    record.steps[0].series["guest_t_ns"] = np.arange(3)
    store.write_cell(record)
    (store.cells_dir / "b-r1.json").write_text("{half a rec")
    assert store.completed() == {"s-r1", "b-r1"}
    cells, problems = RunStore.open(tmp_path / "run").load_cells()
    record.steps[0].series.clear()
    assert cells == [record]
    assert len(problems) == 1 and problems[0].startswith("b-r1.json")
    series = store.load_series("s-r1", 0)
    assert series["guest_t_ns"].tolist() == [0, 1, 2] and "t_request_ns" in series


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(status="fine"), "status: Input should be 'ok' or 'failed'"),
        (lambda d: d.update(repeat="1x"), "repeat: Input should be a valid integer"),
        (lambda d: d.update(steps={}), "steps: Input should be a valid list"),
        (lambda d: d["steps"][0].pop("kind"), "steps.0: Unable to extract tag using discrimin"),
        (lambda d: d["timings"].update(total="long"), "timings.total: Input should be a valid"),
        (lambda d: d.update(cell="b-r1"), "record of cell 'b-r1' in the file of 's-r1'"),
        (lambda d: d.update(scenario=None), "scenario: Input should be a valid string"),
        (lambda d: d.pop("condition"), "condition: Field required"),
    ],
)
def test_a_record_that_fails_validation_is_reported_not_skipped(tmp_path, change, problem):
    store = RunStore.create(tmp_path / "run", run_record(["s-r1"]))
    data = to_json_data(quick_pair("s", 1, 1.0))
    change(data)
    atomic_write(store.cells_dir / "s-r1.json", json.dumps(data).encode())
    cells, problems = store.load_cells()
    assert cells == []
    assert len(problems) == 1 and problems[0].startswith("s-r1.json: ")
    assert problem in problems[0] and "\n" not in problems[0]


def test_records_that_are_not_objects_are_reported(tmp_path):
    store = RunStore.create(tmp_path / "run", run_record(["a-r1"]))
    (store.cells_dir / "a-r1.json").write_text("[1, 2]")
    assert store.load_cells()[1] == ["a-r1.json: not a JSON object but list"]


def test_a_resume_reports_unreadable_records_and_runs_those_cells_again(tmp_path, monkeypatch):
    from dynamem import runner

    run = one_run()
    store = RunStore.create(tmp_path / "run", run)
    good, bad = run.order[0], run.order[1]
    store.write_cell(dataclasses.replace(quick_pair("a", int(good[3:]), 1.0), cell=good))
    (store.cells_dir / f"{bad}.json").write_text('{"scenario": "a", "format": 2}')
    ran = []

    def fake_cell(cell, **kw):
        ran.append(cell.id)
        return dataclasses.replace(quick_pair("a", cell.repeat, 1.0), cell=cell.id)

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    reports: list[str] = []
    cells = runner.run_suite(store, accel_request="tcg", qemu="q", guest="g", report=reports.append)
    assert len(reports) == 1 and reports[0].startswith(f"unreadable cell record {bad}.json: ")
    assert reports[0].endswith("set aside as .invalid, the cell runs again")
    assert ran == [c for c in run.order if c != good]  # the good one is not redone
    assert sorted(c.cell for c in cells) == sorted(run.order)
    assert (store.cells_dir / f"{bad}.json.invalid").read_text() == '{"scenario": "a", "format": 2}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "run.json is corrupt"),
        ("[1]", "not a JSON object but list"),
        (json.dumps({"format": FORMAT_VERSION, "run_id": "x"}), "created: Field required"),
        (json.dumps({"run_id": "x", "order": []}), "results format None"),
    ],
)
def test_a_corrupt_run_json_is_a_clean_error(tmp_path, text, message):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(UserError, match=message):
        RunStore.open(tmp_path)


def test_resume_refuses_a_run_whose_order_does_not_match_its_suite():
    from dynamem import runner

    with pytest.raises(UserError, match="order does not match its suite"):
        runner.suite_of(one_run(order=["zzz-r1"]))


def test_a_format1_run_opens_and_reads_but_is_never_written(tmp_path):
    shutil.copytree(FORMAT1_QUICK, tmp_path / "old")
    store = RunStore.open(tmp_path / "old")
    assert store.format == 1 and store.run.run_id == "20261129-230451-quick"
    cells, problems = store.load_cells()
    assert problems == [] and len(cells) == 30
    with pytest.raises(UserError, match="holds format 1 results"):
        store.write_cell(cells[0])


def test_disk_full_stops_the_run_cleanly_and_keeps_what_was_written(tiny_fs, monkeypatch):
    from dynamem import runner

    two = ONE + '[[scenario]]\nname = "b"\nmechanism = "balloon"\nsteps = ["shrink 4K"]\n'
    run = one_run(toml=two)
    store = RunStore.create(tiny_fs / "run", run)
    # A cell's series that fits once (random: compression cannot shrink it), then not again.
    rng = np.random.default_rng(1)
    calls = []

    def fake_cell(cell, **kw):
        calls.append(cell.id)
        record = dataclasses.replace(quick_pair(cell.scenario.name, cell.repeat, 1.0))
        record.steps[0].series["x"] = rng.integers(0, 2**62, 4000)  # ~32 KiB of the 64 KiB
        return record

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    with pytest.raises(UserError, match="No space left on device") as err:
        runner.run_suite(store, accel_request="tcg", qemu="q", guest="g", report=lambda m: None)
    assert "\n" not in str(err.value) and "dynamem run --resume" in str(err.value)
    assert len(calls) == 2
    # The first cell is complete and valid, the second is not marked complete, no temporaries.
    reopened = RunStore.open(tiny_fs / "run")
    assert reopened.completed() == {calls[0]}
    cells, problems = reopened.load_cells()
    assert problems == [] and [c.cell for c in cells] == [calls[0]]
    assert not [p.name for p in reopened.cells_dir.iterdir() if p.name.startswith(".")]


def test_a_run_directory_that_cannot_be_written_is_a_clean_error(tiny_fs):
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(UserError, match="cannot write the run directory .*Read-only file system"):
        RunStore.create(tiny_fs / "run", run_record([]))


def test_quick_toml_fixture_is_a_valid_suite():
    assert len(load_suite_text(QUICK_TOML, "q").scenarios) == 2


def test_a_run_resumes_only_under_the_accelerator_it_recorded(tmp_path):
    import pytest

    from dynamem import runner
    from dynamem.errors import UserError

    from .records import run_record

    store = RunStore.create(tmp_path / "r", run_record(["balloon-idle-r1"], accel="tcg-icount"))
    with pytest.raises(UserError, match="recorded under tcg-icount; --accel tcg would mix"):
        runner.run_suite(store, accel_request="tcg", qemu="qemu-system-x86_64", guest="minimal")
