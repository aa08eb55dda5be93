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
import platform
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamem import __version__
from dynamem.errors import DeadlineExceeded, VMError
from dynamem.paths import cache_dir
from dynamem.qemu.config import RunFiles, VMConfig, build_argv

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM

# Bumped whenever what a saved state holds, or how it is made, changes.
FORMAT = 2
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


# What QEMU 7.2 prints when an incoming migration fails to load, before it exits.
LOAD_FAILED = "load of migration failed"


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
            "build": self.meta.get("build"),
            "created": self.meta.get("created"),
            "boot_s": self.meta.get("boot_s"),
            "save_s": self.meta.get("save_s"),
            "stream_bytes": self.meta.get("stream_bytes"),
            "identical": list(IDENTICAL),
        }

    def discard(self) -> None:
        """Remove it; only under its lock (`start`), so nobody is loading it meanwhile."""
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


def _argv_shape(config: VMConfig) -> list[str]:
    """The QEMU command line with this cell's own paths and port left out: the devices, the
    CPU model (the accelerator's default included) and the guest's whole command line,
    dynamem's fixed kernel arguments included."""
    run = Path("/run-dir")
    fw_cfg = {"authorized_keys": run / "keys/client.pub", "hostkey": run / "keys/hostkey"}
    return build_argv(config, RunFiles(run, 0, fw_cfg))


def state_key(config: VMConfig) -> str:
    """Everything that shapes the saved state: the whole machine configuration and the
    command line it becomes (memory layout, devices, kernel arguments, accelerator, CPU
    model, swap and data disks), the guest image's files, the QEMU binary, dynamem itself
    (it decides what a ready guest is) and, under KVM, the host CPU and kernel (`-cpu
    host` is the host's). Configurations that differ in any of them never share a state."""
    fields = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
    }
    parts: dict[str, Any] = {
        "format": FORMAT,
        "dynamem": __version__,
        "config": fields,
        "argv": _argv_shape(config),
        "kernel": _file_identity(config.kernel),
        "initrd": _file_identity(config.initrd),
        "qemu": _file_identity(config.qemu_binary),
    }
    if config.accel == "kvm":
        from dynamem.cell import host_cpu_model

        parts["host"] = [host_cpu_model(), platform.release()]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# A holder builds (boot, save: bounded by its own deadlines) or starts one guest (a few
# seconds); longer means it is stuck (e.g. a stopped process), not busy.
LOCK_WAIT_S = 900.0


@contextlib.contextmanager
def _locked(key: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """One builder per state, also across processes (several runs, several workers)."""
    states_dir().mkdir(parents=True, exist_ok=True)
    path = states_dir() / f"{key}.lock"
    with open(path, "w") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"another process has held the saved state's lock {path} for over "
                        f"{wait_s:g} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checked_files(directory: Path) -> list[Path]:
    """The files a start uses, each checked against its sha256 before every use (the swap
    image is sparse and large: its size only; the guest read its header when it booted)."""
    return [directory / STREAM, *sorted((directory / "keys").glob("*"))]


def find(config: VMConfig) -> SavedState | None:
    """The saved state for `config`, if a complete and undamaged one exists."""
    key = state_key(config)
    directory = states_dir() / key
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    state = SavedState(directory, key, meta)
    if meta.get("format") != FORMAT:
        return None
    sums = meta.get("sha256") or {}
    try:
        files = _checked_files(directory)
        if sorted(sums) != sorted(str(f.relative_to(directory)) for f in files):
            return None
        if any(_sha256(f) != sums[str(f.relative_to(directory))] for f in files):
            return None
        swap = meta.get("swap_bytes")
        if swap is not None and state.swap_image.stat().st_size != swap:
            return None
    except OSError:
        return None
    return state


def ensure(config: VMConfig, ready_timeout: float = 180.0) -> tuple[SavedState, bool]:
    """The saved state for `config`, built now if there is none (or a damaged one);
    returns it and whether it was built here."""
    key = state_key(config)
    with _locked(key):
        return _find_or_build(config, key, ready_timeout)


def _find_or_build(config: VMConfig, key: str, ready_timeout: float) -> tuple[SavedState, bool]:
    state = find(config)
    if state is not None:
        return state, False
    return build(config, states_dir() / key, key, ready_timeout), True


@dataclass
class Started:
    """A VM started from a saved state, and how: `fetch_s` waiting for the state's lock,
    checking it and (if `built`) building it; `boot_s` launch to ready; `replaced` why a
    state QEMU could not load was discarded and built again."""

    vm: "VM"
    state: SavedState
    fetch_s: float
    boot_s: float
    built: bool
    replaced: str | None = None


def start(config: VMConfig, stack: contextlib.ExitStack, ready_timeout: float = 180.0) -> Started:
    """Start a VM of `config` from its saved state (built first if there is none); the VM
    is entered into `stack`, which stops it. The state's lock is held from the check to the
    guest being ready, so no other process discards or rebuilds it while it loads; a state
    QEMU cannot load is discarded under that lock and built again, once."""
    from dynamem.qemu.machine import VM

    key = state_key(config)
    fetch_s = boot_s = 0.0
    built = False
    replaced = None
    t = time.monotonic()
    with _locked(key):
        for attempt in (1, 2):
            state, built_now = _find_or_build(config, key, ready_timeout)
            built = built or built_now
            vm = stack.enter_context(VM(config, restore=state))
            fetch_s += time.monotonic() - t
            t = time.monotonic()
            try:
                vm.start(ready_timeout)
            except StateRejected as exc:
                if attempt == 2:
                    raise
                replaced = str(exc)
                state.discard()
                if vm.run_dir is not None:  # handled and recorded: nothing to keep
                    shutil.rmtree(vm.run_dir, ignore_errors=True)
                t = time.monotonic()
                continue
            boot_s = time.monotonic() - t
            return Started(vm, state, fetch_s, boot_s, built, replaced)
    raise AssertionError("unreachable")


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
            failed = work / "zstd.err"
            q = {name: shlex.quote(str(path)) for name, path in
                 (("part", partial), ("target", target), ("err", failed))}  # fmt: skip
            vm.qmp(
                "migrate",
                uri=f"exec:zstd -q -1 -o {q['part']} 2>{q['err']} && mv {q['part']} {q['target']}"
                f" || touch {q['err']}.done",
            )
            _wait_migration(vm, timeout=120.0)
            # QEMU reports completion once it closed the pipe; zstd finishes after that
            deadline = time.monotonic() + 60.0
            while not target.exists():
                if (work / "zstd.err.done").exists():
                    raise VMError(
                        "compressing the saved state failed: "
                        + (failed.read_text(errors="replace").strip() or "zstd failed")
                    )
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the saved state's compressor did not finish in 60 s")
                time.sleep(0.02)
            failed.unlink(missing_ok=True)
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
            "build": uuid.uuid4().hex[:12],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kernel_release": kernel_release,
            "boot_s": round(boot_s, 3),
            "save_s": round(save_s, 3),
            "stream_bytes": target.stat().st_size,
            "swap_bytes": (work / "swap.img").stat().st_size if config.swap == "disk" else None,
            "sha256": {str(f.relative_to(work)): _sha256(f) for f in _checked_files(work)},
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
