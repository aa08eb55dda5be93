"""`dynamem run` end to end on real guests: a complete run directory, and --resume after
a run interrupted by SIGINT or SIGTERM finishes it without redoing completed cells."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dynamem.store import RunStore

from .conftest import cli, qemu_pids_mentioning

pytestmark = pytest.mark.slow

TINY = """
name = "tiny"
repeats = {repeats}
seed = 3
[defaults]
memory = "1G"
swap = "none"
warmup = false
[[scenario]]
name = "vmem"
mechanism = "virtio-mem"
steps = ["shrink 128M", "grow 128M"]
[[scenario]]
name = "balloon"
mechanism = "balloon"
steps = ["grow 128M"]
"""


def test_a_run_directory_is_complete(image, run_base, tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY.format(repeats=1))
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite), "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr  # every cell ran; an impossible step is a result
    store = RunStore.open(out)
    assert store.run.metadata.accel in ("tcg", "kvm")
    assert store.run.metadata.guest_kernel == image.kernel_release
    assert sorted(store.run.order) == ["balloon-r1", "vmem-r1"]
    cells, problems = store.load_cells()
    assert problems == []
    by = {c.cell: c for c in cells}
    vmem = by["vmem-r1"]
    assert vmem.status == "ok" and vmem.format == 2
    assert [s.outcome for _, s in vmem.resizes()] == ["ok", "ok"]
    shrink = vmem.resizes()[0][1]
    assert shrink.guest_memtotal_delta_bytes == -128 << 20
    assert vmem.timings.total > vmem.timings.boot > 0
    assert vmem.condition.memory == 1 << 30 and vmem.condition.cpu_model in ("qemu64", "host")
    assert vmem.preparation is not None and vmem.preparation.outcome == "ok"
    assert vmem.context is not None and vmem.context.memtotal_start_kb > 0
    series = store.load_series("vmem-r1", 0)
    assert int(series["t_request_ns"]) == shrink.t_request_ns
    assert np.all(np.diff(series["guest_t_ns"]) >= 0)
    # The balloon's impossible grow is recorded as such, and the run went on.
    assert by["balloon-r1"].resizes()[0][1].outcome == "unsupported"
    assert "vmem" in res.stdout and "unsupported" not in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_without_redoing_cells(image, run_base, tmp_path, sig):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY.format(repeats=2))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamem.cli", "run", "--suite", str(suite), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = list((out / "cells").glob("*.json")) if (out / "cells").exists() else []
            if done:
                break
            time.sleep(0.2)
        assert done, "no cell finished"
        time.sleep(2)  # into the next cell's boot
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM
    assert f"dynamem run --resume {out}" in err
    assert qemu_pids_mentioning(str(run_base)) == []
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 1 <= len(finished) < 4

    res = cli("run", "--resume", str(out), timeout=900)
    assert res.returncode in (0, 1), res.stderr
    store = RunStore.open(out)
    assert store.completed() == set(store.run.order)
    for name, mtime in finished.items():  # not redone
        assert (out / "cells" / name).stat().st_mtime_ns == mtime
    cells, _ = store.load_cells()
    assert len(cells) == 4
    assert json.loads((out / "run.json").read_text())["seed"] == 3


STEPS = """
name = "steps"
repeats = 1
seed = 1
[defaults]
memory = "1G"
swap = "none"
warmup = false
[[scenario]]
name = "vmem-reboot"
mechanism = "virtio-mem"
steps = ["grow 256M", "reboot"]
[[scenario]]
name = "fpr-free"
mechanism = "balloon"
free_page_reporting = true
workload = "stress"
workload_size = "50%"
steps = ["shrink 128M", "free 5s"]
"""


def test_reboot_and_free_steps(image, run_base, tmp_path):
    suite = tmp_path / "steps.toml"
    suite.write_text(STEPS)
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite), "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr
    cells = {c.cell: c for c in RunStore.open(out).load_cells()[0]}
    reboot = cells["vmem-reboot-r1"].steps[1]
    assert reboot.kind == "reboot" and reboot.seconds > 0
    # virtio-mem is unplugged on reset and plugged again to the requested size
    assert reboot.host_after_bytes == 256 << 20
    assert reboot.guest_memtotal_kb[1] > 0
    free = cells["fpr-free-r1"].steps[1]
    assert free.kind == "free"
    assert free.guest_memfree_kb[1] > free.guest_memfree_kb[0]
    # with free page reporting the host gets most of the freed working set back
    assert free.rss_released_bytes > 256 << 20


WORKLOADS = """
name = "workloads"
repeats = 1
seed = 1
[defaults]
memory = "1G"
swap = "none"
warmup = false
steps = ["shrink 128M", "grow 128M"]
[[scenario]]
name = "impact"
mechanism = "balloon"
workload = "impact"
workload_size = "256M"
[[scenario]]
name = "pagecache"
mechanism = "virtio-mem"
workload = "pagecache"
workload_size = "256M"
"""


def test_impact_and_pagecache_workloads(image, run_base, tmp_path):
    suite = tmp_path / "w.toml"
    suite.write_text(WORKLOADS)
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite), "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr
    cells = {c.cell: c for c in RunStore.open(out).load_cells()[0]}
    impact = cells["impact-r1"]
    assert impact.timings.workload_start > 0
    for _, step in impact.resizes():
        felt = step.cost.workload
        assert felt is not None and felt.throughput_before_pps > 0
        assert felt.longest_stall_ms >= 9  # log lines are 10 ms apart at best
    page = cells["pagecache-r1"]
    assert page.status == "ok", page.error
    assert page.timings.workload_start > 0
    series = RunStore.open(out).load_series("pagecache-r1", 0)
    # kB: a block device read is cached as Buffers, and it stayed
    assert series["full_Buffers"].max() >= 200 * 1024
