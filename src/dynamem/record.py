"""The persisted record: what a run, a cell and each of its steps hold, as typed values.

These types are the contract between measuring (runner, resize, probes) and analysing
(metric table, report, compare, asv): each record is built in one place, read through
its attributes, and checked by mypy, so a renamed field fails type-checking instead of
quietly turning numbers into "-". Loading validates a JSON file against the same types
(pydantic), extra keys included: a record that does not fit is reported, never half-read.

Format history (the `format` key of `run.json` and of every cell record):

- 1 (dynamem 0.1, up to 115d3f6): untyped dicts. A cell had `scenario_config` (the
  scenario's merged TOML table) and `context`; a resize step carried `figures` (`guest`,
  `host`, `workload`); steps had no typed fields beyond `kind`; no `condition`.
- 2: typed. Every cell carries `condition` (everything that defines the experiment except
  the mechanism), `mechanism` (its typed configuration), `preparation` (the unmeasured
  resize that brought the guest to its starting size); a resize's derived numbers are its
  `cost`; settle steps carry their seconds. `upgrade_cell_v1` turns a format-1 cell into
  format 2 on load, so every run ever written still loads. Later additions to format 2
  are optional fields that older format-2 records load without: `guest_clock_s` (the
  guest-side duration on the guest's clock), the accelerator `tcg-icount`, and
  `guest_driver_s` / `guest_driver_end` / `guest_driver_trace` (the same duration from the
  driver's entry to the end of the last block's onlining or offlining, or to the look),
  `guest_looks_from`, `sampler_uevent_looks`, and the start mode: the condition's `start`
  ("boot" or "snapshot"), the context's `start` and `state` (the saved post-boot state a
  cell started from), the timings' `state_build` and the run metadata's `starts` and
  `start_identical`. Since then `timings.boot` counts from the QEMU launch; it used to
  include the cell's planning (under 0.1 s, now in `overhead`). Then where a cell ran:
  the cell's `host` (name, worker, CPU set, QEMU's applied CPU set, host fingerprint,
  host load over the steps) and `lost_attempts`, and the run metadata's `cluster`; a
  cell without `host` has the fingerprint "" and is compared pooled over hosts.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from dynamem.units import MiB, format_size, parse_size

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

# `skipped`: not attempted, because an earlier step left the guest off the planned path
# (a grow after a partial shrink would start from the wrong size).
Outcome = Literal["ok", "partial", "refused", "timeout", "unsupported", "error", "skipped"]
OUTCOMES: tuple[Outcome, ...] = (
    "ok", "partial", "refused", "timeout", "unsupported", "error", "skipped"
)  # fmt: skip
CellStatus = Literal["ok", "failed"]
Pair = tuple[int, int]  # (before, after)


class _Record:
    """Unknown keys are an error when loading: a field renamed on one side shows at once."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")


# -- what a resize cost (built by dynamem.probes.cost) ----------------------------------------


@dataclass
class ZoneWatermarks(_Record):
    """One zone's /proc/zoneinfo figures before and after, in 4 KiB pages."""

    free: Pair
    min: Pair
    low: Pair
    high: Pair
    spanned: Pair
    present: Pair
    managed: Pair


@dataclass
class ZoneFragmentation(_Record):
    """The kernel's unusable free space and fragmentation indices x1000, orders 0..10, of
    one zone before and after (None where the zone was empty or absent)."""

    unusable_milli_before: list[int] | None = None
    unusable_milli_after: list[int] | None = None
    extfrag_milli_before: list[int] | None = None
    extfrag_milli_after: list[int] | None = None
    unusable_order9: tuple[int | None, int | None] = (None, None)
    extfrag_order9: tuple[int | None, int | None] = (None, None)


@dataclass
class GuestCost(_Record):
    """What the resize cost inside the guest: /proc/vmstat deltas, zones, fragmentation."""

    vmstat_delta: dict[str, int]
    swap_out_pages: int
    swap_in_pages: int
    pages_migrated: int
    migrations_failed: int
    compaction_stalls: int
    oom_kills: int
    watermarks: dict[str, ZoneWatermarks]
    watermarks_moved: dict[str, bool]
    min_free_kbytes: Pair
    fragmentation: dict[str, ZoneFragmentation]


