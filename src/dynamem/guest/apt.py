"""Resolving and fetching Debian packages with the host's apt (apt-cache, apt-get download)."""

import hashlib
import subprocess
from collections.abc import Iterable
from pathlib import Path

from dynamem.errors import GuestBuildError
from dynamem.guest.recipe import Lock, LockedPackage, Recipe


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} not found: this needs apt (Debian/Ubuntu)") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GuestBuildError(f"{' '.join(argv[:3])} ... failed: {tail}")
    return proc.stdout


def parse_control(text: str) -> list[dict[str, str]]:
    """Split `apt-cache show` output into one dict per stanza (continuation lines dropped)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
                current = {}
        elif not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_recursive_depends(text: str) -> list[str]:
    """Real package names from `apt-cache depends --recurse` (virtual ones are <bracketed>)."""
    names = {line.strip() for line in text.splitlines() if line and not line[0].isspace()}
    return sorted(n for n in names if not n.startswith("<"))


def kernel_package(meta: str) -> str:
    """The concrete kernel package (linux-image-6.1.0-NN-amd64) a metapackage points to."""
    stanza = parse_control(_run(["apt-cache", "show", "--no-all-versions", meta]))[0]
    for dep in stanza.get("Depends", "").split(","):
        name = dep.split("(")[0].strip()
        if name.startswith("linux-image-") and name != meta:
            return name
    raise GuestBuildError(f"{meta} does not depend on a kernel image package")


def resolve_lock(recipe: Recipe) -> Lock:
    """Pin the candidate version of every package the recipe needs, with its sha256."""
    kernel = kernel_package(recipe.kernel)
    deps = parse_recursive_depends(
        _run(
            [
                "apt-cache",
                "depends",
                "--recurse",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
                *recipe.packages,
            ]
        )
    )
    names = sorted({kernel, *deps})
    stanzas = parse_control(_run(["apt-cache", "show", "--no-all-versions", *names]))
    found = {s["Package"]: s for s in stanzas if s.get("Architecture") in ("amd64", "all")}
    missing = [n for n in names if n not in found]
    if missing:
        raise GuestBuildError(f"apt knows no amd64 candidate for: {', '.join(missing)}")
    packages = tuple(LockedPackage(n, found[n]["Version"], found[n]["SHA256"]) for n in names)
    return Lock(kernel=kernel, packages=packages)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deb_filename(pkg: LockedPackage) -> str:
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' quoted as %3a.
    return f"{pkg.name}_{pkg.version.replace(':', '%3a')}"


def fetch(packages: Iterable[LockedPackage], debs: Path) -> dict[str, Path]:
    """Make sure each pinned .deb is in `debs` with its locked sha256; download the rest."""
    debs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    wanted = list(packages)

    def lookup(pkg: LockedPackage) -> Path | None:
        for path in debs.glob(deb_filename(pkg) + "_*.deb"):
            if sha256_file(path) == pkg.sha256:
                return path
            path.unlink()  # stale or corrupt: fetch again
        return None

    todo = [p for p in wanted if lookup(p) is None]
    if todo:
        argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
        try:
            _run(argv + [p.spec for p in todo], cwd=debs)
        except GuestBuildError as exc:
            raise GuestBuildError(
                f"cannot download the pinned packages ({exc}); if a pinned version left "
                "the archive, re-pin with: dynamem guest lock"
            ) from exc
    for pkg in wanted:
        path = lookup(pkg)
        if path is None:
            raise GuestBuildError(f"{pkg.spec}: downloaded file does not match the locked sha256")
        result[pkg.name] = path
    return result
