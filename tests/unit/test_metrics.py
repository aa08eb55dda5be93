"""The metric table: real records captured from quick runs (TCG), plus small typed ones for
what a clean run rarely shows. The one rule: cost and latency figures only from ok steps
of ok cells; failures counted, never dropped."""

import dataclasses

import pytest
from dynamem.analysis.metrics import METRICS, NOT_RUN, outcome_counts, tidy, usable

from .records import cell, condition, fixture_cell, quick_pair


@pytest.fixture
def cells():
    return [fixture_cell("cell-virtio-mem-stress.json"), fixture_cell("cell-balloon-idle.json")]


def test_rows_carry_the_figures_of_each_step(cells):
    t = tidy(cells, "run1")
    vmem = t[(t.scenario == "virtio-mem-stress") & (t.step == "shrink 256M")].set_index("metric")
    assert vmem.loc["pages_migrated", "value"] == 71770
    assert vmem.loc["swap_out_pages", "value"] == 82343
    assert vmem.loc["latency_guest_s", "value"] == pytest.approx(9.903858181)
    assert vmem.loc["rss_reclaimed_mib", "value"] == pytest.approx(53739520 / 2**20)
    assert vmem.loc["rss_reclaimed_share", "value"] == pytest.approx(53739520 / 2**28)
    # Fragmentation in DMA32, the zone every guest here has: 21 -> 1000 milli.
    assert vmem.loc["unusable_order9_change", "value"] == pytest.approx(0.979)
    # high watermarks: DMA +80, DMA32 +3394, Movable -3493 pages.
    assert vmem.loc["watermark_high_change_kib", "value"] == (80 + 3394 - 3493) * 4
    assert set(vmem["mechanism"]) == {"virtio-mem/sbm"} and set(vmem["run_id"]) == {"run1"}
    assert set(vmem["size_mib"]) == {256.0} and set(vmem["direction"]) == {"shrink"}
    assert set(vmem["workload"]) == {"stress"} and set(vmem["workload_mib"]) == {614.0}


def test_fragmentation_is_read_in_the_same_zone_for_every_guest():
    """A 3 GiB balloon guest has a Normal zone, a hotplug guest a Movable one: both are
    compared in DMA32, never each in its own 'main' zone."""
    vmem = fixture_cell("cell-virtio-mem-stress.json")
    zones = vmem.resizes()[0][1].cost.guest.fragmentation
    assert "Node0/Movable" in zones
    zones["Node0/Normal"] = dataclasses.replace(zones["Node0/DMA32"], unusable_order9=(0, 500))
    t = tidy([vmem])
    frag = t[(t.metric == "unusable_order9_change") & (t.step_index == 0)]
    assert frag["value"].iloc[0] == pytest.approx((1000 - 21) / 1000)  # DMA32's change
    assert "DMA32" in METRICS["unusable_order9_change"].label


def test_shrink_only_metrics_are_absent_on_grows(cells):
    grows = tidy(cells)[lambda t: t.direction == "grow"]
    assert not grows.empty
    assert not {"rss_reclaimed_mib", "rss_reclaimed_share", "rss_settle_s"} & set(grows.metric)


def test_every_row_names_its_condition_and_every_metric_is_known(cells):
    t = tidy(cells)
    assert set(t.metric) <= set(METRICS)
    assert (t.groupby("scenario").condition.nunique() == 1).all()
    assert set(t[t.scenario == "balloon-idle"].mechanism) == {"balloon"}


def test_a_failed_cell_is_counted_and_none_of_its_figures_is_usable():
    """The fixture's cell failed after an ok shrink (its workload died): the shrink's
    numbers stay in the table, labelled, and out of every statistic."""
    failed = fixture_cell("cell-balloon-fpr-free-failed.json")
    t = tidy([failed])
    assert set(t.cell_status) == {"failed"}
    assert t[t.metric == "latency_guest_s"].shape[0] == 1  # recorded ...
    assert usable(t).empty  # ... never used
    counts = outcome_counts(t)
    assert counts[["n", "ok", "cell_failed"]].values.tolist() == [[1, 0, 1]]