@dataclass
class HostCost(_Record):
    """What the host saw: QEMU's smaps_rollup, host MemAvailable and host buddyinfo."""

    rss_before_kb: int
    rss_after_kb: int
    rss_reclaimed_bytes: int
    rss_settle_s: float | None
    anon_huge_before_kb: int
    anon_huge_after_kb: int
    shared_kb: Pair
    host_mem_available_delta_kb: int
    host_unusable_order9_milli: dict[str, list[int]]


@dataclass
class WorkloadImpact(_Record):
    """What the `impact` workload felt during one resize (pages touched per second)."""

    throughput_before_pps: float | None = None
    throughput_during_pps: float | None = None
    slowdown: float | None = None
    longest_stall_ms: float | None = None


@dataclass
class ResizeCost(_Record):
    guest: GuestCost | None = None
    host: HostCost | None = None
    workload: WorkloadImpact | None = None


# -- one resize ------------------------------------------------------------------------------


@dataclass
class ResizeRecord(_Record):
    """One resize, timed end to end (built by `dynamem.resize.resize`).

    Times are on the host's monotonic clock (ns). `outcome` is the mechanism's verdict;
    only `ok` resizes enter cost and latency statistics.
    """

    mechanism: str
    variant: str
    direction: Literal["grow", "shrink"]
    requested_bytes: int  # signed: negative shrinks
    outcome: Outcome = "error"
    message: str = ""
    host_before_bytes: int | None = None
    host_after_bytes: int | None = None
    host_done_bytes: int | None = None  # signed change QEMU reports
    guest_memtotal_before_kb: int | None = None
    guest_memtotal_after_kb: int | None = None
    guest_memtotal_delta_bytes: int | None = None
    guest_balloon_delta_bytes: int | None = None  # pages the balloon holds, x4 KiB
    memory_blocks_before: dict[str, int] = field(default_factory=dict)
    memory_blocks_after: dict[str, int] = field(default_factory=dict)
    t_request_ns: int | None = None
    t_host_done_ns: int | None = None
    t_guest_done_ns: int | None = None
    host_latency_s: float | None = None
    guest_latency_s: float | None = None
    # guest-visible completion is late by at most this, never early (format 1 printed it as
    # "+/-"; the stamp was always one-sided)
    guest_bound_s: float | None = None
    polls: int = 0
    poll_period_median_s: float | None = None
    sample_interval_s: float | None = None  # the sampler's first (smallest) look interval
    samples: int = 0  # lines the sampler sent (looks that changed nothing are not sent)
    sampler_cpu_s: float | None = None
    channel_rtt_median_s: float | None = None
    channel_rtt_p95_s: float | None = None
    channel_rtt_max_s: float | None = None
    channel_rtt_n: int | None = None
    # How the harness watched (dynamem.observer), and what watching cost the guest.
    observer: str = "dense"  # the setting's name; format 1 watched as "dense" does
    observer_config: dict[str, Any] = field(default_factory=dict)  # its schedules
    cpu_model: str | None = None  # the guest's -cpu
    # when the in-guest sampler started looking: at the request, or at the host-side
    # outcome (the control arm; a DIMM grow, whose host side ends before the guest starts)
    guest_looks_from: Literal["request", "outcome"] | None = None
    host_bound_s: float | None = None  # host-side completion is late by at most this
    guest_bound_target_s: float | None = None  # max(5 ms, 1% of the guest latency)
    guest_look_gap_s: float | None = None  # guest clock: completing look minus the one before
    guest_reaction_s: float | None = None  # request to the first guest-visible change
    # guest clock: the last look before the first change to the look that saw completion
    # (the guest-side duration; deterministic under tcg-icount)
    guest_clock_s: float | None = None
    # guest clock: the mechanism's driver entry (the guest's function tracer) to the end of
    # its work: the guest-side duration from where the guest's work starts, including what
    # it does before MemTotal first moves (virtio-mem allocates and may zero a whole range
    # first). It ends at the kernel's stamp of the end of the last memory block's onlining
    # or offlining (hotplug: `guest_driver_end` "kernel") or at the look that saw
    # completion ("look": the balloon).
    # The traced lines are kept in `guest_driver_trace`.
    guest_driver_s: float | None = None
    guest_driver_end: Literal["kernel", "look"] | None = None
    guest_driver_trace: list[str] = field(default_factory=list)
    reaction_allowance_s: float | None = None  # how long a first change was waited for
    settle_quiet_s: float | None = None  # quiet period that ended the watch
    sampler_checks: int | None = None  # the sampler's looks, baseline to last, sent or not
    sampler_uevent_checks: int | None = None  # of the sent lines, those a uevent caused
    # of sampler_checks, those a uevent caused, sent or not (a uevent's look finds nothing
    # new when a timer look just before it saw the change: then it is not sent)
    sampler_uevent_looks: int | None = None
    # sampler_cpu_s is from just before the request to the end of the watch, this long on
    # the guest's clock
    sampler_window_s: float | None = None
    sampler_cpu_share: float | None = None  # sampler_cpu_s / sampler_window_s (one vCPU = 1)
    # the same from just before the request to the host-side outcome (guest's clock): what
    # the resize competed with
    sampler_request_cpu_s: float | None = None
    sampler_request_window_s: float | None = None
    sampler_request_share: float | None = None
    kernel_log: list[str] = field(default_factory=list)
    mechanism_config: dict[str, Any] = field(default_factory=dict)
    cost: ResizeCost = field(default_factory=ResizeCost)
    # Time series (numpy arrays; host monotonic ns). Never in the JSON record: the store
    # writes them to `<cell>.step<k>.npz`.
    series: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"transient": True})

    @property
    def label(self) -> str:
        return self.mechanism if self.variant == "default" else f"{self.mechanism}/{self.variant}"

    def series_lists(self) -> dict[str, list[float]]:
        """Series for JSON, times as seconds since the request."""
        t0 = self.t_request_ns or 0
        return {
            name: ((arr - t0) / 1e9).round(6).tolist() if name.endswith("t_ns") else arr.tolist()
            for name, arr in self.series.items()
        }


