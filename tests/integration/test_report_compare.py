"""`dynamem report` and `dynamem compare` on real runs: two runs of one configuration
compare clean (exit 0); a run whose QEMU is starved of CPU (pinned with a busy loop to
one core) is another host fingerprint (refused, exit 2) and, pooled over hosts, a real
regression (exit 1)."""

import os
import subprocess
import sys

import pytest

from .conftest import cli

pytestmark = pytest.mark.slow

SUITE = """
name = "cmp"
repeats = 4
seed = 5
[defaults]
memory = "1G"
swap = "none"
warmup = false
[[scenario]]
name = "dimm"
mechanism = "dimm"
steps = ["grow 256M", "shrink 256M"]
"""


def run(suite, out, *, starve: bool = False) -> None:
    argv = [sys.executable, "-m", "dynamem.cli", "run", "--suite", str(suite), "--out", str(out)]
    hog = None
    if starve:
        # One core for dynamem, QEMU and a busy loop: every vCPU gets a fraction of it.
        hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
        argv = ["taskset", "-c", "0", *argv]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=os.environ)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    assert res.returncode == 0, res.stderr


def test_compare_passes_same_config_and_fails_a_starved_run(image, run_base, tmp_path):
    suite = tmp_path / "cmp.toml"
    suite.write_text(SUITE)
    a, a2, slow = tmp_path / "a", tmp_path / "a2", tmp_path / "slow"
    run(suite, a)
    run(suite, a2)
    run(suite, slow, starve=True)

    same = cli("compare", str(a), str(a2))
    print(same.stdout)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "latency_guest_s" in same.stdout

    # The starved run's cells had one host CPU: another host fingerprint, never paired
    # with the others' by default; pooled on purpose, its slowness is a regression.
    refused = cli("compare", str(a), str(slow))
    assert refused.returncode == 2 and "host fingerprints differ" in refused.stderr
    assert "1 host CPU only in B" in refused.stderr
    worse = cli("compare", str(a), str(slow), "--pool-hosts")
    print(worse.stdout)
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "slower" in worse.stdout and "regression" in worse.stderr

    rep = cli("report", str(a), "--out", str(tmp_path / "report"))
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Verdict" in md and "dimm" in md
    for png in ("latency.png", "timeseries.png", "watermarks.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
