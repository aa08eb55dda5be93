"""Compare verdicts on synthetic tables, and a report built from records of a real run."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynamem.analysis.compare import Thresholds, check_comparable, compare_tables, regressed
from dynamem.analysis.report import build_report
from dynamem.errors import UserError
from dynamem.store import RunStore

FIXTURES = Path(__file__).parents[1] / "fixtures"


def table(latencies, metric="latency_guest_s"):
    return pd.DataFrame(
        {
            "scenario": "s",
            "step_index": 0,
            "step": "shrink 256M",
            "metric": metric,
            "value": latencies,
        }  # fmt: skip
    )


def test_same_numbers_are_no_change_and_a_doubling_is_slower():
    rng = np.random.default_rng(1)
    base = 1.0 + 0.03 * rng.standard_normal(5)
    same = compare_tables(table(base), table(base * (1 + 0.01 * rng.standard_normal(5))))
    assert same["verdict"].tolist() == ["no significant change"] and not regressed(same)
    slow = compare_tables(table(base), table(2 * base))
    assert slow["verdict"].tolist() == ["slower"] and regressed(slow)
    assert slow["ratio"].iloc[0] == pytest.approx(2.0)
    assert slow["ci_low"].iloc[0] < 2.0 < slow["ci_high"].iloc[0]
    fast = compare_tables(table(base), table(base / 2))
    assert fast["verdict"].tolist() == ["faster"] and not regressed(fast)


def test_noise_threshold_and_higher_is_better_metrics():
    base = np.array([1.0, 1.001, 0.999, 1.0005, 0.9995])
    small = compare_tables(table(base), table(base * 1.05), Thresholds(noise=0.10))
    assert small["verdict"].tolist() == ["no significant change"]  # significant, but < 10%
    share = compare_tables(table(base, "rss_reclaimed_share"),
                           table(base / 2, "rss_reclaimed_share"))  # fmt: skip
    assert share["verdict"].tolist() == ["worse"]


def test_counts_with_zeros_are_listed_not_tested():
    t = compare_tables(table([0.0, 0, 0], "pages_migrated"), table([5.0, 0, 9], "pages_migrated"))
    assert t["verdict"].tolist() == ["not compared"] and "zeros" in t["note"].iloc[0]


def test_mixed_runs_are_refused_unless_allowed():
    a = {"run_id": "a", "metadata": {"accel": "tcg", "qemu_version": "7.2.22"}}
    b = {"run_id": "b", "metadata": {"accel": "kvm", "qemu_version": "7.2.22"}}
    with pytest.raises(UserError, match="accel 'tcg' vs 'kvm'.*--allow-mixed"):
        check_comparable(a, b, allow_mixed=False)
    assert check_comparable(a, b, allow_mixed=True) == ["accel 'tcg' vs 'kvm'"]


def test_report_from_real_records(tmp_path):
    run = json.loads((FIXTURES / "run-quick.json").read_text())
    store = RunStore.create(tmp_path / "run", {k: v for k, v in run.items() if k != "format"})
    for name in ("cell-virtio-mem-stress.json", "cell-balloon-idle.json"):
        record = json.loads((FIXTURES / name).read_text())
        store.write_cell(record["cell"], record, [])
    (store.cells_dir / "broken.json").write_text("{")
    md_path, html_path = build_report(store, tmp_path / "out")
    md = md_path.read_text()
    assert "**tcg**" in md and "6.1.0-56-amd64" in md
    assert "unreadable record broken.json" in md  # reported, never skipped silently
    assert "| shrink latency (stress) | - | 9.90 s" in md  # no balloon under stress here
    for k in range(1, 14):
        assert f"### {k}." in md
    assert "balloon 0% of 2; virtio-mem/sbm 100% of 2" in md  # watermarks moved
    page = html_path.read_text()
    assert "<table>" in page and page.count("<img") >= 4
    for img in ("latency.png", "watermarks.png", "rss_reclaimed.png", "fragmentation.png"):
        assert (tmp_path / "out" / img).stat().st_size > 10_000


def test_report_covers_impact_free_reboot_and_failed_cells(tmp_path):
    """Records of other real cells: the impact workload, a free step (in a cell that
    failed), a reboot; variant labels outside the main four get colours too."""
    run = json.loads((FIXTURES / "run-quick.json").read_text())
    store = RunStore.create(tmp_path / "run", {k: v for k, v in run.items() if k != "format"})
    names = [
        "cell-balloon-impact.json",
        "cell-balloon-fpr-free-failed.json",
        "cell-virtio-mem-reboot.json",
        "cell-virtio-mem-stress.json",
    ]
    for name in names:
        record = json.loads((FIXTURES / name).read_text())
        store.write_cell(record["cell"], record, [])
    md = build_report(store, tmp_path / "out")[0].read_text()
    assert "1 failed" in md and "workload stress died" in md
    assert "`vmem-reboot-r1` (virtio-mem): host-side memory" in md
    assert "`fpr-free-r1` (balloon): RSS released" in md
    assert "balloon/fpr" in md
    assert (tmp_path / "out" / "impact.png").stat().st_size > 10_000