# -- the steps of a cell ---------------------------------------------------------------------


@dataclass
class ResizeStep(ResizeRecord):
    kind: Literal["resize"] = "resize"
    step: str = ""  # as the scenario wrote it, e.g. "shrink 256M"

    @classmethod
    def of(cls, label: str, result: ResizeRecord) -> "ResizeStep":
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(ResizeRecord)}
        return cls(**values, step=label)


@dataclass
class SettleStep(_Record):
    kind: Literal["settle"] = "settle"
    step: str = ""
    seconds: float = 0.0


@dataclass
class FreeStep(_Record):
    """The workload stopped; did the host get its memory back without a resize (Q10)?"""

    seconds: float
    rss_before_kb: int
    rss_after_kb: int
    rss_released_bytes: int
    guest_memfree_kb: Pair
    vmstat_delta: dict[str, int]
    kind: Literal["free"] = "free"
    step: str = ""
    series: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"transient": True})


@dataclass
class OomStep(_Record):
    """A request for more memory than the guest has: who gave way (Q8)?"""

    size: int
    seconds: float
    stress_exit: int
    oom_kills: int
    balloon_deflated_bytes: int
    host_before_bytes: int
    host_after_bytes: int
    vmstat_delta: dict[str, int]
    guest_alive: bool
    kind: Literal["oom"] = "oom"
    step: str = ""


@dataclass
class RebootStep(_Record):
    """system_reset, and what the guest came up with (Q9)."""

    seconds: float
    host_before_bytes: int
    host_after_bytes: int
    guest_memtotal_kb: Pair
    memory_blocks: tuple[dict[str, int], dict[str, int]]
    kind: Literal["reboot"] = "reboot"
    step: str = ""


Step = Annotated[
    ResizeStep | SettleStep | FreeStep | OomStep | RebootStep, Field(discriminator="kind")
]


# -- the cell --------------------------------------------------------------------------------


# The mechanisms' own no-progress limits (dynamem.mechanisms), to tell a scenario's choice.
NO_PROGRESS_DEFAULTS = {"balloon": 30.0, "dimm": 30.0, "virtio-mem": 160.0}


