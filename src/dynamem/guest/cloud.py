"""Cloud images: a qcow2 (or raw) disk with a full distribution and cloud-init.

An image is read without booting it (qemu-img, sfdisk and debugfs on a sparse raw copy):
its kernel and initrd are extracted so dynamem boots it directly and owns the kernel command
line (memhp_default_state, swap, console) instead of editing the image's boot loader; its
kernel config and module list tell early whether a mechanism can work in it; its udev rules
tell whether something besides the kernel onlines hotplugged memory. Each VM then gets a
qcow2 overlay on top of the base and a NoCloud seed, so the base is never written.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamem.errors import GuestBuildError, UserError
from dynamem.guest.build import run_tool
from dynamem.paths import cache_dir

PREFIX = "cloud:"
INSPECT_VERSION = 1

# What dynamem runs in every guest (workloads, their clean-up, cloud-init's status) and the
# SFTP server it copies its sampler and impact programs with.
PROGRAMS = ("cloud-init", "stress", "stress-ng", "killall", "pidof", "setsid", "timeout")
SFTP = ("usr/lib/openssh/sftp-server", "usr/libexec/openssh/sftp-server", "usr/lib/sftp-server")
# Kernel options every guest needs (its disk, network, sampler port) and each mechanism's.
BASE_OPTIONS = ("CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET",
                "CONFIG_VIRTIO_CONSOLE", "CONFIG_MEMORY_HOTPLUG")  # fmt: skip
MECHANISM_OPTIONS = {
    "balloon": ("CONFIG_VIRTIO_BALLOON",),
    "virtio-mem": ("CONFIG_VIRTIO_MEM", "CONFIG_MEMORY_HOTREMOVE"),
    "dimm": ("CONFIG_ACPI_HOTPLUG_MEMORY", "CONFIG_MEMORY_HOTREMOVE"),
}
# The module each option builds, when it is =m: it must be in the image's modules.dep.
MODULES = {
    "CONFIG_VIRTIO_PCI": "virtio_pci", "CONFIG_VIRTIO_BLK": "virtio_blk",
    "CONFIG_VIRTIO_NET": "virtio_net", "CONFIG_VIRTIO_CONSOLE": "virtio_console",
    "CONFIG_VIRTIO_BALLOON": "virtio_balloon", "CONFIG_VIRTIO_MEM": "virtio_mem",
    "CONFIG_ZRAM": "zram",
}  # fmt: skip
# One rule line that assigns (=, not == or !=) "online..." to a memory block's state.
ONLINE_RULE = re.compile(r'^[^#]*SUBSYSTEM=="memory".*ATTR\{state\}="online', re.MULTILINE)


@dataclass(frozen=True)
class CloudImage:
    """A cloud image as dynamem boots it. `manifest` has the keys a built embedded guest's
    manifest has (cache_key, packages, kernel_release) plus what only an image has."""

    path: Path  # the base image, never written
    kernel: Path  # extracted into the cache
    initrd: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    @property
    def root(self) -> str:
        return str(self.manifest["root"])

    @property
    def onlining(self) -> str:
        return str(self.manifest["onlining"])

    @property
    def label(self) -> str:
        """How conditions name the image: never pooled with another image or the embedded
        guest."""
        return f"cloud {self.manifest.get('name') or self.path.name} {self.sha256[:12]}"

    def missing_for(self, mechanism: str | None, swap: str = "none") -> list[str]:
        """Kernel options or modules the image lacks for `mechanism` (None: any guest) and
        the swap kind."""
        config: dict[str, str] = self.manifest["kernel_config"]
        modules = set(self.manifest["modules"])
        options = BASE_OPTIONS + (MECHANISM_OPTIONS.get(mechanism, ()) if mechanism else ())
        options += ("CONFIG_ZRAM",) if swap == "zram" else ()
        missing = []
        for option in options:
            value = config.get(option)
            if value not in ("y", "m"):
                missing.append(f"{option} (kernel {self.kernel_release} has it {value or 'unset'})")
            elif value == "m" and MODULES.get(option) and MODULES[option] not in modules:
                missing.append(f"the {MODULES[option]} module")
        return missing

    def check(self, mechanism: str | None = None, swap: str = "none") -> None:
        """One line naming what the image lacks, before anything boots."""
        lacks = [*self.missing_for(mechanism, swap), *self.manifest["missing_programs"]]
        if lacks:
            what = f" for {mechanism}" if mechanism else ""
            raise UserError(f"cloud image {self.path} lacks{what}: {', '.join(lacks)}")


def is_cloud(guest: str) -> bool:
    return guest.startswith(PREFIX)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def image_sha256(path: Path, *, verify: bool = False) -> str:
    """The image's sha256, remembered by path, size, mtime and inode so each cell does not
    read gigabytes again; `verify` reads the file (a run's checks before and after)."""
    index_path = cache_dir() / "cloud" / "sha256.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    key = _stat_key(path)
    if not verify and key in index:
        return str(index[key])
    digest = sha256_of(path)
    index[key] = digest
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, index_path)
    return digest


