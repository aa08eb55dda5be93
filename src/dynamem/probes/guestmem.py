"""Guest /proc parsers and the kernel's own fragmentation measures (pure, vectorized).

The indices follow mm/vmstat.c exactly (fill_contig_page_info, unusable_free_index,
__fragmentation_index), including its integer arithmetic in thousandths, so they can be
checked against /sys/kernel/debug/extfrag/*.
"""

import re
from dataclasses import dataclass

import numpy as np

ORDERS = 11  # MAX_ORDER on x86-64 in 6.1: orders 0..10
THP_ORDER = 9
WATERMARK_FIELDS = ("min", "low", "high", "spanned", "present", "managed")
_ZONE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)")
_ZONE_FIELD = re.compile(r"^\s+(pages free|min|low|high|spanned|present|managed)\s+(\d+)\s*$")


@dataclass(frozen=True)
class Buddy:
    """Free blocks per zone and order, as /proc/buddyinfo prints them."""

    zones: tuple[str, ...]  # "Node0/DMA32"
    counts: np.ndarray  # shape (zones, ORDERS), int64


def parse_buddyinfo(text: str) -> Buddy:
    zones, rows = [], []
    for line in text.splitlines():
        m = re.match(r"^Node\s+(\d+),\s+zone\s+(\S+)\s+(.*)$", line)
        if not m:
            continue
        counts = [int(x) for x in m.group(3).split()][:ORDERS]
        counts += [0] * (ORDERS - len(counts))
        zones.append(f"Node{m.group(1)}/{m.group(2)}")
        rows.append(counts)
    return Buddy(tuple(zones), np.array(rows, dtype=np.int64).reshape(len(rows), ORDERS))


def contig_info(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(free pages, free blocks, suitable blocks per order) for each zone (row).

    suitable[z, o] = sum over k >= o of counts[z, k] * 2**(k - o), as a matrix product.
    """
    orders = np.arange(ORDERS)
    free = counts @ (1 << orders)
    blocks = counts.sum(axis=1)
    shift = orders[:, None] - orders[None, :]  # k - o
    weights = np.where(shift >= 0, np.left_shift(1, np.clip(shift, 0, None)), 0)
    suitable = counts @ weights
    return free, blocks, suitable


def unusable_index_milli(counts: np.ndarray) -> np.ndarray:
    """Unusable free space index x1000 per zone and order (mm/vmstat.c integer math)."""
    free, _, suitable = contig_info(counts)
    orders = np.arange(ORDERS)
    used = free[:, None] - suitable * (1 << orders)[None, :]
    safe = np.where(free == 0, 1, free)[:, None]
    return np.where(free[:, None] == 0, 1000, (used * 1000) // safe)


def fragmentation_index_milli(counts: np.ndarray) -> np.ndarray:
    """Fragmentation (extfrag) index x1000 per zone and order; -1000 means "not failing"."""
    free, blocks, suitable = contig_info(counts)
    requested = (1 << np.arange(ORDERS))[None, :]
    safe_blocks = np.where(blocks == 0, 1, blocks)[:, None]
    index = 1000 - (1000 + (free[:, None] * 1000) // requested) // safe_blocks
    index = np.where(suitable > 0, -1000, index)
    return np.where(blocks[:, None] == 0, 0, index)


def parse_extfrag(text: str) -> dict[str, list[int]]:
    """/sys/kernel/debug/extfrag/{unusable,extfrag}_index -> zone -> values x1000."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        m = re.match(r"^Node\s+(\d+),\s+zone\s+(\S+)\s+(.*)$", line)
        if m:
            out[f"Node{m.group(1)}/{m.group(2)}"] = [
                round(float(v) * 1000) for v in m.group(3).split()
            ]
    return out


def parse_zoneinfo(text: str) -> dict[str, dict[str, int]]:
    """/proc/zoneinfo -> zone -> {free, min, low, high, spanned, present, managed} (pages)."""
    zones: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        if m := _ZONE.match(line):
            current = zones.setdefault(f"Node{m.group(1)}/{m.group(2)}", {})
        elif current is not None and (m := _ZONE_FIELD.match(line)):
            key = "free" if m.group(1) == "pages free" else m.group(1)
            current.setdefault(key, int(m.group(2)))
    return zones


def parse_vmstat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2:
            out[words[0]] = int(words[1])
    return out