@dataclass(frozen=True)
class MechanismConfig(_Record):
    """The mechanism and every option of it a scenario set; `label` names it in reports."""

    name: str
    variant: str = "default"  # virtio-mem: sbm/bbm; balloon: doo, fpr, doo+fpr
    dimm_size: int | None = None
    block_size: int | None = None
    boot_memory: int | None = None  # when the scenario fixed it
    maxmem: int | None = None  # when the scenario fixed it
    no_progress_s: float | None = None  # a resize with no progress this long ends

    @property
    def label(self) -> str:
        """The name a reader sees; every option a scenario set beyond the defaults is in it,
        so mechanisms configured differently are never pooled."""
        base = self.name if self.variant in ("", "default") else f"{self.name}/{self.variant}"
        if self.dimm_size not in (None, 128 * MiB):
            base += f"/{format_size(self.dimm_size or 0)}"
        extra = [
            f"{what} {format_size(value)}"
            for what, value in (("boot", self.boot_memory), ("maxmem", self.maxmem))
            if value
        ]
        if self.no_progress_s not in (None, NO_PROGRESS_DEFAULTS.get(self.name)):
            extra.append(f"no-progress {self.no_progress_s:g}s")
        return base + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class Condition(_Record):
    """Everything that defines what a cell measured, except the mechanism.

    Cells are compared across mechanisms only when their conditions are equal; nothing
    that differs here is ever pooled into one statistic.
    """

    memory: int  # guest size when the first measured step starts
    cpus: int
    cpu_model: str  # QEMU -cpu
    accel: str  # kvm, tcg or tcg-icount (never pooled with each other)
    workload: str
    workload_size: int
    touch: int  # touched and freed before the workload (HyperAlloc's set-up)
    swap: str
    swap_size: int
    memhp_default_state: str
    kernel_args: tuple[str, ...]
    warmup: bool
    steps: tuple[str, ...]  # the scenario's whole step sequence
    observer: str = "adaptive"  # how the harness watched (dynamem.observer)
    start: str = "boot"  # how the cell's guest started
    # the guest: an embedded recipe's name, or "cloud NAME SHA256[:12]" (dynamem.guest.cloud)
    guest: str = "minimal"

    @property
    def workload_label(self) -> str:
        if self.workload == "idle":
            text = "idle"
        else:
            text = f"{self.workload} {format_size(self.workload_size)}"
        return text + (f", touched {format_size(self.touch)} first" if self.touch else "")

    def describe(self) -> str:
        """One line a reader can check: what every compared cell shared."""
        parts = [
            f"{format_size(self.memory)} guest",
            f"{self.cpus} vCPU{'s' if self.cpus > 1 else ''}",
            f"-cpu {self.cpu_model}",
            self.accel,
            self.workload_label,
            f"swap {self.swap}"
            + (f" {format_size(self.swap_size)}" if self.swap != "none" else ""),
            f"memhp {self.memhp_default_state}",
        ]
        if self.kernel_args:
            parts.append("kernel " + " ".join(self.kernel_args))
        parts.append("warm-up" if self.warmup else "no warm-up")
        parts.append(f"observer {self.observer}")
        if self.start != "boot":
            parts.append(f"start {self.start}")
        if self.guest != "minimal":
            parts.append(f"guest {self.guest}")
        parts.append("steps: " + ", ".join(self.steps))
        return "; ".join(parts)


@dataclass
class Timings(_Record):
    """Seconds per phase of a cell; `overhead` is the runner's own time. `boot` is launch to
    ready (SSH answered, sampler connected), from a fresh boot or from a saved state;
    `state_build` is getting the saved state: waiting for its lock, checking its sha256 sums
    and, for the first cell of a configuration, building it."""

    boot: float = 0.0
    state_build: float = 0.0
    preparation: float = 0.0
    warmup: float = 0.0
    workload_start: float = 0.0
    steps: float = 0.0
    total: float = 0.0
    overhead: float = 0.0


