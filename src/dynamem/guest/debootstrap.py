"""Build a cloud image from Debian packages: debootstrap, then a GPT disk with one ext4
partition filled by `mke2fs -d` (no loop device, no mount), converted to qcow2.

The cache key covers the recipe and its files, not the archive: debootstrap installs what
the archive holds that day, so the image's manifest lists the installed versions, and runs
record the image's sha256 and packages.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from dynamem.errors import GuestBuildError
from dynamem.guest.build import run_tool
from dynamem.guest.cloud import dpkg_packages, sha256_of
from dynamem.guest.recipe import CloudRecipe
from dynamem.paths import cache_dir
from dynamem.units import MiB, parse_size

BUILDER_VERSION = 1
MIRROR = "http://deb.debian.org/debian"
PARTITION_START = MiB  # the first partition starts at 1 MiB, as partitioning tools do


def cache_key(recipe: CloudRecipe) -> str:
    digest = hashlib.sha256(f"cloud builder {BUILDER_VERSION}\n".encode())
    digest.update((recipe.directory / "recipe.toml").read_bytes())
    for path in sorted(p for p in recipe.rootfs.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(recipe.rootfs)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def image_path(recipe: CloudRecipe) -> Path:
    return cache_dir() / "guests" / f"{recipe.name}-{cache_key(recipe)[:16]}" / "disk.qcow2"


def find_disk(recipe: CloudRecipe) -> Path:
    disk = image_path(recipe)
    if not disk.exists():
        raise GuestBuildError(
            f"guest {recipe.name!r} is not built; run: dynamem guest build {recipe.name}"
        )
    return disk


def build(recipe: CloudRecipe, *, force: bool = False) -> tuple[Path, bool]:
    """Build (or find) the image; returns its qcow2 and whether it was a cache hit."""
    target = image_path(recipe)
    if target.exists() and (target.parent / "manifest.json").exists() and not force:
        return target, True
    if os.geteuid() != 0:
        raise GuestBuildError(f"building {recipe.name} needs root (debootstrap); run it as root")
    for tool, package in (("debootstrap", "debootstrap"), ("sfdisk", "fdisk"),
                          ("mke2fs", "e2fsprogs"), ("qemu-img", "qemu-utils")):  # fmt: skip
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found: apt-get install {package}")
    size = parse_size(recipe.size)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        root = work / "root"
        debs = cache_dir() / "debootstrap"
        debs.mkdir(parents=True, exist_ok=True)
        run_tool(
            ["debootstrap", f"--variant={recipe.variant}", f"--cache-dir={debs}",
             "--include=" + ",".join(recipe.packages), recipe.suite, str(root),
             os.environ.get("DYNAMEM_DEBIAN_MIRROR", MIRROR)],
            "debootstrap",
        )  # fmt: skip
        shutil.copytree(recipe.rootfs, root, symlinks=True, dirs_exist_ok=True)
        # What every boot must make anew: the machine id, the SSH host keys (cloud-init
        # writes the one the host pins), and nothing left from the build.
        (root / "etc" / "machine-id").write_text("")
        for key in (root / "etc" / "ssh").glob("ssh_host_*"):
            key.unlink()
        for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            deb.unlink()
        packages = dpkg_packages((root / "var" / "lib" / "dpkg" / "status").read_text())
        releases = sorted(
            p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*")
        )
        if len(releases) != 1:
            raise GuestBuildError(f"expected one kernel in the image, found {releases}")

        raw = work / "disk.raw"
        with raw.open("wb") as f:
            f.truncate(size)
        run_tool(["sfdisk", "-q", str(raw)], "partition the disk",
               stdin="label: gpt\nstart=2048, type=linux, name=root\n")  # fmt: skip
        table = json.loads(run_tool(["sfdisk", "--json", str(raw)], "read the partition table"))
        part = table["partitiontable"]["partitions"][0]
        start, sectors = int(part["start"]) * 512, int(part["size"])
        if start != PARTITION_START:
            raise GuestBuildError(f"the root partition starts at byte {start}, not 1 MiB")
        run_tool(
            ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", str(root),
             "-E", f"offset={start}", str(raw), f"{sectors // 2}k"],
            "make the root file system",
        )  # fmt: skip
        out = work / "out"
        out.mkdir()
        run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
               "convert to qcow2")  # fmt: skip
        manifest = {
            "guest": recipe.name,
            "builder_version": BUILDER_VERSION,
            "cache_key": cache_key(recipe),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "suite": recipe.suite,
            "kernel_release": releases[0],
            "packages": packages,
            "sha256": {"disk.qcow2": sha256_of(out / "disk.qcow2")},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if target.parent.exists():
            shutil.rmtree(target.parent)
        os.rename(out, target.parent)
    # Earlier builds of this recipe (other inputs) are about 800 MiB each: keep only this one.
    for old in target.parent.parent.glob(f"{recipe.name}-*"):
        if old != target.parent and (old / "manifest.json").exists():
            shutil.rmtree(old, ignore_errors=True)
    return target, False