def load(guest_or_path: str | Path, name: str | None = None) -> CloudImage:
    """The image behind `cloud:PATH` (or a path), inspected once per content and cached;
    `name` names it in conditions (default: the file's name)."""
    text = str(guest_or_path)
    path = Path(text.removeprefix(PREFIX)).expanduser().absolute()  # resumes from anywhere
    if not path.is_file():
        raise UserError(f"cloud image {path} does not exist")
    if not os.access(path, os.R_OK):
        raise UserError(f"cloud image {path} is not readable")
    digest = image_sha256(path)
    directory = cache_dir() / "cloud" / digest[:16]
    try:
        manifest = json.loads((directory / "inspect.json").read_text())
        if manifest.get("inspect_version") != INSPECT_VERSION or manifest["sha256"] != digest:
            raise ValueError("stale")
        manifest["name"] = name or path.name
        image = CloudImage(path, directory / "vmlinuz", directory / "initrd.img", manifest)
        if image.kernel.exists() and image.initrd.exists():
            return image
    except (OSError, ValueError, KeyError):
        pass
    image = _inspect(path, digest, directory)
    image.manifest["name"] = name or path.name
    return image


_PKG = {"debugfs": "e2fsprogs", "sfdisk": "fdisk", "qemu-img": "qemu-utils"}


class _Fs:
    """One ext2/3/4 file system inside the raw copy, read with debugfs (no mount, no root)."""

    def __init__(self, raw: Path, offset: int) -> None:
        self.device = f"{raw}?offset={offset}"

    def ok(self) -> bool:
        proc = subprocess.run(
            ["debugfs", "-R", "stats", self.device], capture_output=True, text=True, check=False
        )
        return proc.returncode == 0 and "Filesystem magic number" in proc.stdout

    def names(self, directory: str) -> list[str]:
        """Entries of a directory (`ls -p`: /inode/mode/uid/gid/name/size/)."""
        out = subprocess.run(
            ["debugfs", "-R", f"ls -p {directory}", self.device],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        return [f.split("/")[5] for f in out.splitlines() if f.count("/") >= 6]

    def exists(self, path: str) -> bool:
        proc = subprocess.run(
            ["debugfs", "-R", f"stat {path}", self.device], capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        return "Inode:" in proc.stdout

    def read(self, path: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", f"cat {path}", self.device], capture_output=True, text=True,
            errors="replace", check=False,
        ).stdout  # fmt: skip

    def dump(self, path: str, target: Path) -> None:
        run_tool(["debugfs", "-R", f"dump {path} {target}", self.device], f"extract {path}")
        if not target.exists() or target.stat().st_size == 0:
            raise GuestBuildError(f"could not extract {path} from the image")

    def rdump(self, path: str, target: Path) -> None:
        subprocess.run(
            ["debugfs", "-R", f"rdump {path} {target}", self.device], capture_output=True,
            check=False,
        )  # fmt: skip


def _partitions(raw: Path) -> list[tuple[int, str]]:
    """(byte offset, root= argument) of each partition; the whole disk if it has none."""
    proc = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        if shutil.which("sfdisk") is None:
            raise GuestBuildError("sfdisk not found (apt-get install fdisk)")
        return [(0, "/dev/vda")]
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    out = []
    for part in table.get("partitions", []):
        number = int(re.search(r"(\d+)$", part["node"]).group(1))  # type: ignore[union-attr]
        if "uuid" in part:
            root = f"PARTUUID={part['uuid'].lower()}"
        elif "id" in table:  # MBR: the disk id and the partition number
            root = f"PARTUUID={str(table['id']).removeprefix('0x')}-{number:02d}"
        else:
            root = f"/dev/vda{number}"
        out.append((int(part["start"]) * sector, root))
    return out


def version_key(release: str) -> list[tuple[int, int, str]]:
    """Numbers compare as numbers, words as words (6.1.0-13 after 6.1.0-9 and 6.1.0-rc7)."""
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[.-]", release)]


def _kernel_config(text: str) -> dict[str, str]:
    config = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            config[key] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:].split()[0]] = "n"
    return config