@dataclass
class StartState(_Record):
    """The saved post-boot state a cell started from (dynamem.qemu.snapshot)."""

    key: str  # covers the machine configuration, the guest image and the QEMU binary
    build: str | None  # which build of that key (a rebuilt state gets a new one)
    created: str | None
    boot_s: float | None  # the one fresh boot it was saved from: launch to ready
    save_s: float | None
    stream_bytes: int | None  # the saved state, zstd-compressed
    identical: list[str]  # what every cell started from it shares, by construction
    built_here: bool = False  # this cell built it (its time is the cell's state_build)
    # why an earlier state of this configuration was discarded and this one built (QEMU
    # could not load it), if that happened in this cell
    replaced: str | None = None


@dataclass
class CellContext(_Record):
    """What this cell's guest really was, read once it booted."""

    accel: str
    accel_reason: str
    qemu_version: str
    guest_kernel: str
    guest_image: str | None
    host_kernel: str
    host_cpu: str
    cpus: int
    boot_memory: int
    maxmem: int | None
    slots: int
    memhp_default_state: str
    swap: str
    swap_size: int
    kernel_cmdline: str
    before_bytes: int
    dynamem_version: str
    boot_kernel_log: list[str] = field(default_factory=list)
    cpu_model: str | None = None
    memtotal_start_kb: int | None = None  # guest MemTotal when the measured steps start
    start: str = "boot"  # a fresh boot, or "snapshot": a saved post-boot state (`state`)
    state: StartState | None = None


@dataclass
class HostLoad(_Record):
    """How busy the cell's host was while its steps ran (/proc/stat over the steps): the
    measure of interference between cells that share a host (`--cluster local:N`)."""

    seconds: float
    busy_all: float  # share of all the host's CPUs busy (0-1)
    busy_cpuset: float  # share of the cell's own CPU set busy (its QEMU's, mostly)
    loadavg_1m: float  # at the end of the steps


@dataclass
class HostInfo(_Record):
    """Where a cell ran. Cells whose fingerprints differ are never pooled: the fingerprint
    is part of the condition the report and `compare` group by."""

    name: str  # the host's name (platform.node())
    worker: str  # "serial", or the Dask worker that ran the cell
    cpus: list[int]  # the host CPUs the cell (QEMU's threads included) was pinned to
    fingerprint: str  # CPU model, host kernel, QEMU version, accelerator, CPU count
    load: HostLoad | None = None
    qemu_cpus: list[int] | None = None  # the CPUs QEMU was allowed, read from its PID


@dataclass
class Injected(_Record):
    fault: str
    fired: bool


@dataclass
class CellRecord(_Record):
    """One repeat of one scenario on a fresh guest: every step, or why it stopped."""

    cell: str
    scenario: str
    repeat: int
    mechanism: MechanismConfig
    condition: Condition
    status: CellStatus = "failed"
    error: str = ""
    failed_at: str | None = None
    console_tail: str = ""
    steps: list[Step] = field(default_factory=list)
    preparation: ResizeRecord | None = None
    timings: Timings = field(default_factory=Timings)
    context: CellContext | None = None
    injected: Injected | None = None
    host: HostInfo | None = None  # where it ran (None: recorded before cells kept it)
    # earlier attempts of this cell lost with their Dask worker (each: worker and reason);
    # the cell was then run again, this record is that run
    lost_attempts: list[str] = field(default_factory=list)
    workload_ready_s: float | None = None
    reproduces: str | None = None  # a published experiment this scenario runs (scaled)
    scenario_config: dict[str, Any] = field(default_factory=dict)  # as written in the suite
    format: int = FORMAT_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def resizes(self) -> list[tuple[int, ResizeStep]]:
        """(position in the cell, step) of every measured resize."""
        return [(k, s) for k, s in enumerate(self.steps) if isinstance(s, ResizeStep)]

    def series(self) -> list[dict[str, Any]]:
        """The time series of each step, for the store's .npz files."""
        out: list[dict[str, Any]] = []
        for s in self.steps:
            if isinstance(s, ResizeStep):
                out.append({"t_request_ns": np.int64(s.t_request_ns or 0), **s.series})
            elif isinstance(s, FreeStep):
                out.append(dict(s.series))
            else:
                out.append({})
        return out


