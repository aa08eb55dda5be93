"""Parsers for what the guest kernel prints (pure; fixtures captured from real guests)."""

import re
from collections import Counter


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: value}; values in kB stay in kB, counts stay counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if key and words:
            out[key.strip()] = int(words[0])
    return out


def parse_memblocks(text: str) -> list[tuple[int, str, str]]:
    """The sampler's 'memblocks' listing -> [(block number, state, valid_zones)]."""
    blocks = []
    for line in text.splitlines():
        words = line.split(maxsplit=2)
        if len(words) >= 2 and words[0].startswith("memory"):
            blocks.append((int(words[0][6:]), words[1], words[2] if len(words) > 2 else ""))
    return blocks


def summarize_memblocks(blocks: list[tuple[int, str, str]]) -> dict[str, int]:
    """Counts by state, and online blocks by zone (an online block's valid_zones is its zone)."""
    counts: Counter[str] = Counter()
    for _, state, zones in blocks:
        counts[state] += 1
        if state == "online" and zones and " " not in zones:
            counts[f"online:{zones}"] += 1
    return dict(sorted(counts.items()))


HOTPLUG_LOG_WORDS = (
    "virtio_mem",
    "virtio-mem",
    "balloon",
    "acpi_memhotplug",
    "memory hot",
    "hotplug memory",
    "offlin",
    "onlin",
    "memory_block",
    "Memory block",
)


def hotplug_log_lines(dmesg: str) -> list[str]:
    """Kernel log lines about memory hot(un)plug and the balloon."""
    return [
        line
        for line in dmesg.splitlines()
        if any(w.lower() in line.lower() for w in HOTPLUG_LOG_WORDS)
    ]


def parse_kmsg(text: str) -> list[str]:
    """/dev/kmsg records ("prio,seq,usec,flags;message") -> "[   sec.usec] message" lines."""
    lines = []
    for record in text.splitlines():
        if record.startswith(" "):  # continuation ("KEY=value" dictionary lines)
            continue
        head, sep, message = record.partition(";")
        fields = head.split(",")
        if not sep or len(fields) < 3 or not fields[2].isdigit():
            continue
        usec = int(fields[2])
        lines.append(f"[{usec // 1_000_000:5d}.{usec % 1_000_000:06d}] {message}")
    return lines


_FTRACE_LINE = re.compile(r"\[\d+\]\s+\S+\s+(\d+)\.(\d+):\s+(\w+)\b")


def parse_ftrace(text: str) -> list[tuple[int, str, str]]:
    """The function tracer's `trace` file -> (timestamp ns, function, line) per event.

    Timestamps are on the trace clock the guest chose (`mono`: CLOCK_MONOTONIC), printed
    in microseconds for that clock; task names may hold spaces, so a line is read from its
    CPU field on."""
    events = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _FTRACE_LINE.search(line)
        if m:
            sec, frac, func = m.groups()
            events.append((int(sec) * 10**9 + int(frac.ljust(9, "0")[:9]), func, line.strip()))
    return events
