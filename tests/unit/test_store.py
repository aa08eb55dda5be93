import json

import numpy as np
import pytest

from dynamem.errors import UserError
from dynamem.runner import format_table, summary_rows
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
    record = {"scenario": "a", "repeat": 1, "status": "ok", "steps": []}
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
