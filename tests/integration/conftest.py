import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamem.guest.build import GuestImage, build
from dynamem.guest.recipe import load_recipe
from dynamem.launch import Plan, plan_vm
from dynamem.units import GiB


@pytest.fixture(scope="session")
def image() -> GuestImage:
    built, _ = build(load_recipe("minimal"))
    return built


@pytest.fixture(scope="session")
def plan(image) -> Plan:
    return plan_vm(memory=2 * GiB)


def qemu_pids_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (e.g. a run-dir base)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if text in cmdline and "qemu" in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def run_base(tmp_path, monkeypatch) -> Path:
    """A run-dir base unique to the test, so leftover QEMUs can be found by their PIDs."""
    base = Path("/tmp") / f"dm-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("DYNAMEM_RUN_BASE", str(base))
    yield base
    leftover = qemu_pids_mentioning(str(base))
    shutil.rmtree(base, ignore_errors=True)  # failed VMs keep their run dirs here
    assert leftover == [], f"QEMU processes left behind: {leftover}"


def cli(*argv: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynamem.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
