"""Assemble a guest (kernel + initramfs) from pinned Debian packages into the cache.

The cache key is a hash of everything that goes in (lock, recipe, rootfs files, this
builder's version), so a second build with the same inputs is a hit, and the output is
byte-identical across clean builds: fixed mtimes, sorted cpio, owner 0, reproducible
compression.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dynamem.errors import GuestBuildError
from dynamem.guest import apt, elf, modules
from dynamem.guest.recipe import Lock, Recipe
from dynamem.paths import cache_dir

BUILDER_VERSION = 1
EPOCH = 1_700_000_000  # mtime of every file in the image (reproducibility)


@dataclass(frozen=True)
class GuestImage:
    """A built guest in the cache; `manifest` records what went in and the outputs' sha256."""

    directory: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, object]

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    @classmethod
    def load(cls, directory: Path, *, verify: bool = True) -> "GuestImage":
        manifest_path = directory / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise GuestBuildError(f"guest image at {directory} is missing or corrupt") from exc
        image = cls(directory, directory / "vmlinuz", directory / "initrd.img", manifest)
        if verify:
            image.verify()
        return image

    def verify(self) -> None:
        sums = self.manifest.get("sha256", {})
        assert isinstance(sums, dict)
        for path in (self.kernel, self.initrd):
            if not path.exists() or apt.sha256_file(path) != sums.get(path.name):
                raise GuestBuildError(
                    f"guest image {path} is missing or fails its checksum; rebuild with "
                    "`dynamem guest build --force`"
                )


def compiler_version() -> str:
    """The host gcc that compiles the recipe's own programs (part of the cache key)."""
    if not shutil.which("gcc"):
        raise GuestBuildError("gcc not found: apt-get install gcc libc6-dev")
    return run_tool(["gcc", "--version"], "gcc --version").splitlines()[0]


