"""Saved post-boot states: what their key covers, and when a state on disk is usable."""

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from dynamem.errors import DeadlineExceeded, UserError
from dynamem.qemu import snapshot
from dynamem.qemu.config import VMConfig
from dynamem.record import (
    CellContext,
    CellRecord,
    Condition,
    MechanismConfig,
    StartState,
    Timings,
)
from dynamem.runner import overhead_summary
from dynamem.scenario import load_suite_text, with_start
from dynamem.units import GiB, MiB


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("vmlinuz", "initrd.img", "qemu-system-x86_64"):
        paths[name] = tmp_path / name
        paths[name].write_bytes(name.encode())
    return paths


@pytest.fixture
def config(files):
    return VMConfig(
        kernel=files["vmlinuz"],
        initrd=files["initrd.img"],
        memory=GiB,
        qemu_binary=str(files["qemu-system-x86_64"]),
    )


@pytest.fixture(autouse=True)
def states(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMEM_STATES", str(tmp_path / "states"))
    return tmp_path / "states"


@pytest.mark.parametrize(
    "change",
    [
        {"memory": 2 * GiB},
        {"maxmem": 4 * GiB, "slots": 8},
        {"extra_args": ("-device", "virtio-balloon-pci,id=balloon0")},
        {"kernel_args": ("init_on_alloc=0",)},
        {"accel": "tcg-icount", "cpus": 1},
        {"cpu": "max"},
        {"swap": "disk"},
        {"swap": "disk", "swap_size": 512 * MiB},
        {"memhp_default_state": "online"},
        {"data_size": GiB},
    ],
)
def test_every_configuration_change_gets_its_own_state(config, change):
    assert snapshot.state_key(replace(config, **change)) != snapshot.state_key(config)


def test_the_same_configuration_finds_the_same_state(config):
    assert snapshot.state_key(replace(config)) == snapshot.state_key(config)


@pytest.mark.parametrize("which", ["vmlinuz", "initrd.img", "qemu-system-x86_64"])
def test_a_replaced_guest_image_or_qemu_binary_gets_a_new_state(config, files, which):
    before = snapshot.state_key(config)
    files[which].write_bytes(b"a rebuilt or upgraded file")
    assert snapshot.state_key(config) != before


def _saved(config: VMConfig, stream: bytes, **meta_changes) -> Path:
    directory = snapshot.states_dir() / snapshot.state_key(config)
    (directory / "keys").mkdir(parents=True)
    (directory / snapshot.STREAM).write_bytes(stream)
    for name in ("client", "client.pub", "hostkey", "hostkey.pub"):
        (directory / "keys" / name).write_text(f"key {name}\n")
    sums = {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in [directory / snapshot.STREAM, *(directory / "keys").iterdir()]
    }
    meta = {
        "format": snapshot.FORMAT,
        "build": "b1",
        "stream_bytes": len(stream),
        "kernel_release": "6.1",
        "swap_bytes": None,
        "sha256": sums,
    }
    meta.update(meta_changes)
    (directory / snapshot.META).write_text(json.dumps(meta))
    return directory


def test_a_complete_state_is_found(config):
    directory = _saved(config, b"x" * 100)
    state = snapshot.find(config)
    assert state is not None and state.directory == directory
    assert state.kernel_release == "6.1"
    # what a cell records: the key and what every cell started from it shares
    described = state.describe()
    assert described["key"] == snapshot.state_key(config)
    assert any("guest RNG state" in what for what in described["identical"])


def test_a_truncated_state_is_never_used(config):
    directory = _saved(config, b"x" * 100)
    with open(directory / snapshot.STREAM, "r+b") as f:
        f.truncate(50)
    assert snapshot.find(config) is None


def test_a_state_damaged_in_place_is_never_used(config):
    directory = _saved(config, b"x" * 100)
    with open(directory / snapshot.STREAM, "r+b") as f:
        f.seek(40)
        f.write(b"y")  # same size, one byte changed
    assert snapshot.find(config) is None


def test_a_state_whose_keys_changed_is_never_used(config):
    directory = _saved(config, b"x" * 100)
    (directory / "keys" / "hostkey").write_text("another key\n")
    assert snapshot.find(config) is None


def test_a_state_without_metadata_is_half_written_and_never_used(config):
    directory = _saved(config, b"x" * 100)
    (directory / snapshot.META).unlink()
    assert snapshot.find(config) is None


def test_a_state_of_another_format_is_never_used(config):
    _saved(config, b"x" * 100, format=snapshot.FORMAT + 1)
    assert snapshot.find(config) is None


def test_ensure_returns_a_found_state_without_building(config, monkeypatch):
    _saved(config, b"x" * 100)

    def no_build(*args, **kwargs):
        raise AssertionError("a complete state must not be built again")

    monkeypatch.setattr(snapshot, "build", no_build)
    state, built = snapshot.ensure(config)
    assert not built and state.key == snapshot.state_key(config)


def test_another_dynamem_gets_its_own_state(config, monkeypatch):
    before = snapshot.state_key(config)
    monkeypatch.setattr(snapshot, "__version__", "0.0.0-other")
    assert snapshot.state_key(config) != before


def test_the_key_covers_the_command_line_dynamem_builds(config, monkeypatch):
    before = snapshot.state_key(config)
    # e.g. a fixed kernel argument changed in dynamem's code, not in the configuration
    monkeypatch.setattr(VMConfig, "cmdline", property(lambda self: "console=ttyS0 other"))
    assert snapshot.state_key(config) != before


def test_the_load_command_quotes_the_path(tmp_path):
    state = snapshot.SavedState(tmp_path / "a dir; rm -rf x", "k", {})
    uri = state.load_uri()
    assert uri.startswith("exec:zstd -dcq ")
    assert "'" + str(tmp_path / "a dir; rm -rf x" / snapshot.STREAM) + "'" in uri


SUITE = """
name = "s"
repeats = 1
[defaults]
memory = "1G"
steps = ["shrink 256M"]
[[scenario]]
name = "a"
mechanism = "virtio-mem"
[[scenario]]
name = "b"
mechanism = "balloon"
start = "snapshot"
"""


def test_the_start_mode_is_a_scenario_key_and_part_of_the_condition():
    a, b = load_suite_text(SUITE, "s.toml").scenarios
    assert (a.start, b.start) == ("boot", "snapshot")
    assert a.condition("tcg").start == "boot" and b.condition("tcg").start == "snapshot"
    assert "start snapshot" in b.condition("tcg").describe()
    assert "start" not in a.condition("tcg").describe()


def test_start_overrides_every_scenario_and_survives_a_resume():
    suite = with_start(load_suite_text(SUITE, "s.toml"), "snapshot")
    assert {s.start for s in suite.scenarios} == {"snapshot"}
    # a resumed run re-reads the stored text: the mode must be in it
    again = load_suite_text(suite.source, "stored")
    assert {s.start for s in again.scenarios} == {"snapshot"}
    back = with_start(suite, "boot")
    assert {s.start for s in back.scenarios} == {"boot"}


def test_the_dry_run_estimate_knows_a_start_from_a_state_is_short():
    from dynamem.runner import estimate_cell_s

    a = load_suite_text(SUITE, "s.toml").scenarios[0]
    assert estimate_cell_s(replace(a, start="snapshot")) == estimate_cell_s(a) - 7.0


def test_an_unknown_start_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown start 'warm'.*boot, snapshot"):
        load_suite_text(SUITE.replace('start = "snapshot"', 'start = "warm"'), "s.toml")
    with pytest.raises(UserError, match="unknown start 'warm'"):
        with_start(load_suite_text(SUITE, "s.toml"), "warm")


def _cell(start: str, boot: float, build: float, built: bool = False) -> CellRecord:
    a = load_suite_text(SUITE, "s.toml").scenarios[0]
    cond: Condition = replace(a.condition("tcg"), start=start)
    return CellRecord(
        cell=f"a-{start}",
        scenario="a",
        repeat=1,
        mechanism=MechanismConfig(name="virtio-mem"),
        condition=cond,
        status="ok",
        timings=Timings(boot=boot, state_build=build, total=boot + build + 3, overhead=0.1),
        context=_context(start, built),
    )


def _context(start: str, built: bool) -> CellContext | None:
    if start != "snapshot":
        return None
    state = StartState(key="k", build="b", created=None, boot_s=9.0, save_s=1.0,
                       stream_bytes=1, identical=[], built_here=built)  # fmt: skip
    return CellContext(accel="tcg", accel_reason="", qemu_version="7.2", guest_kernel="6.1",
                       guest_image=None, host_kernel="", host_cpu="", cpus=2, boot_memory=1,
                       maxmem=None, slots=0, memhp_default_state="online_movable",
                       swap="none", swap_size=0, kernel_cmdline="", before_bytes=1,
                       dynamem_version="0", start=start, state=state)  # fmt: skip


def test_the_run_summary_names_the_start_and_the_state_builds():
    line = overhead_summary([_cell("snapshot", 1.2, 15.0, True), _cell("snapshot", 1.3, 0.1)])
    assert "snapshot to ready 1.2 s" in line
    assert "1 saved state built, getting the saved states took 15.1 s" in line
    mixed = overhead_summary([_cell("boot", 9.0, 0.0), _cell("snapshot", 1.0, 0.1)])
    assert "boot to ready 9.0 s, snapshot to ready 1.0 s" in mixed


def test_no_state_dir_is_made_until_one_is_needed(config, states):
    assert snapshot.find(config) is None
    assert not os.path.exists(states)


def test_a_lock_held_too_long_is_a_one_line_error(config):
    import fcntl

    key = snapshot.state_key(config)
    snapshot.states_dir().mkdir(parents=True)
    with open(snapshot.states_dir() / f"{key}.lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another open file: another holder
        lock = snapshot._locked(key, wait_s=0.2)
        with pytest.raises(DeadlineExceeded, match="held the saved state's lock"), lock:
            pass
