"""What one arm of a case study records: guests, the controller's decisions, time series.

An arm is one case study run once with one mechanism (or with static memory, the
baseline) on fresh guests. Its JSON (`cases/<arm-id>.json` in the run directory) holds
every decision the controller made, with its reason, request, outcome and timing, and
each guest's workload phases; its `.npz` beside it holds the time series (each guest's
pressure looks and sizes; the host's RSS of every guest). Types are validated on load like
`dynamem.record`'s, so a renamed field shows at once.
"""

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from dynamem.record import MechanismConfig, _one_line, _Record, to_json_data

CASE_FORMAT = 1


@dataclass
class Phase(_Record):
    """One working-set phase of a guest's workload (size 0: idle)."""

    size: int
    seconds: float
    start_s: float  # from the guest's workload start
    exit_code: int | None = None  # of `timeout SECONDS dynamem-impact` (None: idle/unknown)
    pages: int = 0  # pages the probe touched after its working set was resident
    ready: bool = False  # the working set became resident
    # idle, completed, killed (SIGKILL: the OOM killer), failed, or unknown (never read:
    # the arm failed before its phases were collected)
    outcome: str = "unknown"
    started_s: float | None = None  # when it really started (host clock, from the script's)

    @property
    def throughput_pps(self) -> float | None:
        return self.pages / self.seconds if self.size else None


@dataclass
class CaseGuest(_Record):
    name: str
    floor: int
    start: int  # size when the workloads start (static: its fixed size)
    ceiling: int
    boot_memory: int
    phases: list[Phase]
    kernel_cmdline: str = ""
    boot_s: float = 0.0
    workload_start_ns: int = 0  # host monotonic, when its phase script started
    guest_offset_ns: int = 0  # host clock = guest clock + this (from the sampler)
    # None: not measured (the arm failed before the guest's last look)
    oom_kills: int | None = None
    swap_in_pages: int | None = None
    swap_out_pages: int | None = None
    major_faults: int | None = None
    psi_some_s: float | None = None  # time with some task stalled on memory (None: no PSI)
    end_size: int = 0


@dataclass
class Decision(_Record):
    """One move the controller decided, and what became of it."""

    round: int
    t_ns: int  # host monotonic, when it was decided
    guest: str
    kind: str  # grow, shrink, none (under pressure, nothing to give)
    requested: int  # bytes (positive)
    reason: str
    outcome: str = "not run"  # a resize outcome, or "not run"
    done: int = 0  # signed bytes QEMU reports moved
    message: str = ""
    t_request_ns: int | None = None
    t_visible_ns: int | None = None  # host time the guest saw its new size
    host_latency_s: float | None = None
    guest_latency_s: float | None = None


@dataclass
class CaseArm(_Record):
    arm: str  # <case>-<mechanism|static>-r<repeat>
    case: str
    title: str
    mechanism: str  # balloon, dimm, virtio-mem or static
    repeat: int
    budget: int
    interval_s: float
    accel: str
    cpu_model: str
    cpus: int
    swap: str
    swap_size: int
    kernel_args: list[str]
    guest_image: str  # the guest's label (dynamem.launch.guest_label)
    policy: dict[str, Any]
    move_deadline_s: float
    mechanism_config: MechanismConfig | None = None
    status: str = "failed"
    error: str = ""
    failed_at: str | None = None
    guests: list[CaseGuest] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    rss_limit: float = 1.05  # the host check: guest RAM RSS <= budget x this
    t0_ns: int = 0  # host monotonic, the first guest's workload start
    duration_s: float = 0.0
    wall_s: float = 0.0  # the arm from planning to stopped guests
    qemu_version: str = ""
    guest_kernel: str = ""
    format: int = CASE_FORMAT

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_ARM = TypeAdapter(CaseArm)


def load_arm(data: Any) -> CaseArm:
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    try:
        return _ARM.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


def cases_dir(run_dir: Path) -> Path:
    return run_dir / "cases"


def write_arm(run_dir: Path, arm: CaseArm, series: dict[str, np.ndarray]) -> None:
    """Series first, the JSON last: its presence means the arm is complete."""
    from dynamem.store import atomic_write

    d = cases_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **series)  # type: ignore[arg-type]
    atomic_write(d / f"{arm.arm}.npz", buf.getvalue())
    text = json.dumps(to_json_data(arm), indent=1, sort_keys=True) + "\n"
    atomic_write(d / f"{arm.arm}.json", text.encode())


def load_arms(run_dir: Path) -> tuple[list[CaseArm], list[str]]:
    arms, problems = [], []
    for path in sorted(cases_dir(run_dir).glob("*.json")):
        try:
            arm = load_arm(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        if arm.arm != path.stem:
            problems.append(f"{path.name}: holds arm {arm.arm!r}")
            continue
        arms.append(arm)
    return arms, problems


def load_series(run_dir: Path, arm_id: str) -> dict[str, np.ndarray]:
    path = cases_dir(run_dir) / f"{arm_id}.npz"
    if not path.exists():
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
