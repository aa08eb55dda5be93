"""Faults during a run, injected into real guests (see dynamem.faults): each ends as a
recorded cell with its reason, the run goes on to the next cell, no result is lost and no
QEMU of the run is left (checked by PID in `run_base`)."""

import json

import pytest

from dynamem.scenario import load_suite_text
from dynamem.store import RunStore

from .conftest import cli, qemu_pids_mentioning

pytestmark = pytest.mark.slow

SUITE = """
name = "faults"
repeats = 1
seed = 5
[defaults]
memory = "1G"
swap = "none"
warmup = false
mechanism = "balloon"
steps = ["shrink 256M"]

[[scenario]]
name = "clean"
mechanism = "virtio-mem"
steps = ["grow 128M", "shrink 128M"]

[[scenario]]
name = "qemu-kill"
inject = "qemu-kill@step0"

[[scenario]]
name = "qmp-stop"
inject = "qmp-stop@step0"

[[scenario]]
name = "panic"
steps = ["shrink 512M"]
inject = "panic@step0"

[[scenario]]
name = "oom"
workload = "stress"
workload_size = "256M"
inject = "oom@step0"

[[scenario]]
name = "ssh-drop"
workload = "stress"
workload_size = "64M"
inject = "ssh-drop@step0"

[[scenario]]
name = "workload-stuck"
workload = "stress"
workload_size = "256M"
deadline = 10
inject = "workload-stuck@workload"

[[scenario]]
name = "no-converge"
deadline = 8
steps = ["shrink 128M", "settle 1s"]
inject = "no-converge@step0"
"""

# cell -> (phase it failed in, what the recorded error must say)
EXPECTED_FAILURES = {
    "qemu-kill-r1": ("step 0 (shrink 256M)", "QEMU killed by SIGKILL"),
    "qmp-stop-r1": ("step 0 (shrink 256M)", "stopped (SIGSTOP) and does not answer"),
    "panic-r1": ("step 0 (shrink 512M)", "kernel panic: sysrq triggered crash"),
    "oom-r1": ("workload stop", "workload stress died during the steps"),
    "ssh-drop-r1": ("workload stop", "SSH to the guest"),
    "workload-stuck-r1": ("workload start", "stress did not make 256M resident in 10 s"),
}


def test_injected_faults_are_recorded_and_the_run_goes_on(image, run_base, tmp_path):
    suite = tmp_path / "faults.toml"
    suite.write_text(SUITE)
    out = tmp_path / "run"
    res = cli(
        "run",
        "--suite",
        str(suite),
        "--out",
        str(out),
        timeout=900,
        env={"DYNAMEM_FAULT_INJECTION": "1"},
    )
    assert res.returncode == 1, res.stderr  # cells failed, and the run still ended normally
    assert qemu_pids_mentioning(str(run_base)) == []

    store = RunStore.open(out)
    cells, problems = store.load_cells()
    assert problems == []
    # Nothing lost: every cell of the order has its record, in whatever order they ran.
    assert store.completed() == set(store.run.order) and len(cells) == 8
    by = {c.cell: c for c in cells}
    report = {c: (by[c].status, by[c].failed_at, by[c].error) for c in by}
    print(json.dumps(report, indent=1))  # the counts in the closing note come from here

    for cell, (phase, needle) in EXPECTED_FAILURES.items():
        record = by[cell]
        assert record.status == "failed", (cell, record.error)
        assert record.failed_at == phase, (cell, record.error)
        assert needle in record.error, (cell, record.error)
        assert record.error.count("\n") == 0
        assert record.injected is not None and record.injected.fired
        assert record.injected.fault == record.scenario_config["inject"]
        assert f"cell {cell} failed: " in res.stderr

    # A resize that never converges is a measured outcome with its reason, at its deadline.
    stuck = by["no-converge-r1"]
    assert stuck.status == "ok", stuck.error
    assert stuck.injected is not None and stuck.injected.fired
    step = stuck.steps[0]
    assert step.outcome == "timeout"
    assert step.message.startswith("deadline: host reports +0 of")
    assert stuck.steps[1].kind == "settle"  # and the cell went on to its next step

    clean = by["clean-r1"]
    assert clean.status == "ok" and clean.injected is None
    assert [s.outcome for _, s in clean.resizes()] == ["ok", "ok"]


def test_inject_is_an_unknown_key_without_the_switch(tmp_path):
    suite = tmp_path / "faults.toml"
    suite.write_text(SUITE)
    res = cli("run", "--suite", str(suite), "--dry-run", env={"DYNAMEM_FAULT_INJECTION": ""})
    assert res.returncode == 2
    assert "unknown key 'inject'" in res.stderr and res.stderr.count("\n") == 1


# -- failures never inside a statistic, on real guests ----------------------------------------

STATS = """
name = "faults-stats"
repeats = 1
seed = 7
[defaults]
memory = "1G"
swap = "none"
warmup = false
mechanism = "balloon"
steps = ["shrink 256M", "grow 256M"]

[[scenario]]
name = "dies-after-ok-shrink"
workload = "stress"
workload_size = "256M"
inject = "oom@step1"

[[scenario]]
name = "times-out"
deadline = 8
inject = "no-converge@step0"

[[scenario]]
name = "dimm-refused"
mechanism = "dimm"
memhp_default_state = "online_kernel"
no_progress = 10
"""