def test_partial_timed_out_and_skipped_steps_are_not_usable_but_counted():
    cells = [
        quick_pair("vmem", 1, 2.0, mechanism="virtio-mem", variant="sbm"),
        quick_pair(
            "vmem", 2, 0.5, mechanism="virtio-mem", variant="sbm", shrink_outcome="partial"
        ),  # fmt: skip
        quick_pair(
            "vmem", 3, 0.4, mechanism="virtio-mem", variant="sbm", shrink_outcome="timeout"
        ),  # fmt: skip
    ]
    cells[2].steps[1].outcome = "skipped"
    t = tidy(cells)
    shrink = usable(t)[lambda u: (u.metric == "latency_guest_s") & (u.direction == "shrink")]
    assert shrink["value"].tolist() == [2.0]  # the faster, failed resizes are not in it
    counts = outcome_counts(t).set_index("step")
    assert counts.loc["shrink 256M", ["n", "ok", "partial", "timeout"]].tolist() == [3, 1, 1, 1]
    assert counts.loc["grow 256M", ["n", "ok", "skipped"]].tolist() == [3, 2, 1]


def test_a_cell_that_failed_before_its_steps_still_counts_each_planned_resize():
    boot_failure = cell("vmem", 4, [], mechanism="virtio-mem", variant="sbm", status="failed",
                        error="boot: guest never ready")  # fmt: skip
    t = tidy([quick_pair("vmem", 1, 2.0, mechanism="virtio-mem", variant="sbm"), boot_failure])
    missing = t[t.cell == "vmem-r4"]
    assert missing[["step", "outcome", "metric", "value"]].values.tolist() == [
        ["shrink 256M", NOT_RUN, "succeeded", 0.0],
        ["grow 256M", NOT_RUN, "succeeded", 0.0],
    ]
    counts = outcome_counts(t).set_index("step")
    assert counts.loc["shrink 256M", ["n", "ok", "cell_failed"]].tolist() == [2, 1, 1]
    assert counts.loc["shrink 256M", "share"] == 0.5


def test_conditions_that_differ_in_any_field_are_different_conditions():
    a = quick_pair("a", 1, 1.0)
    b = quick_pair("b", 1, 1.0, cond=condition(kernel_args=("init_on_alloc=0",)))
    c = quick_pair("c", 1, 1.0, cond=condition(cpu_model="qemu64"))
    t = tidy([a, b, c])
    assert t.groupby("scenario").condition.first().nunique() == 3
    assert "init_on_alloc=0" in t[t.scenario == "b"].condition.iloc[0]


def test_the_run_summary_shows_the_guest_clock_duration():
    from dynamem.analysis.metrics import tidy

    from dynamem.runner import summary_rows

    from .records import quick_pair

    cells = [quick_pair("s", k, 1.0) for k in (1, 2, 3)]
    for c in cells:
        c.steps[0].guest_clock_s = 0.0975
    rows = summary_rows(tidy(cells), cells)
    assert rows[0][5] == "guest clock ms"
    shrink = next(r for r in rows if r[1] == "shrink 256M")
    assert shrink[2] == "3/3" and shrink[5] == "97.5"
    grow = next(r for r in rows if r[1] == "grow 256M")
    assert grow[5] == "-"  # none recorded: no number made up


def test_the_run_summary_prefers_the_duration_from_the_drivers_entry():
    from dynamem.analysis.metrics import driver_or_look, tidy

    from dynamem.runner import summary_rows

    from .records import quick_pair

    cells = [quick_pair("s", k, 1.0) for k in (1, 2, 3)]
    for c in cells:
        c.steps[0].guest_clock_s, c.steps[0].guest_driver_s = 0.0975, 0.1205
    table = tidy(cells)
    assert driver_or_look(table) == "latency_guest_driver_s"
    shrink = next(r for r in summary_rows(table, cells) if r[1] == "shrink 256M")
    assert shrink[5] == "120.5"
    for c in cells:
        c.steps[0].guest_driver_s = None
    assert driver_or_look(tidy(cells)) == "latency_guest_clock_s"
