"""The typed record: every format-1 record ever written loads, round trips, and a record
that does not fit the types is refused with one line naming the field."""

import json

import pytest

from dynamem.record import (
    FORMAT_VERSION,
    FreeStep,
    ResizeStep,
    SettleStep,
    load_cell,
    load_run,
    to_json_data,
)

from .records import FIXTURES, FORMAT1_QUICK, cell, fixture_cell, quick_pair

FORMAT1_CELLS = [
    "cell-balloon-idle.json",
    "cell-balloon-fpr-free-failed.json",
    "cell-balloon-impact.json",
    "cell-virtio-mem-reboot.json",
    "cell-virtio-mem-stress.json",
]


@pytest.mark.parametrize("name", FORMAT1_CELLS)
def test_every_format1_fixture_upgrades_and_round_trips(name):
    record = fixture_cell(name)
    assert record.format == FORMAT_VERSION
    again = load_cell(json.loads(json.dumps(to_json_data(record))), cell_id=record.cell)
    assert again == record


def test_a_format1_cell_gets_its_condition_from_its_scenario():
    record = fixture_cell("cell-virtio-mem-stress.json")
    c = record.condition
    assert (c.memory, c.workload, c.workload_size) == (1 << 30, "stress", 614 << 20)
    assert (c.swap, c.swap_size, c.cpu_model, c.accel) == ("disk", 512 << 20, "max", "tcg")
    assert c.steps == ("shrink 256M", "grow 256M") and c.observer == "dense"
    assert record.mechanism.label == "virtio-mem/sbm"
    shrink = record.resizes()[0][1]
    assert shrink.cost.guest is not None and shrink.cost.guest.pages_migrated == 71770
    assert shrink.cost.host is not None and shrink.cost.host.rss_reclaimed_bytes == 53739520


def test_format1_steps_of_every_kind_are_typed():
    free = fixture_cell("cell-balloon-fpr-free-failed.json")
    assert free.status == "failed" and free.mechanism.label == "balloon/fpr"
    assert any(isinstance(s, FreeStep) for s in free.steps)
    study = fixture_cell("cell-balloon-idle.json")
    assert all(isinstance(s, ResizeStep | SettleStep) for s in study.steps)


def test_every_cell_of_a_real_format1_run_loads():
    run = json.loads((FORMAT1_QUICK / "run.json").read_text())
    assert load_run(run).format == FORMAT_VERSION
    paths = sorted((FORMAT1_QUICK / "cells").glob("*.json"))
    assert len(paths) == 30
    for path in paths:
        record = load_cell(json.loads(path.read_text()), run, path.stem)
        assert record.cell == path.stem and len(record.condition.steps) == 2


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(status="fine"), "status: Input should be 'ok' or 'failed'"),
        (lambda d: d.update(repeat="one"), "repeat: Input should be a valid integer"),
        (lambda d: d.update(colour="red"), "colour: Unexpected keyword argument"),
        (lambda d: d["steps"][0].update(outcome="great"), "steps.0.resize.outcome"),
        (lambda d: d["steps"][0].update(kind="nap"), "steps.0: Input tag 'nap'"),
        (lambda d: d["steps"][0]["cost"]["guest"].pop("pages_migrated"), "pages_migrated"),
    ],
)
def test_a_record_that_does_not_fit_is_refused_in_one_line(change, problem):
    data = to_json_data(quick_pair("s", 1, 1.0))
    change(data)
    with pytest.raises(ValueError, match=problem) as info:
        load_cell(data)
    assert "\n" not in str(info.value)


def test_unknown_formats_are_refused():
    data = to_json_data(cell("s", 1, []))
    data["format"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"cell format {FORMAT_VERSION + 1}"):
        load_cell(data)
    with pytest.raises(ValueError, match="results format 7"):
        load_run({"format": 7})


def test_transient_series_stay_out_of_the_json():
    step = quick_pair("s", 1, 1.0).steps[0]
    assert isinstance(step, ResizeStep)
    step.series["guest_t_ns"] = [1, 2]
    assert "series" not in to_json_data(step)


def test_fixture_files_are_format_1():
    for name in FORMAT1_CELLS:
        assert "format" not in json.loads((FIXTURES / name).read_text())


def test_format1_resizes_attempted_off_the_planned_path_become_skipped():
    """In the quick run at 115d3f6 a DIMM shrink under stress stalled half-way, and the grow
    after it asked for two DIMMs with one slot free ('refused'): not the mechanism's no."""
    run = json.loads((FORMAT1_QUICK / "run.json").read_text())
    path = FORMAT1_QUICK / "cells" / "dimm-stress-r1.json"
    record = load_cell(json.loads(path.read_text()), run, path.stem)
    shrink, grow = (s for _, s in record.resizes())
    assert shrink.outcome == "partial"
    assert grow.outcome == "skipped" and "format 1 recorded it as refused" in grow.message
