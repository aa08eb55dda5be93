"""What one resize cost the guest and what the host got back, from snapshots (pure)."""

from typing import Any

import numpy as np

from dynamem.probes.guestmem import (
    THP_ORDER,
    WATERMARK_FIELDS,
    fragmentation_index_milli,
    parse_buddyinfo,
    parse_vmstat,
    parse_zoneinfo,
    unusable_index_milli,
)
from dynamem.probes.host import HostSnapshot, settle_time_ns
from dynamem.record import GuestCost, HostCost, ZoneFragmentation, ZoneWatermarks

VMSTAT_KEYS = (
    "pswpin", "pswpout", "pgmigrate_success", "pgmigrate_fail",
    "compact_stall", "compact_success", "compact_fail",
    "thp_fault_alloc", "thp_fault_fallback", "thp_collapse_alloc", "thp_split_page",
    "thp_migration_success", "thp_migration_fail",
    "oom_kill", "balloon_inflate", "balloon_deflate", "balloon_migrate",
)  # fmt: skip
MEMINFO_KEYS = (
    "MemTotal", "MemFree", "MemAvailable", "SwapFree", "AnonPages", "Cached", "Buffers",
    "AnonHugePages",
)  # fmt: skip
# Snapshots read by the guest before and after every resize.
GUEST_FILES = ("/proc/vmstat", "/proc/zoneinfo", "/proc/buddyinfo", "/proc/sys/vm/min_free_kbytes")


def vmstat_delta(before: str, after: str) -> dict[str, int]:
    b, a = parse_vmstat(before), parse_vmstat(after)
    return {k: a.get(k, 0) - b.get(k, 0) for k in VMSTAT_KEYS}


def watermarks(before: str, after: str) -> dict[str, ZoneWatermarks]:
    """zone -> each field (before, after) in pages, for zones populated before or after."""
    b, a = parse_zoneinfo(before), parse_zoneinfo(after)
    out = {}
    for zone in sorted(set(b) | set(a)):
        zb, za = b.get(zone, {}), a.get(zone, {})
        if not (zb.get("present") or za.get("present")):
            continue
        out[zone] = ZoneWatermarks(
            **{f: (zb.get(f, 0), za.get(f, 0)) for f in ("free", *WATERMARK_FIELDS)}
        )
    return out


def fragmentation(before: str, after: str) -> dict[str, ZoneFragmentation]:
    """zone -> unusable/extfrag index x1000, orders 0..10, before and after."""
    out: dict[str, dict[str, Any]] = {}
    for when, text in (("before", before), ("after", after)):
        buddy = parse_buddyinfo(text)
        unusable = unusable_index_milli(buddy.counts)
        extfrag = fragmentation_index_milli(buddy.counts)
        for i, zone in enumerate(buddy.zones):
            z = out.setdefault(zone, {})
            z[f"unusable_milli_{when}"] = unusable[i].tolist()
            z[f"extfrag_milli_{when}"] = extfrag[i].tolist()
    result = {}
    for zone, z in out.items():
        for kind in ("unusable", "extfrag"):
            z[f"{kind}_order{THP_ORDER}"] = tuple(
                (z.get(f"{kind}_milli_{w}") or [None] * (THP_ORDER + 1))[THP_ORDER]
                for w in ("before", "after")
            )
        result[zone] = ZoneFragmentation(**z)
    return result


def guest_cost(before: dict[str, str], after: dict[str, str]) -> GuestCost:
    vm = vmstat_delta(before["/proc/vmstat"], after["/proc/vmstat"])
    marks = watermarks(before["/proc/zoneinfo"], after["/proc/zoneinfo"])
    return GuestCost(
        vmstat_delta=vm,
        swap_out_pages=vm["pswpout"],
        swap_in_pages=vm["pswpin"],
        pages_migrated=vm["pgmigrate_success"],
        migrations_failed=vm["pgmigrate_fail"],
        compaction_stalls=vm["compact_stall"],
        oom_kills=vm["oom_kill"],
        watermarks=marks,
        watermarks_moved={
            zone: any(getattr(z, k)[0] != getattr(z, k)[1] for k in ("min", "low", "high"))
            for zone, z in marks.items()
        },
        min_free_kbytes=(
            int(before["/proc/sys/vm/min_free_kbytes"] or 0),
            int(after["/proc/sys/vm/min_free_kbytes"] or 0),
        ),
        fragmentation=fragmentation(before["/proc/buddyinfo"], after["/proc/buddyinfo"]),
    )


def host_cost(
    before: HostSnapshot, after: HostSnapshot, series: dict[str, np.ndarray], t_request_ns: int
) -> HostCost:
    rss_b, rss_a = before.qemu.get("Rss", 0), after.qemu.get("Rss", 0)
    settle = settle_time_ns(
        series["host_t_ns"], series["host_rss_kb"], t_request_ns,
        tolerance=max(1024, abs(rss_b - rss_a) * 0.01),
    )  # fmt: skip
    host_unusable = {
        zone: [
            int(unusable_index_milli(b.counts)[i][THP_ORDER])
            for b in (before.buddy, after.buddy)
            if zone in b.zones
            for i in [b.zones.index(zone)]
        ]
        for zone in before.buddy.zones
    }
    return HostCost(
        rss_before_kb=rss_b,
        rss_after_kb=rss_a,
        rss_reclaimed_bytes=(rss_b - rss_a) * 1024,
        rss_settle_s=None if settle is None else (settle - t_request_ns) / 1e9,
        anon_huge_before_kb=before.qemu.get("AnonHugePages", 0),
        anon_huge_after_kb=after.qemu.get("AnonHugePages", 0),
        shared_kb=(
            before.qemu.get("Shared_Clean", 0) + before.qemu.get("Shared_Dirty", 0),
            after.qemu.get("Shared_Clean", 0) + after.qemu.get("Shared_Dirty", 0),
        ),
        host_mem_available_delta_kb=after.meminfo.get("MemAvailable", 0)
        - before.meminfo.get("MemAvailable", 0),
        host_unusable_order9_milli=host_unusable,
    )