def dpkg_packages(status: str) -> dict[str, str]:
    """Installed packages and versions from /var/lib/dpkg/status."""
    packages = {}
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages[fields["Package"]] = fields.get("Version", "")
    return packages


def onlining_of(rules: dict[str, str]) -> str:
    """How the image onlines hotplugged memory by itself: the udev rules that can, or none
    (then only the kernel's memhp_default_state, which dynamem always passes, decides).
    A rule's own conditions are not evaluated: Ubuntu's 40-vm-hotadd.rules, for one, only
    acts on Hyper-V and Xen."""
    found = sorted(name for name, text in rules.items() if ONLINE_RULE.search(text))
    return "udev rule " + ", ".join(found) if found else "none"


def _inspect(path: Path, digest: str, directory: Path) -> CloudImage:
    for tool, package in _PKG.items():
        if shutil.which(tool) is None:
            raise GuestBuildError(f"reading cloud images needs {tool}: apt-get install {package}")
    info = json.loads(run_tool(["qemu-img", "info", "--output=json", str(path)], f"read {path}"))
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise UserError(f"cloud image {path} is {fmt}, not qcow2 or raw")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".inspect-") as tmp:
        work = Path(tmp)
        raw = work / "disk.raw"
        run_tool(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], f"read {path}")
        out = work / "out"
        out.mkdir()
        root_fs = boot_fs = None
        root_arg = ""
        for offset, arg in _partitions(raw):
            fs = _Fs(raw, offset)
            if not fs.ok():
                continue
            names = fs.names("/")
            if root_fs is None and "etc" in names and "usr" in names:
                root_fs, root_arg = fs, arg
            if boot_fs is None and any(n.startswith("vmlinuz-") for n in fs.names("/boot")):
                boot_fs, boot_dir = fs, "/boot"
            elif boot_fs is None and any(n.startswith("vmlinuz-") for n in names):
                boot_fs, boot_dir = fs, ""  # a separate /boot partition
        if root_fs is None:
            raise UserError(f"cloud image {path}: no ext2/3/4 root file system found in it")
        if boot_fs is None:
            raise UserError(f"cloud image {path}: no kernel (vmlinuz-*) found in it")
        releases = sorted(
            (n.removeprefix("vmlinuz-") for n in boot_fs.names(boot_dir or "/")
             if n.startswith("vmlinuz-")),
            key=version_key,
        )  # fmt: skip
        release = releases[-1]
        boot_fs.dump(f"{boot_dir}/vmlinuz-{release}", out / "vmlinuz")
        if not boot_fs.exists(f"{boot_dir}/initrd.img-{release}"):
            raise UserError(f"cloud image {path}: kernel {release} has no initrd.img-{release}")
        boot_fs.dump(f"{boot_dir}/initrd.img-{release}", out / "initrd.img")
        config = _kernel_config(boot_fs.read(f"{boot_dir}/config-{release}"))
        if not config:
            raise UserError(f"cloud image {path}: no config-{release} beside its kernel")
        moddir = f"/usr/lib/modules/{release}"
        if not root_fs.exists(moddir):
            moddir = f"/lib/modules/{release}"
        modules = {
            Path(line.split(":", 1)[0]).name.split(".ko")[0].replace("-", "_")
            for line in root_fs.read(f"{moddir}/modules.dep").splitlines()
            if ":" in line
        }
        rules: dict[str, str] = {}
        for rules_dir in ("/usr/lib/udev/rules.d", "/lib/udev/rules.d", "/etc/udev/rules.d"):
            target = work / "rules" / rules_dir.strip("/").replace("/", "_")
            target.mkdir(parents=True)
            root_fs.rdump(rules_dir, target)
            for f in target.rglob("*.rules"):
                rules.setdefault(f.name, f.read_text(errors="replace"))
        present = set()
        for bindir in ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"):
            present.update(root_fs.names(bindir))
        missing = [p for p in PROGRAMS if p not in present]
        if not any(root_fs.exists("/" + p) for p in SFTP):
            missing.append("sftp-server (openssh-sftp-server)")
        os_release = dict(
            line.split("=", 1)
            for line in (
                root_fs.read("/etc/os-release") or root_fs.read("/usr/lib/os-release")
            ).splitlines()
            if "=" in line
        )
        manifest: dict[str, Any] = {
            "inspect_version": INSPECT_VERSION,
            "guest": f"{PREFIX}{path}",
            "name": path.name,
            "sha256": digest,
            "cache_key": digest,
            "format": fmt,
            "virtual_size": int(info.get("virtual-size", 0)),
            "os": os_release.get("PRETTY_NAME", "unknown").strip('"'),
            "kernel_release": release,
            "root": root_arg,
            "onlining": onlining_of(rules),
            "kernel_config": {k: v for k, v in config.items()
                              if k in BASE_OPTIONS or k in MODULES
                              or any(k in o for o in MECHANISM_OPTIONS.values())},
            "modules": sorted(modules),
            "missing_programs": missing,
            "packages": dpkg_packages(root_fs.read("/var/lib/dpkg/status")),
        }  # fmt: skip
        (out / "inspect.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if directory.exists():  # stale (older inspection) or another process's: replace
            stale = directory.with_name(f".stale-{directory.name}-{os.getpid()}")
            with contextlib.suppress(OSError):
                os.rename(directory, stale)
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(out, directory)
        except OSError:  # another process inspected the same image at the same time
            if not (directory / "inspect.json").exists():
                raise
    return CloudImage(path, directory / "vmlinuz", directory / "initrd.img", manifest)


# -- what each VM gets on top of the image ---------------------------------------------------


def make_overlay(base: Path, fmt: str, target: Path) -> None:
    """A qcow2 whose backing file is the base: the VM's writes land here, never in the base
    (QEMU opens a backing file read-only)."""
    run_tool(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt,
         "-b", str(base.resolve()), str(target)],
        "create the overlay",
    )  # fmt: skip