# -- the run ---------------------------------------------------------------------------------


@dataclass
class SuiteSource(_Record):
    name: str
    toml: str


@dataclass
class CloudImageInfo(_Record):
    """The cloud image a run booted (dynamem.guest.cloud). `onlining` is what in the image
    onlines hotplugged memory besides the kernel's memhp_default_state (a udev rule, or
    none); `sha256_after` is the base read again after the last cell (it must not change)."""

    name: str
    path: str
    sha256: str
    format: str
    os: str
    kernel_release: str
    root: str
    onlining: str
    sha256_after: str | None = None


@dataclass
class RunMetadata(_Record):
    """The host and software a run used: runs that differ here are never pooled."""

    host_kernel: str
    host_cpu: str
    host_cpus: int | None
    qemu_version: str
    accel: str
    accel_reason: str
    guest: str
    guest_kernel: str
    guest_image: str | None
    guest_packages: dict[str, str] | None
    dynamem_version: str
    git_commit: str
    python: str
    # how the suite's cells start ("boot", "snapshot"), and what cells started from one
    # saved state share by construction (dynamem.qemu.snapshot.IDENTICAL)
    starts: list[str] | None = None
    start_identical: list[str] | None = None
    cluster: str | None = None  # `--cluster` of the invocation that started it (None: serial)
    cloud_image: CloudImageInfo | None = None  # the run's guest is a cloud image


@dataclass
class RunRecord(_Record):
    run_id: str
    created: str
    suite: SuiteSource
    seed: int
    order: list[str]
    metadata: RunMetadata
    format: int = FORMAT_VERSION


# -- JSON ------------------------------------------------------------------------------------


def to_json_data(value: Any) -> Any:
    """Plain JSON data of a record: dataclasses as objects, tuples as lists, numpy scalars
    as numbers; fields marked transient (time series) left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json_data(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("transient")
        }
    if isinstance(value, dict):
        return {str(k): to_json_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_data(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


_CELL = TypeAdapter(CellRecord)
_RUN = TypeAdapter(RunRecord)
_RESIZE = TypeAdapter(ResizeRecord)


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def load_cell(data: Any, run: dict[str, Any] | None = None, cell_id: str = "") -> CellRecord:
    """A cell record from its JSON data, format 1 upgraded; ValueError naming the problem."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    version = data.get("format", 1)
    if version not in READABLE_FORMATS:
        raise ValueError(f"cell format {version!r}; this dynamem reads {READABLE_FORMATS}")
    if version == 1:
        data = upgrade_cell_v1({"cell": cell_id, **data}, run or {})
    try:
        return _CELL.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


def load_run(data: Any) -> RunRecord:
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    version = data.get("format")
    if version not in READABLE_FORMATS:
        raise ValueError(f"results format {version!r}; this dynamem reads {READABLE_FORMATS}")
    data = {**data, "format": FORMAT_VERSION} if version == 1 else data
    try:
        return _RUN.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


def load_resize(data: Any) -> ResizeRecord:
    try:
        return _RESIZE.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


# -- format 1 -> 2 ---------------------------------------------------------------------------

_SETTLE = re.compile(r"^\s*(?:settle|free)\s+(\d+(?:\.\d+)?)\s*s\s*$")
_V1_STEP_KEYS = {"kind", "step"}


def _v1_size(text: Any, memory: int, default: int = 0) -> int:
    if text is None:
        return default
    if isinstance(text, str) and text.endswith("%"):
        return int(memory * float(text[:-1]) / 100) // MiB * MiB
    return parse_size(str(text))


