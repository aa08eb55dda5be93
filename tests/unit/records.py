"""Records for unit tests: real format-1 cells upgraded on load, and small typed builders
for the cases a real run rarely shows (a partial resize, a cell that failed at boot)."""

import dataclasses
import json
from pathlib import Path

from dynamem.record import (
    CellContext,
    CellRecord,
    Condition,
    GuestCost,
    HostCost,
    MechanismConfig,
    ResizeCost,
    ResizeStep,
    RunMetadata,
    RunRecord,
    SuiteSource,
    load_cell,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
FORMAT1_QUICK = FIXTURES / "format1" / "quick-115d3f6"  # a whole quick run, format 1
MiB = 2**20

QUICK_TOML = """
name = "quick"
repeats = 5
seed = 20261126
[defaults]
memory = "1G"
swap_size = "512M"
steps = ["shrink 256M", "grow 256M"]
warmup = false
[[scenario]]
name = "balloon-idle"
mechanism = "balloon"
[[scenario]]
name = "virtio-mem-idle"
mechanism = "virtio-mem"
"""


def fixture_cell(name: str) -> CellRecord:
    """A format-1 cell record captured from a real run, upgraded as the store does."""
    data = json.loads((FIXTURES / name).read_text())
    return load_cell(data, {"metadata": {"accel": "tcg"}}, Path(name).stem)


def metadata(**changes: object) -> RunMetadata:
    base = RunMetadata(
        host_kernel="6.18", host_cpu="AMD EPYC", host_cpus=2, qemu_version="7.2.22",
        accel="tcg", accel_reason="test", guest="minimal", guest_kernel="6.1.0-56-amd64",
        guest_image="d22d3e06", guest_packages={"linux-image-6.1.0-56-amd64": "6.1.192-2"},
        dynamem_version="0.1.0", git_commit="0" * 40, python="3.11.7",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def run_record(order: list[str], toml: str = QUICK_TOML, **meta: object) -> RunRecord:
    return RunRecord(
        run_id="20261129-000000-quick",
        created="2026-11-29T00:00:00+00:00",
        suite=SuiteSource(name="quick", toml=toml),
        seed=20261126,
        order=order,
        metadata=metadata(**meta),
    )


def condition(**changes: object) -> Condition:
    base = Condition(
        memory=1 << 30, cpus=2, cpu_model="max", accel="tcg", workload="idle",
        workload_size=0, touch=0, swap="disk", swap_size=512 * MiB,
        memhp_default_state="online_movable", kernel_args=(), warmup=False,
        steps=("shrink 256M", "grow 256M"),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def guest_cost(**changes: int) -> GuestCost:
    values = dict(swap_out_pages=0, swap_in_pages=0, pages_migrated=0, migrations_failed=0,
                  compaction_stalls=0, oom_kills=0)  # fmt: skip
    values.update(changes)
    return GuestCost(
        vmstat_delta={}, watermarks={}, watermarks_moved={}, min_free_kbytes=(0, 0),
        fragmentation={}, **values,
    )  # fmt: skip


def host_cost(reclaimed: int = 0) -> HostCost:
    return HostCost(
        rss_before_kb=1000, rss_after_kb=1000 - reclaimed // 1024, rss_reclaimed_bytes=reclaimed,
        rss_settle_s=0.1, anon_huge_before_kb=0, anon_huge_after_kb=0, shared_kb=(0, 0),
        host_mem_available_delta_kb=0, host_unusable_order9_milli={},
    )  # fmt: skip


def resize(
    delta: int = -256 * MiB,
    latency: float | None = 1.0,
    outcome: str = "ok",
    mechanism: str = "balloon",
    variant: str = "default",
    migrated: int = 0,
) -> ResizeStep:
    size = f"{abs(delta) // MiB}M"
    return ResizeStep(
        mechanism=mechanism,
        variant=variant,
        direction="grow" if delta > 0 else "shrink",
        requested_bytes=delta,
        outcome=outcome,  # type: ignore[arg-type]
        host_latency_s=latency,
        guest_latency_s=latency,
        guest_memtotal_delta_bytes=delta if outcome == "ok" else delta // 2,
        step=f"{'grow' if delta > 0 else 'shrink'} {size}",
        cost=ResizeCost(guest=guest_cost(pages_migrated=migrated), host=host_cost()),
    )


def cell(
    scenario: str,
    repeat: int,
    steps: list[ResizeStep],
    *,
    mechanism: str = "balloon",
    variant: str = "default",
    status: str = "ok",
    error: str = "",
    cond: Condition | None = None,
) -> CellRecord:
    return CellRecord(
        cell=f"{scenario}-r{repeat}",
        scenario=scenario,
        repeat=repeat,
        mechanism=MechanismConfig(name=mechanism, variant=variant),
        condition=cond or condition(),
        status=status,  # type: ignore[arg-type]
        error=error,
        steps=list(steps),
        context=None if status != "ok" else context(),
    )


def context() -> CellContext:
    return CellContext(
        accel="tcg", accel_reason="test", qemu_version="7.2.22", guest_kernel="6.1.0-56-amd64",
        guest_image="d22d3e06", host_kernel="6.18", host_cpu="AMD EPYC", cpus=2,
        boot_memory=1 << 30, maxmem=None, slots=0, memhp_default_state="online_movable",
        swap="disk", swap_size=512 * MiB, kernel_cmdline="console=ttyS0", before_bytes=1 << 30,
        dynamem_version="0.1.0", cpu_model="max", memtotal_start_kb=981476,
    )  # fmt: skip


def quick_pair(scenario: str, repeat: int, latency: float, **kw: object) -> CellRecord:
    """A quick-suite cell: shrink 256M then grow 256M, both ok unless told."""
    mech = str(kw.pop("mechanism", "balloon"))
    variant = str(kw.pop("variant", "default"))
    shrink_outcome = str(kw.pop("shrink_outcome", "ok"))
    steps = [
        resize(-256 * MiB, latency, shrink_outcome, mech, variant),
        resize(256 * MiB, latency / 10, "ok", mech, variant),
    ]
    return cell(scenario, repeat, steps, mechanism=mech, variant=variant, **kw)  # type: ignore[arg-type]
