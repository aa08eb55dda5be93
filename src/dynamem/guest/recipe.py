"""A guest recipe (guests/NAME/recipe.toml) and its lock (packages.lock.json)."""

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamem.errors import GuestBuildError, UserError
from dynamem.paths import guests_dir

LOCK_FORMAT = 1


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class Lock:
    kernel: str  # the concrete kernel package, e.g. linux-image-6.1.0-56-amd64
    packages: tuple[LockedPackage, ...]

    def to_json(self) -> str:
        data = {
            "format": LOCK_FORMAT,
            "kernel": self.kernel,
            "packages": [vars(p) for p in sorted(self.packages, key=lambda p: p.name)],
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "Lock":
        try:
            data = json.loads(text)
            if data.get("format") != LOCK_FORMAT:
                raise GuestBuildError(
                    f"{source}: lock format {data.get('format')!r}, expected {LOCK_FORMAT}"
                )
            packages = tuple(
                LockedPackage(p["name"], p["version"], p["sha256"]) for p in data["packages"]
            )
            return cls(kernel=data["kernel"], packages=packages)
        except (ValueError, KeyError, TypeError) as exc:
            raise GuestBuildError(f"{source}: malformed lock file ({exc})") from exc

    def package(self, name: str) -> LockedPackage:
        for p in self.packages:
            if p.name == name:
                return p
        raise GuestBuildError(f"package {name} is not in the lock")


@dataclass(frozen=True)
class Recipe:
    name: str
    directory: Path
    kernel: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    modules: tuple[str, ...]
    sources: tuple[str, ...] = ()

    @property
    def lock_path(self) -> Path:
        return self.directory / "packages.lock.json"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    def load_lock(self) -> Lock:
        if not self.lock_path.exists():
            raise GuestBuildError(
                f"guest {self.name!r} has no lock file; run: dynamem guest lock {self.name}"
            )
        return Lock.from_json(self.lock_path.read_text(), str(self.lock_path))


@dataclass(frozen=True)
class CloudRecipe:
    """A cloud image built with debootstrap (`kind = "cloud"`): for hosts that cannot
    download one, the same kind of image from the distribution's packages."""

    name: str
    directory: Path
    suite: str
    variant: str
    packages: tuple[str, ...]
    size: str

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"


def _read(name: str) -> tuple[Path, dict[str, Any]]:
    directory = guests_dir() / name
    path = directory / "recipe.toml"
    if not path.exists():
        known = sorted(p.parent.name for p in guests_dir().glob("*/recipe.toml"))
        raise UserError(f"unknown guest {name!r} (known: {', '.join(known) or 'none'})")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid recipe ({exc})") from exc


def load_cloud_recipe(name: str) -> CloudRecipe | None:
    """The cloud-image recipe NAME, or None if NAME is an embedded guest's recipe."""
    path, data = _read(name)
    if data.get("kind") != "cloud":
        return None
    try:
        return CloudRecipe(
            name=name,
            directory=path.parent,
            suite=str(data["suite"]),
            variant=str(data.get("variant", "minbase")),
            packages=tuple(str(p) for p in data["packages"]),
            size=str(data["size"]),
        )
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: invalid recipe ({exc})") from exc


def load_recipe(name: str) -> Recipe:
    path, data = _read(name)
    directory = path.parent
    if data.get("kind") == "cloud":
        raise UserError(f"guest {name!r} is a cloud image; use it as --guest {name}")
    try:
        return Recipe(
            name=name,
            directory=directory,
            kernel=str(data["kernel"]),
            packages=tuple(data["packages"]),
            binaries=tuple(data["binaries"]),
            modules=tuple(data["modules"]),
            sources=tuple(data.get("sources", ())),
        )
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: invalid recipe ({exc})") from exc
