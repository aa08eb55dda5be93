"""Where dynamem keeps things: the build cache, per-run directories, the repository."""

import os
import tempfile
from pathlib import Path


def repo_root() -> Path:
    """The source tree (guest recipes live there; dynamem is installed editable from it)."""
    env = os.environ.get("DYNAMEM_REPO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def guests_dir() -> Path:
    return repo_root() / "guests"


def cache_dir() -> Path:
    """Downloaded packages and built guests; safe to delete, rebuilt on demand."""
    env = os.environ.get("DYNAMEM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynamem"


def make_run_dir(prefix: str = "vm") -> Path:
    """A fresh 0700 directory for one QEMU's sockets, keys and logs.

    Kept short because a QMP unix socket path must fit in 108 bytes.
    """
    base = os.environ.get("DYNAMEM_RUN_BASE") or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"dynamem-{prefix}-", dir=base))
    path.chmod(0o700)
    return path
