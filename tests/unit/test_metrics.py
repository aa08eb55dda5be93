"""The tidy metric table, from cell records captured from a real quick run (TCG)."""

import json
from pathlib import Path

import pytest

from dynamem.analysis.metrics import METRICS, main_zone, tidy

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def cells():
    return [
        json.loads((FIXTURES / name).read_text())
        for name in ("cell-virtio-mem-stress.json", "cell-balloon-idle.json")
    ]


def test_rows_carry_the_figures_of_each_step(cells):
    t = tidy(cells, "run1")
    vmem = t[(t.scenario == "virtio-mem-stress") & (t.step == "shrink 256M")].set_index("metric")
    assert vmem.loc["pages_migrated", "value"] == 71770
    assert vmem.loc["swap_out_pages", "value"] == 82343
    assert vmem.loc["latency_guest_s", "value"] == pytest.approx(9.903858181)
    assert vmem.loc["rss_reclaimed_mib", "value"] == pytest.approx(53739520 / 2**20)
    assert vmem.loc["rss_reclaimed_share", "value"] == pytest.approx(53739520 / 2**28)
    # DMA32 is the main zone of a 1 GiB guest: 21 -> 1000 milli.
    assert vmem.loc["unusable_order9_change", "value"] == pytest.approx(0.979)
    # high watermarks: DMA +80, DMA32 +3394, Movable -3493 pages.
    assert vmem.loc["watermark_high_change_kib", "value"] == (80 + 3394 - 3493) * 4
    assert set(vmem["mechanism"]) == {"virtio-mem/sbm"} and set(vmem["run_id"]) == {"run1"}
    assert set(vmem["size_mib"]) == {256.0} and set(vmem["direction"]) == {"shrink"}


def test_shrink_only_metrics_are_absent_on_grows(cells):
    t = tidy(cells)
    grows = t[t.direction == "grow"]
    assert not grows.empty
    assert not {"rss_reclaimed_mib", "rss_reclaimed_share", "rss_settle_s"} & set(grows.metric)


def test_balloon_label_has_no_variant_and_every_metric_is_known(cells):
    t = tidy(cells)
    assert set(t[t.scenario == "balloon-idle"].mechanism) == {"balloon"}
    assert set(t.metric) <= set(METRICS)


def test_main_zone_prefers_normal():
    assert main_zone({"Node0/DMA": 0, "Node0/DMA32": 0, "Node0/Normal": 0}) == "Node0/Normal"
    assert main_zone({"Node0/DMA": 0, "Node0/DMA32": 0}) == "Node0/DMA32"
    assert main_zone({"Node0/Movable": 0}) is None
