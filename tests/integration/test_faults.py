"""Faults during a run, injected into real guests (see dynamem.faults): each ends as a
recorded cell with its reason, the run goes on to the next cell, no result is lost and no
QEMU of the run is left (checked by PID in `run_base`)."""

import json

import pytest

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
    assert store.completed() == set(store.run["order"]) and len(cells) == 8
    by = {c["cell"]: c for c in cells}
    report = {c: (by[c]["status"], by[c].get("failed_at"), by[c]["error"]) for c in by}
    print(json.dumps(report, indent=1))  # the counts in the closing note come from here

    for cell, (phase, needle) in EXPECTED_FAILURES.items():
        record = by[cell]
        assert record["status"] == "failed", (cell, record["error"])
        assert record["failed_at"] == phase, (cell, record["error"])
        assert needle in record["error"], (cell, record["error"])
        assert record["error"].count("\n") == 0
        assert record["injected"] == {"fault": record["scenario_config"]["inject"], "fired": True}
        assert f"cell {cell} failed: " in res.stderr

    # A resize that never converges is a measured outcome with its reason, at its deadline.
    stuck = by["no-converge-r1"]
    assert stuck["status"] == "ok", stuck["error"]
    assert stuck["injected"]["fired"]
    step = stuck["steps"][0]
    assert step["outcome"] == "timeout"
    assert step["message"].startswith("deadline: host reports +0 of")
    assert stuck["steps"][1]["kind"] == "settle"  # and the cell went on to its next step

    clean = by["clean-r1"]
    assert clean["status"] == "ok" and "injected" not in clean
    assert [s["outcome"] for s in clean["steps"]] == ["ok", "ok"]


def test_inject_is_an_unknown_key_without_the_switch(tmp_path):
    suite = tmp_path / "faults.toml"
    suite.write_text(SUITE)
    res = cli("run", "--suite", str(suite), "--dry-run", env={"DYNAMEM_FAULT_INJECTION": ""})
    assert res.returncode == 2
    assert "unknown key 'inject'" in res.stderr and res.stderr.count("\n") == 1
