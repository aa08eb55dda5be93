import json

import numpy as np
import pytest

from dynamem.errors import UserError
from dynamem.runner import format_table, summary_rows
from dynamem.scenario import load_suite_text
from dynamem.store import FORMAT_VERSION, RunStore, atomic_write


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write(tmp_path / "a.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_create_refuses_a_used_directory(tmp_path):
    RunStore.create(tmp_path / "run", {"run_id": "x", "order": []})
    with pytest.raises(UserError, match="not empty; use --resume"):
        RunStore.create(tmp_path / "run", {"run_id": "x", "order": []})


def test_format_version_is_checked(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"format": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="results format 2"):
        RunStore.open(tmp_path)
    with pytest.raises(UserError, match="not a dynamem run"):
        RunStore.open(tmp_path / "nothing")


def test_cells_round_trip_and_corrupt_ones_are_reported(tmp_path):
    store = RunStore.create(tmp_path / "run", {"run_id": "x", "order": ["a-r1", "b-r1"]})
    record = {"scenario": "a", "repeat": 1, "status": "ok", "error": "", "steps": [], "timings": {}}
    store.write_cell("a-r1", record, [{"t_ns": np.arange(3)}])
    (store.cells_dir / "b-r1.json").write_text("{half a rec")
    assert store.completed() == {"a-r1", "b-r1"}
    cells, problems = RunStore.open(tmp_path / "run").load_cells()
    assert cells == [record]
    assert len(problems) == 1 and problems[0].startswith("b-r1.json")
    assert store.load_series("a-r1", 0)["t_ns"].tolist() == [0, 1, 2]


def test_summary_table():
    step = {
        "kind": "resize",
        "step": "shrink 256M",
        "outcome": "ok",
        "host_latency_s": 0.5,
        "guest_latency_s": 0.52,
        "figures": {"guest": {"pages_migrated": 10}, "host": {"rss_reclaimed_bytes": 2 << 20}},
    }
    cells = [
        {"scenario": "s", "status": "ok", "steps": [step, {**step, "outcome": "partial"}]},
        {"scenario": "f", "status": "failed", "steps": []},
    ]
    rows = summary_rows(cells)
    assert rows[1][:4] == ["s", "shrink 256M", "1/1", "500.0"]
    assert rows[-1][:3] == ["f", "(cells failed)", "0/1"]
    assert "scenario" in format_table(rows).splitlines()[0]


GOOD_CELL = {
    "scenario": "a",
    "repeat": 1,
    "cell": "a-r1",
    "status": "ok",
    "error": "",
    "steps": [{"kind": "resize", "outcome": "ok"}],
    "timings": {"total": 1.0},
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"status": "fine"}, "status 'fine' is not one of ok, failed"),
        ({"repeat": "1"}, "repeat is str, expected int"),
        ({"repeat": True}, "repeat is bool, expected int"),
        ({"steps": {}}, "steps is dict, expected list"),
        ({"steps": [{"outcome": "ok"}]}, "a step is not an object with a kind"),
        ({"timings": {"total": "long"}}, "timings must be numbers"),
        ({"cell": "b-r1"}, "record of cell 'b-r1' in the file of 'a-r1'"),
        ({"scenario": None}, "scenario is NoneType, expected str"),
    ],
)
def test_a_record_that_fails_validation_is_reported_not_skipped(tmp_path, change, problem):
    store = RunStore.create(tmp_path / "run", {"run_id": "x", "order": ["a-r1"]})
    store.write_cell("a-r1", {**GOOD_CELL, **change}, [])
    cells, problems = store.load_cells()
    assert cells == []
    assert problems == [f"a-r1.json: {problem}"]


def test_records_that_are_not_objects_or_lack_keys_are_reported(tmp_path):
    store = RunStore.create(tmp_path / "run", {"run_id": "x", "order": ["a-r1", "b-r1"]})
    (store.cells_dir / "a-r1.json").write_text("[1, 2]")
    incomplete = {k: v for k, v in GOOD_CELL.items() if k != "timings"}
    store.write_cell("b-r1", {**incomplete, "cell": "b-r1"}, [])
    _, problems = store.load_cells()
    assert problems == ["a-r1.json: not a JSON object but list", "b-r1.json: missing key 'timings'"]