def test_failed_and_partial_resizes_enter_no_statistic(image, run_base, tmp_path, monkeypatch):
    """A cell whose workload dies after an ok shrink, a resize that times out, a DIMM
    eject the guest refuses: the verdict, every question's table, compare and asv hold
    none of their latencies or costs, and each shows the failure share."""
    from dynamem.analysis import tracks
    from dynamem.analysis.metrics import tidy, usable
    from dynamem.analysis.report import build_report

    suite = tmp_path / "stats.toml"
    suite.write_text(STATS)
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite), "--out", str(out), "--no-report", timeout=900,
              env={"DYNAMEM_FAULT_INJECTION": "1"})  # fmt: skip
    assert res.returncode == 1, res.stderr  # the first cell fails
    assert qemu_pids_mentioning(str(run_base)) == []
    store = RunStore.open(out)
    cells = {c.cell: c for c in store.load_cells()[0]}
    died = cells["dies-after-ok-shrink-r1"]
    assert died.status == "failed" and died.resizes()[0][1].outcome == "ok"
    timed = cells["times-out-r1"].resizes()
    assert [s.outcome for _, s in timed] == ["timeout", "skipped"]
    refused = cells["dimm-refused-r1"].resizes()[0][1]
    assert refused.outcome in ("refused", "partial"), refused.message
    assert "_OST" in refused.message or "refused" in refused.message

    # The metric table keeps them, labelled, and `usable` leaves every one of them out.
    table = tidy(store.load_cells()[0], store.run.run_id)
    bad = {("dies-after-ok-shrink", 0), ("dies-after-ok-shrink", 1), ("times-out", 0),
           ("times-out", 1), ("dimm-refused", 0), ("dimm-refused", 1)}  # fmt: skip
    recorded = set(zip(table.scenario, table.step_index, strict=True))
    assert bad <= recorded
    assert not set(zip(usable(table).scenario, usable(table).step_index, strict=True)) & bad

    # The report: every verdict cell of these mechanisms is a count with no figure.
    md = build_report(store, tmp_path / "report")[0].read_text()
    verdict = md.split("## Verdict")[1].split("Grow beyond boot RAM")[0]
    for line in verdict.splitlines():
        if line.startswith("| shrink") or line.startswith("| grow"):
            for cell_text in line.strip("|").split(" | ")[1:]:
                assert cell_text.strip() == "-" or cell_text.strip().startswith("- ("), line
    assert "(0/1 ok)" in verdict
    q2 = md.split("### 2.")[1].split("### 3.")[0]
    assert "| balloon | 0/1 | - | - | - |" in q2 or "| balloon | 0/1 |" in q2
    q7 = md.split("### 7.")[1].split("### 8.")[0]
    # the refused DIMM shrink is counted (1 resize, 0 ok), not dropped
    assert any("| dimm" in x and "| shrink 256M | 1 | 0 |" in x for x in q7.splitlines()), q7

    # asv: no value for these points, and the failure share says why.
    monkeypatch.setenv("DYNAMEM_FAULT_INJECTION", "1")
    grid = tracks.grid_of(load_suite_text(STATS, "stats.toml"))
    cache = tracks.cache_of(out)
    with pytest.raises(RuntimeError, match="no shrink 256 MiB of dimm-refused succeeded"):
        tracks.track_value(cache, grid, tracks.TRACKS["shrink_latency"], "dimm", "256 MiB",
                           "idle")  # fmt: skip
    assert tracks.failure_share(cache, grid, "dimm", "idle") == 1.0
    assert tracks.failure_share(cache, grid, "balloon", "stress 256M") == 1.0
    assert tracks.failure_share(cache, grid, "balloon", "idle") == 1.0


CLEAN = """
name = "flaky"
repeats = 5
seed = 9
[defaults]
memory = "1G"
swap = "none"
warmup = false
[[scenario]]
name = "balloon-shrink"
mechanism = "balloon"
steps = ["shrink 256M"]
deadline = 8
"""


def test_compare_fails_when_two_of_five_resizes_time_out(image, run_base, tmp_path):
    clean, flaky = tmp_path / "clean.toml", tmp_path / "flaky.toml"
    clean.write_text(CLEAN)
    flaky.write_text(CLEAN + 'inject = "no-converge@step0"\ninject_repeats = [2, 4]\n')
    env = {"DYNAMEM_FAULT_INJECTION": "1"}
    for suite, out in ((clean, "a"), (flaky, "b")):
        res = cli("run", "--suite", str(suite), "--out", str(tmp_path / out), "--no-report",
                  timeout=900, env=env)  # fmt: skip
        assert res.returncode == 0, res.stderr  # a timeout is a result, not a failed cell
    res = cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), env=env)
    print(res.stdout, res.stderr)
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if "success share" in x)
    assert "balloon-shrink" in line and "5/5 -> 3/5" in line and "worse" in line
    assert "regression" in res.stderr
