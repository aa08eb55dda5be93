"""Which shared objects a binary needs, read with binutils' readelf (no loader is run)."""

import re
import subprocess
from pathlib import Path

from dynamem.errors import GuestBuildError

_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")
_INTERP = re.compile(r"Requesting program interpreter: ([^\]]+)\]")


def readelf(path: Path) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP) of an ELF file."""
    try:
        proc = subprocess.run(
            ["readelf", "-d", "-l", "-W", str(path)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError("readelf not found: install binutils") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"readelf {path}: {proc.stderr.strip()}")
    interp = _INTERP.search(proc.stdout)
    return _NEEDED.findall(proc.stdout), interp.group(1) if interp else None


LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib", "lib64")


def library_closure(root: Path, binaries: list[Path]) -> dict[str, Path]:
    """soname -> file under `root` for every library the binaries need, transitively."""
    found: dict[str, Path] = {}
    queue = list(binaries)
    while queue:
        needed, _ = readelf(queue.pop())
        for soname in needed:
            if soname in found:
                continue
            for d in LIB_DIRS:
                candidate = root / d / soname
                if candidate.exists():
                    found[soname] = candidate
                    queue.append(candidate.resolve())
                    break
            else:
                raise GuestBuildError(f"no package in the lock provides {soname}")
    return found