def test_a_resume_reports_unreadable_records_and_runs_those_cells_again(tmp_path, monkeypatch):
    from dynamem import runner

    suite = 'name = "s"\n[[scenario]]\nname = "a"\nmechanism = "balloon"\nsteps = ["shrink 4K"]\n'
    run = {"run_id": "x", "seed": 1, "suite": {"name": "s", "toml": suite}}
    run["order"] = [c.id for c in runner.cells_in_order(load_suite_text(suite, "s"), 1)]
    store = RunStore.create(tmp_path / "run", run)
    good, bad = run["order"][0], run["order"][1]
    store.write_cell(good, {**GOOD_CELL, "cell": good}, [])
    (store.cells_dir / f"{bad}.json").write_text('{"scenario": "a"}')
    ran = []

    def fake_cell(cell, **kw):
        ran.append(cell.id)
        return {**GOOD_CELL, "cell": cell.id, "repeat": cell.repeat}, []

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    reports: list[str] = []
    cells = runner.run_suite(store, accel_request="tcg", qemu="q", guest="g", report=reports.append)
    assert reports == [
        f"unreadable cell record {bad}.json: missing key 'repeat'; set aside as .invalid, "
        "the cell runs again"
    ]
    assert ran == [c for c in run["order"] if c != good]  # the good one is not redone
    assert sorted(c["cell"] for c in cells) == sorted(run["order"])
    assert (store.cells_dir / f"{bad}.json.invalid").read_text() == '{"scenario": "a"}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "run.json is corrupt"),
        ("[1]", "results format None"),
        (json.dumps({"format": FORMAT_VERSION, "run_id": "x"}), "corrupt: no order"),
        (json.dumps({"run_id": "x", "order": []}), "results format None"),
    ],
)
def test_a_corrupt_run_json_is_a_clean_error(tmp_path, text, message):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(UserError, match=message):
        RunStore.open(tmp_path)


def test_resume_refuses_a_run_whose_order_does_not_match_its_suite(tmp_path):
    from dynamem import runner

    suite = 'name = "s"\n[[scenario]]\nname = "a"\nmechanism = "balloon"\nsteps = ["shrink 4K"]\n'
    run = {"run_id": "x", "order": ["zzz-r1"], "seed": 1, "suite": {"name": "s", "toml": suite}}
    with pytest.raises(UserError, match="order does not match its suite"):
        runner.suite_of(run)
    with pytest.raises(UserError, match="holds no suite and seed"):
        runner.suite_of({"run_id": "x", "order": []})


def test_disk_full_stops_the_run_cleanly_and_keeps_what_was_written(tiny_fs, monkeypatch):
    from dynamem import runner

    suite = (
        'name = "s"\n[defaults]\nmechanism = "balloon"\nsteps = ["shrink 4K"]\n'
        '[[scenario]]\nname = "a"\n[[scenario]]\nname = "b"\n'
    )
    run = {"run_id": "x", "seed": 1, "suite": {"name": "s", "toml": suite}}
    run["order"] = [c.id for c in runner.cells_in_order(load_suite_text(suite, "s"), 1)]
    store = RunStore.create(tiny_fs / "run", run)
    # A cell's series that fits once (random: compression cannot shrink it), then not again.
    rng = np.random.default_rng(1)
    calls = []

    def fake_cell(cell, **kw):
        calls.append(cell.id)
        record = {**GOOD_CELL, "scenario": cell.scenario.name, "cell": cell.id}
        return record, [{"x": rng.integers(0, 2**62, 4000)}]  # ~32 KiB of the 64 KiB

    monkeypatch.setattr(runner, "run_cell", fake_cell)
    with pytest.raises(UserError, match="No space left on device") as err:
        runner.run_suite(store, accel_request="tcg", qemu="q", guest="g", report=lambda m: None)
    assert "\n" not in str(err.value) and "dynamem run --resume" in str(err.value)
    assert len(calls) == 2
    # The first cell is complete and valid, the second is not marked complete, no temporaries.
    reopened = RunStore.open(tiny_fs / "run")
    assert reopened.completed() == {calls[0]}
    cells, problems = reopened.load_cells()
    assert problems == [] and [c["cell"] for c in cells] == [calls[0]]
    assert not [p.name for p in reopened.cells_dir.iterdir() if p.name.startswith(".")]


def test_a_run_directory_that_cannot_be_written_is_a_clean_error(tiny_fs):
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(UserError, match="cannot write the run directory .*Read-only file system"):
        RunStore.create(tiny_fs / "run", {"run_id": "x", "order": []})