def _v1_mechanism(raw: dict[str, Any], steps: list[dict[str, Any]]) -> MechanismConfig:
    name = str(raw.get("mechanism", "?"))
    cfg = next((s.get("mechanism_config") or {} for s in steps if s.get("kind") == "resize"), {})
    variant = next(
        (str(s["variant"]) for s in steps if s.get("kind") == "resize" and s.get("variant")), None
    )
    if variant is None:  # a cell that failed before its first resize
        if name == "virtio-mem":
            variant = str(raw.get("variant", "sbm"))
        elif name == "balloon":
            opts = [o for o, k in (("doo", "deflate_on_oom"), ("fpr", "free_page_reporting"))
                    if raw.get(k)]  # fmt: skip
            variant = "+".join(opts) or "default"
        else:
            variant = "default"
    dimm = raw.get("dimm_size")
    return MechanismConfig(
        name=name,
        variant=variant,
        dimm_size=cfg.get("dimm_size") or (parse_size(dimm) if dimm else None)
        if name == "dimm"
        else None,
        block_size=cfg.get("block_size") if name == "virtio-mem" else None,
        boot_memory=parse_size(raw["boot_memory"]) if raw.get("boot_memory") else None,
        maxmem=parse_size(raw["maxmem"]) if raw.get("maxmem") else None,
        no_progress_s=NO_PROGRESS_DEFAULTS.get(name, 30.0),  # format 1: 30 s for all; kept out
        # of the label, so a format-1 mechanism reads as the same mechanism
    )


def _v1_condition(raw: dict[str, Any], context: dict[str, Any], accel: str) -> Condition:
    memory = _v1_size(raw.get("memory"), 0, 2 << 30)
    workload = str(raw.get("workload", "idle"))
    return Condition(
        memory=memory,
        cpus=int(raw.get("cpus", 2)),
        cpu_model="host" if accel == "kvm" else "max",  # what format 1 always used
        accel=accel,
        workload=workload,
        workload_size=_v1_size(raw.get("workload_size"), memory) if workload != "idle" else 0,
        touch=0,
        swap=str(raw.get("swap", "disk")),
        swap_size=_v1_size(raw.get("swap_size"), memory, 1 << 30)
        if raw.get("swap", "disk") != "none"
        else 0,
        memhp_default_state=str(raw.get("memhp_default_state", "online_movable")),
        kernel_args=tuple(str(a) for a in raw.get("kernel_args", ())),
        warmup=bool(raw.get("warmup", True)),
        steps=tuple(str(s) for s in raw.get("steps", ())),
        observer="dense",  # format 1 sampled at 500 Hz and polled QMP every 2 ms: "dense"
        start="boot",
    )


def _v1_step(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    kind = out.get("kind")
    if kind == "resize":
        figures = out.pop("figures", None) or {}
        out["cost"] = {k: v for k, v in figures.items() if k in ("guest", "host", "workload")}
    elif kind == "settle":
        m = _SETTLE.match(str(out.get("step", "")))
        out["seconds"] = float(m.group(1)) if m else 0.0
    elif kind == "free":
        out.pop("series", None)
    return out


def _v1_off_path(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Format 1 attempted a resize after a partial one, from the wrong size (a grow of 256M
    after a shrink that stopped at 128M): format 2 records those as `skipped`."""
    out, off = [], False
    for step in steps:
        if step.get("kind") == "resize":
            if off:
                was = f"{step.get('outcome')}: {step.get('message', '')}".strip(": ")
                step = {**step, "outcome": "skipped",
                        "message": f"attempted off the planned path after a partial step "
                                   f"(format 1 recorded it as {was})"}  # fmt: skip
            elif step.get("outcome") == "partial" or (
                step.get("outcome") == "timeout" and step.get("host_done_bytes")
            ):
                off = True
        out.append(step)
    return out


def upgrade_cell_v1(data: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """A format-1 cell record as format-2 data (pure; the file is never rewritten)."""
    raw = data.get("scenario_config") or {}
    steps = [s for s in data.get("steps") or [] if isinstance(s, dict)]
    context = data.get("context") or {}
    accel = str(context.get("accel") or (run.get("metadata") or {}).get("accel") or "tcg")
    out = {k: v for k, v in data.items() if k not in ("mechanism", "workload", "context")}
    out.update(
        format=FORMAT_VERSION,
        mechanism=to_json_data(_v1_mechanism(raw, steps)),
        condition=to_json_data(_v1_condition(raw, context, accel)),
        steps=_v1_off_path([_v1_step(s) for s in data.get("steps") or []]),
        context=context or None,
    )
    if context:
        out["context"] = {**context, "cpu_model": "host" if accel == "kvm" else "max"}
    return out