READY_WORD = "dynamem-cloud-ready:"


def user_data(client_public: str, host_private: str, host_public: str) -> str:
    """The #cloud-config every cloud guest gets: root logs in with this VM's key, the host
    key is the one the host pins, and the final message tells the host cloud-init is done.
    JSON is YAML, so no YAML writer is needed."""
    config = {
        "disable_root": False,
        "users": [],  # no default user: root alone gets the key
        "ssh_authorized_keys": [client_public],
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],  # the host key below; generating others costs seconds in TCG
        "ssh_keys": {"ed25519_private": host_private, "ed25519_public": host_public},
        "final_message": f"{READY_WORD} $UPTIME",
    }
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def make_seed(target: Path, instance_id: str, user: str) -> None:
    """The NoCloud seed: an ISO 9660 volume labelled `cidata` holding user-data and
    meta-data (with Joliet and Rock Ridge names, which cloud-init reads)."""
    import pycdlib

    meta = json.dumps({"instance-id": instance_id, "local-hostname": "dynamem"}) + "\n"
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for number, (name, text) in enumerate((("user-data", user), ("meta-data", meta))):
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data), len(data), f"/FILE{number};1", rr_name=name, joliet_path=f"/{name}"
        )
    iso.write(str(target))
    iso.close()


def agent_files() -> dict[str, Path]:
    """What dynamem copies into a cloud guest once cloud-init is done: its static sampler
    and impact programs (the minimal guest's sources, compiled once per source and
    compiler) and the prepare script the minimal guest runs at boot."""
    from dynamem.guest.build import compile_static, compiler_version
    from dynamem.guest.recipe import load_recipe

    recipe = load_recipe("minimal")
    sources = [recipe.directory / s for s in recipe.sources]
    digest = hashlib.sha256(compiler_version().encode())
    for src in sources:
        digest.update(src.read_bytes())
    directory = cache_dir() / "agent" / digest.hexdigest()[:16]
    files = {src.stem: directory / src.stem for src in sources}
    if not all(p.exists() for p in files.values()):
        directory.mkdir(parents=True, exist_ok=True)
        for src in sources:
            tmp = directory / f".{src.stem}.{os.getpid()}"
            compile_static(src, tmp)
            os.replace(tmp, files[src.stem])
    files["prepare"] = recipe.rootfs / "etc" / "dynamem" / "prepare"
    return files
