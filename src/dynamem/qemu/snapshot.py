"""Saved post-boot states: boot a machine configuration once, start every cell from it.

A cell's fresh boot costs most of a quick cell's time and leaves the starting state to
chance (the allocator's layout, what booting touched). QEMU can write a stopped guest's
whole state into a migration stream and a new QEMU, started with the same devices and
`-incoming defer`, can load it: the guest goes on from the instant it was saved. QEMU 7.2
has no `file:` migration target, so the stream goes through `exec:` into zstd: zero pages
cost nothing, and zstd's frame checksum makes a damaged file fail to load instead of
loading wrong memory (QEMU 7.2 exits when a load fails; the state is then rebuilt).

What must be fresh per cell stays fresh: the run directory (QMP and sampler sockets,
console, logs) and the SSH forward's host port. What the guest kept from its one boot is
identical in every cell started from a state, by construction, and each cell records it
(`IDENTICAL`): its SSH keys (the guest read them at boot, so they are saved with the
state), its RNG state at the start (virtio-rng and interrupt timings mix in new entropy at
once: a value first drawn after the start, such as the lazily made boot_id, differs), its
page layout, its kernel log and its boot time and wall clock.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamem.errors import DeadlineExceeded, VMError
from dynamem.paths import cache_dir
from dynamem.qemu.config import VMConfig

# Bumped whenever what a saved state holds, or how it is made, changes.
FORMAT = 1
STREAM = "state.zst"
META = "meta.json"
IDENTICAL = (
    "SSH host and client keys",
    "guest RNG state at the start (new entropy mixes in from then on)",
    "guest page layout",
    "guest kernel log up to the save",
    "guest boot time and wall clock (those of the save's boot)",
)


class StateRejected(VMError):
    """QEMU could not load a saved state (damaged, or made by something else)."""


@dataclass(frozen=True)
class SavedState:
    directory: Path
    key: str
    meta: dict[str, Any]

    @property
    def stream(self) -> Path:
        return self.directory / STREAM

    @property
    def keys(self) -> Path:
        return self.directory / "keys"

    @property
    def swap_image(self) -> Path:
        return self.directory / "swap.img"

    @property
    def kernel_release(self) -> str:
        return str(self.meta.get("kernel_release") or "unknown")

    def load_uri(self) -> str:
        return f"exec:zstd -dcq {shlex.quote(str(self.stream))}"

    def describe(self) -> dict[str, Any]:
        """What a cell records about the state it started from."""
        return {
            "key": self.key,
            "created": self.meta.get("created"),
            "boot_s": self.meta.get("boot_s"),
            "save_s": self.meta.get("save_s"),
            "stream_bytes": self.meta.get("stream_bytes"),
            "identical": list(IDENTICAL),
        }

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def states_dir() -> Path:
    """DYNAMEM_STATES, else the cache's `states/` (safe to delete: rebuilt on demand)."""
    env = os.environ.get("DYNAMEM_STATES")
    return Path(env) if env else cache_dir() / "states"


def _file_identity(path: Path | str) -> list[Any]:
    """Enough to notice a replaced file (a new QEMU package, a rebuilt guest) cheaply."""
    resolved = shutil.which(str(path)) or str(path)
    st = os.stat(resolved)
    return [os.path.realpath(resolved), st.st_size, st.st_mtime_ns]


def state_key(config: VMConfig) -> str:
    """Everything that shapes the saved state: the whole machine configuration (memory
    layout, devices, kernel arguments, accelerator, CPU model, swap), the guest image's
    files and the QEMU binary. Two configurations that differ in any of them never share
    a state."""
    fields = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
    }
    parts = {
        "format": FORMAT,
        "config": fields,
        "kernel": _file_identity(config.kernel),
        "initrd": _file_identity(config.initrd),
        "qemu": _file_identity(config.qemu_binary),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """One builder per state, also across processes (several runs, several workers)."""
    states_dir().mkdir(parents=True, exist_ok=True)
    with open(states_dir() / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find(config: VMConfig) -> SavedState | None:
    """The saved state for `config`, if a complete one exists."""
    key = state_key(config)
    directory = states_dir() / key
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    state = SavedState(directory, key, meta)
    try:
        size = state.stream.stat().st_size
    except OSError:
        return None
    if meta.get("format") != FORMAT or meta.get("stream_bytes") != size:
        return None
    return state


def ensure(config: VMConfig, ready_timeout: float = 180.0) -> tuple[SavedState, float]:
    """The saved state for `config`, built now if there is none; returns it and the seconds
    spent building it here (0 if it was there)."""
    key = state_key(config)
    with _locked(key):
        state = find(config)
        if state is not None:
            return state, 0.0
        start = time.monotonic()
        state = build(config, states_dir() / key, key, ready_timeout)
        return state, time.monotonic() - start


def build(config: VMConfig, directory: Path, key: str, ready_timeout: float) -> SavedState:
    """Boot `config` fresh, wait until it is ready (SSH answered, sampler said hello), save
    the stopped guest into `directory`, stop QEMU. Nothing is left half-written: the
    metadata, which makes a state usable, is written last."""
    from dynamem.qemu.machine import VM

    shutil.rmtree(directory, ignore_errors=True)
    work = directory.with_name(directory.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with VM(config) as vm:
            vm.start(ready_timeout)
            boot_s = vm.timings["ssh"]
            assert vm.run_dir is not None and vm.files is not None
            # the guest's open SSH connection would be saved as slirp state: close it first
            vm.shell.close()
            vm.sampler.barrier()  # nothing of the sampler's is left in flight
            t = time.monotonic()
            vm.qmp("stop")
            target = work / STREAM
            partial = work / (STREAM + ".part")
            vm.qmp(
                "migrate",
                uri=f"exec:zstd -q -1 -o {shlex.quote(str(partial))} && "
                f"mv {shlex.quote(str(partial))} {shlex.quote(str(target))}",
            )
            _wait_migration(vm, timeout=120.0)
            # QEMU reports completion once it closed the pipe; zstd finishes after that
            deadline = time.monotonic() + 60.0
            while not target.exists():
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the saved state's compressor did not finish in 60 s")
                time.sleep(0.02)
            save_s = time.monotonic() - t
            shutil.copytree(vm.run_dir / "keys", work / "keys")
            if config.swap == "disk":  # the guest's swap header; sparse, like the original
                subprocess.run(
                    ["cp", "--sparse=always", str(vm.files.swap_image), str(work / "swap.img")],
                    check=True,
                )
            kernel_release = vm.kernel_release
        meta = {
            "format": FORMAT,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kernel_release": kernel_release,
            "boot_s": round(boot_s, 3),
            "save_s": round(save_s, 3),
            "stream_bytes": target.stat().st_size,
        }
        (work / META).write_text(json.dumps(meta, indent=1) + "\n")
        work.rename(directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return SavedState(directory, key, meta)


def _wait_migration(vm: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.qmp("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"saving the guest's state failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"saving the guest's state took over {timeout:g} s")
        time.sleep(0.02)


def prepare_run_dir(state: SavedState, run_dir: Path, config: VMConfig) -> None:
    """Give a cell's fresh run directory what the saved guest expects: its keys, and its
    swap disk as it was when saved (a sparse copy)."""
    shutil.copytree(state.keys, run_dir / "keys")
    (run_dir / "keys").chmod(0o700)
    if config.swap == "disk":
        subprocess.run(
            ["cp", "--sparse=always", str(state.swap_image), str(run_dir / "swap.img")],
            check=True,
        )
