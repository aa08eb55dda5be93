"""Cells started from a saved post-boot state, on real guests: fresh sockets and forwards,
the same guest inside, and a damaged state rebuilt rather than used."""

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
    state, built_s = snapshot.ensure(config)
    assert built_s > 0 and state.stream.stat().st_size == state.meta["stream_bytes"]
    again, rebuilt_s = snapshot.ensure(config)
    assert rebuilt_s == 0.0 and again.directory == state.directory
    seen = []
    for _ in range(2):
        with VM(config, restore=state) as vm:
            vm.start()
            assert vm.kernel_release == image.kernel_release
            # the guest goes on from the save: one boot, whatever the number of starts
            stat = vm.run(["cat", "/proc/stat"]).stdout
            boot_id = next(line for line in stat.splitlines() if line.startswith("btime"))
            swaps = vm.run(["cat", "/proc/swaps"]).stdout
            assert "/dev/vda" in swaps  # its swap disk came along, as saved
            assert vm.sampler.barrier().checks >= 0  # the sampler answers on the new socket
            assert vm.qmp("query-status")["status"] == "running"
            seen.append((boot_id, vm.files.ssh_port, vm.files.qmp_socket, vm.timings["ssh"]))
    (id1, port1, qmp1, _), (id2, port2, qmp2, _) = seen
    assert id1 == id2  # identical by construction, as each cell records
    assert qmp1 != qmp2  # fresh per cell: the run directory and its sockets


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
    assert first.timings.state_build > 0  # the first cell of the configuration built it
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
    assert second.context.state.replaced and "could not load" in second.context.state.replaced
    assert second.timings.state_build > 0
    assert second.context.state.created is not None
    assert [s.outcome for _, s in second.resizes()] == ["ok", "ok"]
