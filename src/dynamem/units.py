"""Sizes as people write them ("512M", "1G", "1.5GiB") and as QEMU wants them (bytes)."""

import re

from dynamem.errors import UserError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

MiB = 1 << 20
GiB = 1 << 30
MAX_SIZE = 1 << 50  # 1 PiB: no guest, disk or step here is larger


def parse_size(text: str, *, what: str = "size", allow_zero: bool = False) -> int:
    """Parse a binary size (K/M/G/T are powers of 1024, as in QEMU's -m) into bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UserError(f"malformed {what} {text!r}: expected e.g. 512M, 1G, 1.5GiB or bytes")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value > MAX_SIZE:  # also inf, from a number too long for a float
        raise UserError(f"{what} {text!r} is above {format_size(MAX_SIZE)}")
    if value != int(value):
        raise UserError(f"{what} {text!r} is not a whole number of bytes")
    size = int(value)
    if size == 0 and not allow_zero:
        raise UserError(f"{what} {text!r} must be greater than zero")
    return size


def format_size(size: int) -> str:
    """Shortest exact binary form, e.g. 1073741824 -> '1G', 1536 MiB -> '1536M'."""
    for suffix, factor in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)