def cache_key(recipe: Recipe, lock: Lock) -> str:
    digest = hashlib.sha256()
    digest.update(f"builder {BUILDER_VERSION}\n".encode())
    if recipe.sources:
        digest.update(compiler_version().encode())
        for source in recipe.sources:
            digest.update((recipe.directory / source).read_bytes())
    digest.update(lock.to_json().encode())
    digest.update((recipe.directory / "recipe.toml").read_bytes())
    for path in sorted(p for p in recipe.rootfs.rglob("*") if p.is_file()):
        rel = path.relative_to(recipe.rootfs)
        digest.update(f"{rel} {oct(path.stat().st_mode & 0o777)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def image_dir(recipe: Recipe, lock: Lock) -> Path:
    return cache_dir() / "guests" / f"{recipe.name}-{cache_key(recipe, lock)[:16]}"


def find_image(recipe: Recipe, *, verify: bool = True) -> GuestImage:
    """The built image for the recipe's current inputs, or a UserError saying how to build."""
    directory = image_dir(recipe, recipe.load_lock())
    if not (directory / "manifest.json").exists():
        raise GuestBuildError(
            f"guest {recipe.name!r} is not built; run: dynamem guest build {recipe.name}"
        )
    return GuestImage.load(directory, verify=verify)


def build(recipe: Recipe, *, force: bool = False) -> tuple[GuestImage, bool]:
    """Build (or find) the guest; returns the image and whether it was a cache hit."""
    lock = recipe.load_lock()
    target = image_dir(recipe, lock)
    if not force and (target / "manifest.json").exists():
        try:
            return GuestImage.load(target), True
        except GuestBuildError:
            pass  # corrupt: rebuild below
    debs = apt.fetch(lock.packages, cache_dir() / "debs")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        manifest = _assemble(recipe, lock, debs, work)
        out = work / "out"
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(out, target)
    return GuestImage.load(target), False


def _assemble(recipe: Recipe, lock: Lock, debs: dict[str, Path], work: Path) -> dict[str, object]:
    pkgroot, rootfs, out = work / "pkgroot", work / "rootfs", work / "out"
    for d in (pkgroot, rootfs, out):
        d.mkdir()
    for name in sorted(debs):
        run_tool(["dpkg-deb", "-x", str(debs[name]), str(pkgroot)], f"unpack {name}")

    release = _kernel_release(pkgroot, lock.kernel)
    shutil.copyfile(pkgroot / "boot" / f"vmlinuz-{release}", out / "vmlinuz")

    # Busybox and its applets.
    _install(pkgroot / "bin" / "busybox", rootfs / "bin" / "busybox")
    applets = run_tool([str(pkgroot / "bin" / "busybox"), "--list-full"], "list busybox applets")
    for applet in sorted(applets.split()):
        link = rootfs / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(rootfs / "bin" / "busybox", link.parent))
    (rootfs / "init").symlink_to("bin/busybox")

    # Binaries and exactly the shared objects they need.
    binaries = [pkgroot / b.lstrip("/") for b in recipe.binaries]
    for b in binaries:
        if not b.exists():
            raise GuestBuildError(f"recipe binary {b.relative_to(pkgroot)} is in no package")
        _install(b, rootfs / b.relative_to(pkgroot))
    libs = elf.library_closure(pkgroot, binaries)
    for soname, path in sorted(libs.items()):
        _install(path, rootfs / "lib" / "x86_64-linux-gnu" / soname)
    (rootfs / "lib64").mkdir()
    (rootfs / "lib64" / "ld-linux-x86-64.so.2").symlink_to(
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )

    # dynamem's own programs, static so they need nothing from the image.
    for source in recipe.sources:
        compile_static(recipe.directory / source, rootfs / "usr" / "bin" / Path(source).stem)

    # Kernel modules, in load order.
    run_tool(["depmod", "-b", str(pkgroot), release], "depmod")
    moddir = pkgroot / "lib" / "modules" / release
    deps = modules.parse_modules_dep((moddir / "modules.dep").read_text())
    builtin = set((moddir / "modules.builtin").read_text().split())
    order = modules.load_order(list(recipe.modules), deps, builtin)
    for rel in order:
        _install(moddir / rel, rootfs / "lib" / "modules" / release / rel)
    (rootfs / "etc" / "dynamem").mkdir(parents=True)
    (rootfs / "etc" / "dynamem" / "modules").write_text(
        "".join(f"/lib/modules/{release}/{rel}\n" for rel in order)
    )

    # The recipe's own files, then the fixed skeleton.
    shutil.copytree(recipe.rootfs, rootfs, symlinks=True, dirs_exist_ok=True)
    for skeleton in ("proc", "sys", "dev", "tmp", "run", "root", "var/log"):
        (rootfs / skeleton).mkdir(parents=True, exist_ok=True)
    (rootfs / "root").chmod(0o700)

    _make_initramfs(rootfs, out / "initrd.img")
    return {
        "guest": recipe.name,
        "builder_version": BUILDER_VERSION,
        "cache_key": cache_key(recipe, lock),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel_package": lock.kernel,
        "kernel_release": release,
        "packages": {p.name: p.version for p in lock.packages},
        "modules": [modules.module_name(m) for m in order],
        "libraries": sorted(libs),
        "compiled": {Path(s).stem: compiler_version() for s in recipe.sources},
        "sha256": {f: apt.sha256_file(out / f) for f in ("vmlinuz", "initrd.img")},
    }


def compile_static(src: Path, binary: Path) -> None:
    """One of dynamem's own C programs, static so it needs nothing from the guest's image."""
    binary.parent.mkdir(parents=True, exist_ok=True)
    run_tool(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(src)],
        f"compile {src.name}",
    )
    run_tool(["strip", str(binary)], f"strip {binary.name}")


def _kernel_release(pkgroot: Path, package: str) -> str:
    kernels = sorted((pkgroot / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"{package} should hold one vmlinuz, found {len(kernels)}")
    return kernels[0].name.removeprefix("vmlinuz-")


def _install(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o755 if os.access(src, os.X_OK) else 0o644)


def _make_initramfs(rootfs: Path, target: Path) -> None:
    for path in [rootfs, *rootfs.rglob("*")]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    names = sorted(
        "." if p == rootfs else "./" + str(p.relative_to(rootfs))
        for p in [rootfs, *rootfs.rglob("*")]
    )
    listing = "".join(n + "\0" for n in names).encode()
    with target.open("wb") as out:
        cpio = subprocess.Popen(
            ["cpio", "--null", "-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"],
            cwd=rootfs,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        zstd = subprocess.Popen(["zstd", "-q", "-10", "-T1", "-c"], stdin=cpio.stdout, stdout=out)
        assert cpio.stdin and cpio.stdout
        cpio.stdout.close()
        cpio.stdin.write(listing)
        cpio.stdin.close()
        if cpio.wait() != 0 or zstd.wait() != 0:
            raise GuestBuildError("cpio | zstd failed while packing the initramfs")


def run_tool(argv: list[str], what: str, stdin: str | None = None) -> str:
    """A host tool's stdout; its failure (or absence) is one GuestBuildError line."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{what}: {argv[0]} not found") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout
