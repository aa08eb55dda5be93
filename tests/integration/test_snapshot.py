"""Cells started from a saved post-boot state, on real guests: fresh sockets and forwards,
the same guest inside, and a damaged state rebuilt rather than used."""

import hashlib
import json

import pytest

from dynamem.cell import Cell, run_cell
from dynamem.qemu import snapshot
from dynamem.qemu.machine import VM
from dynamem.scenario import load_suite_text
from dynamem.units import GiB

pytestmark = pytest.mark.slow

SUITE = """
name = "snap"
repeats = 1
[defaults]
memory = "1G"
swap = "disk"
swap_size = "256M"
warmup = false
start = "snapshot"
[[scenario]]
name = "vmem"
mechanism = "virtio-mem"
steps = ["shrink 128M", "grow 128M"]
"""


@pytest.fixture
def states(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMEM_STATES", str(tmp_path / "states"))
    return tmp_path / "states"


def test_two_guests_start_from_one_saved_state(image, plan, run_base, states):
    config = plan.config.__class__(**{**plan.config.__dict__, "memory": GiB, "swap": "disk"})
    state, built = snapshot.ensure(config)
    assert built and state.stream.stat().st_size == state.meta["stream_bytes"]
    again, rebuilt = snapshot.ensure(config)
    assert not rebuilt and again.meta["build"] == state.meta["build"]
    seen = []
    for _ in range(2):
        with VM(config, restore=state) as vm:
            vm.start()
            assert vm.kernel_release == image.kernel_release
            # the guest goes on from the save: one boot, whatever the number of starts
            stat = vm.run(["cat", "/proc/stat"]).stdout
            btime = next(line for line in stat.splitlines() if line.startswith("btime"))
            uptime = float(vm.run(["cat", "/proc/uptime"]).stdout.split()[0])
            swaps = vm.run(["cat", "/proc/swaps"]).stdout
            assert "/dev/vda" in swaps  # its swap disk came along, as saved, and is in use
            # the sampler answers on this QEMU's new socket, and looks on request
            assert vm.sampler.snapshot(["/proc/meminfo"])["/proc/meminfo"].startswith("MemTotal")
            assert vm.qmp("query-status")["status"] == "running"
            seen.append((btime, uptime))
    (btime1, up1), (btime2, up2) = seen
    assert btime1 == btime2  # identical by construction, as each cell records
    # both went on from the same instant: the guest clock does not count the time between
    assert abs(up1 - up2) < 5.0


def test_a_cell_starts_from_the_state_and_a_damaged_state_is_rebuilt(image, run_base, states):
    (scenario,) = load_suite_text(SUITE, "snap.toml").scenarios
    first = run_cell(Cell(scenario, 1), accel_request=None, qemu="qemu-system-x86_64",
                     guest="minimal", accel="tcg")  # fmt: skip
    assert first.ok, first.error
    assert first.condition.start == "snapshot"
    ctx = first.context
    assert ctx is not None and ctx.start == "snapshot" and ctx.state is not None
    assert ctx.state.replaced is None
    assert any("guest RNG state" in what for what in ctx.state.identical)
    assert ctx.state.built_here and first.timings.state_build > 0  # the first cell built it
    assert [s.outcome for _, s in first.resizes()] == ["ok", "ok"]
    (directory,) = [d for d in states.iterdir() if d.is_dir()]
    stream = directory / snapshot.STREAM
    # damage the middle of the saved memory, keeping its size: it must not load
    with open(stream, "r+b") as f:
        f.seek(stream.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    second = run_cell(Cell(scenario, 2), accel_request=None, qemu="qemu-system-x86_64",
                      guest="minimal", accel="tcg")  # fmt: skip
    assert second.ok, second.error
    assert second.context is not None and second.context.state is not None
    # the damage was found before use (its sha256): built again, never loaded
    assert second.context.state.built_here and second.context.state.replaced is None
    assert second.context.state.build != ctx.state.build
    assert [s.outcome for _, s in second.resizes()] == ["ok", "ok"]
    # damage the sums cannot see (as if written damaged): QEMU's load fails, the state is
    # discarded under its lock and built again, and the cell says why
    (directory,) = [d for d in states.iterdir() if d.is_dir()]
    with open(stream, "r+b") as f:
        f.seek(stream.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    meta = json.loads((directory / snapshot.META).read_text())
    meta["sha256"][snapshot.STREAM] = hashlib.sha256(stream.read_bytes()).hexdigest()
    (directory / snapshot.META).write_text(json.dumps(meta))
    third = run_cell(Cell(scenario, 3), accel_request=None, qemu="qemu-system-x86_64",
                     guest="minimal", accel="tcg")  # fmt: skip
    assert third.ok, third.error
    assert third.context is not None and third.context.state is not None
    replaced = third.context.state.replaced
    assert replaced and "could not load the saved state" in replaced, replaced
    assert third.context.state.built_here
    assert [s.outcome for _, s in third.resizes()] == ["ok", "ok"]
