"""Where dynamem keeps things: its shipped data, results, the build cache, run directories.

Guest recipes, suites and the asv suite ship inside the package (`dynamem.recipes`,
`dynamem.suites`, `dynamem.bench`, mapped from the checkout's `guests/`, `suites/` and
`bench/`), so an installed wheel works outside the checkout. Results go to
`DYNAMEM_RESULTS`, else the checkout's `results/` when dynamem runs from one, else
`./results`.
"""

import os
import tempfile
from importlib import resources
from pathlib import Path


def _package_dir(package: str) -> Path:
    return Path(str(resources.files(package)))


def guests_dir() -> Path:
    """Guest recipes (the checkout's `guests/`)."""
    return _package_dir("dynamem.recipes")


def suites_dir() -> Path:
    """Built-in suites (the checkout's `suites/`)."""
    return _package_dir("dynamem.suites")


def bench_dir() -> Path:
    """The asv benchmark suite (the checkout's `bench/`)."""
    return _package_dir("dynamem.bench")


def checkout() -> Path | None:
    """The source checkout dynamem is installed (editable) from, if it is."""
    env = os.environ.get("DYNAMEM_REPO")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "dynamem"' in pyproject.read_text(errors="replace"):
        return root
    return None


def results_dir() -> Path:
    """The results root: `raw/` (the truth), `report/`, and the nightly's `timeline/`,
    `asv/`, `html/`."""
    env = os.environ.get("DYNAMEM_RESULTS")
    if env:
        return Path(env)
    root = checkout()
    return (root if root is not None else Path.cwd()) / "results"


def raw_dir(root: Path | None = None) -> Path:
    return (root or results_dir()) / "raw"


def report_dir(run_id: str, root: Path | None = None) -> Path:
    return (root or results_dir()) / "report" / run_id


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
