"""Cloud images: reading one without booting it, the seed, the overlay, the command line.

The image tests build a small GPT disk with an ext4 root partition the way
`dynamem guest build debian-cloud` does (sfdisk, mke2fs -d, qemu-img), with stand-in kernel
files: inspecting it runs the real qemu-img, sfdisk and debugfs in well under a second.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dynamem.errors import UserError
from dynamem.guest import cloud
from dynamem.guest.recipe import load_cloud_recipe, load_recipe
from dynamem.qemu.config import RunFiles, VMConfig, build_argv
from dynamem.record import Condition

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cloud"
RELEASE = "6.1.0-50-amd64"
TOOLS = ("qemu-img", "sfdisk", "mke2fs", "debugfs")


def make_disk(
    tmp_path: Path,
    *,
    config: str,
    rules: dict[str, str],
    programs: tuple[str, ...],
    modules: tuple[str, ...] = ("virtio_mem", "virtio_balloon"),
) -> tuple[Path, str]:
    """A qcow2 cloud-like image and its root partition's PARTUUID."""
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh test installs them)")
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(b"kernel " * 1000)
    (root / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(b"older kernel")
    (root / "boot" / f"initrd.img-{RELEASE}").write_bytes(b"initrd " * 500)
    (root / "boot" / f"config-{RELEASE}").write_text(config)
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    (root / "usr" / "bin").mkdir(parents=True)
    for p in programs:
        (root / "usr" / "bin" / p).write_text("#!/bin/sh\n")
    (root / "usr" / "lib" / "openssh").mkdir(parents=True)
    (root / "usr" / "lib" / "openssh" / "sftp-server").write_text("")
    moddir = root / "usr" / "lib" / "modules" / RELEASE
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "".join(f"kernel/drivers/virtio/{m}.ko.xz:\n" for m in modules)
        + "kernel/drivers/virtio/virtio_pci.ko.xz:\nkernel/drivers/block/virtio_blk.ko.xz:\n"
        "kernel/drivers/net/virtio_net.ko.xz:\nkernel/drivers/char/virtio_console.ko.xz:\n"
    )
    rules_dir = root / "usr" / "lib" / "udev" / "rules.d"
    rules_dir.mkdir(parents=True)
    for name, text in rules.items():
        (rules_dir / name).write_text(text)
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    (root / "var" / "lib" / "dpkg" / "status").write_text(
        (FIXTURES / "debian-dpkg-status-excerpt.txt").read_text()
    )
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["sfdisk", "-q", str(raw)], input="label: gpt\nstart=2048, type=linux\n",
                   text=True, check=True)  # fmt: skip
    part = json.loads(subprocess.check_output(["sfdisk", "--json", str(raw)]))["partitiontable"]
    part = part["partitions"][0]
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-E", "offset=1048576", str(raw),
         f"{part['size'] // 2}k"],
        check=True,
    )  # fmt: skip
    disk = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    return disk, part["uuid"].lower()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


DEBIAN_CONFIG = (FIXTURES / "debian-6.1-config-excerpt.txt").read_text()
PROGRAMS = cloud.PROGRAMS


def test_inspect_reads_kernel_root_and_onlining_without_booting(tmp_path, cache):
    rules = {"70-memory.rules": (FIXTURES / "debian-70-memory.rules").read_text()}
    disk, partuuid = make_disk(tmp_path, config=DEBIAN_CONFIG, rules=rules, programs=PROGRAMS)
    image = cloud.load(f"cloud:{disk}")
    assert image.kernel_release == RELEASE  # the newest of the two kernels
    assert image.kernel.read_bytes() == b"kernel " * 1000
    assert image.initrd.read_bytes() == b"initrd " * 500
    assert image.root == f"PARTUUID={partuuid}"
    assert image.onlining == "none"  # Debian's 70-memory.rules only reads DMI
    assert image.manifest["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert image.manifest["packages"] == {
        "cloud-init": "22.4.2-1+deb12u4", "kmod": "30+20221128-1", "stress": "1.0.7-1",
    }  # fmt: skip
    assert image.sha256 == cloud.sha256_of(disk)
    assert image.label == f"cloud image.qcow2 {image.sha256[:12]}"
    for mechanism in ("balloon", "virtio-mem", "dimm"):
        image.check(mechanism)
    # a second load is the cache: nothing extracted again
    stamp = image.kernel.stat().st_mtime_ns
    assert cloud.load(disk).kernel.stat().st_mtime_ns == stamp


def test_inspect_names_what_an_image_lacks(tmp_path, cache):
    config = DEBIAN_CONFIG.replace("CONFIG_VIRTIO_MEM=m", "# CONFIG_VIRTIO_MEM is not set")
    disk, _ = make_disk(
        tmp_path, config=config, rules={}, programs=tuple(p for p in PROGRAMS if p != "stress"),
        modules=("virtio_mem",),
    )  # fmt: skip
    image = cloud.load(disk)
    with pytest.raises(UserError) as err:
        image.check("virtio-mem")
    text = str(err.value)
    assert "\n" not in text
    assert f"CONFIG_VIRTIO_MEM (kernel {RELEASE} has it n)" in text
    assert "stress" in text and "stress-ng" not in text
    with pytest.raises(UserError, match="the virtio_balloon module"):
        image.check("balloon")  # =m in the config, but no module in the image


def test_ubuntu_hotadd_rule_is_found_and_a_commented_one_is_not():
    ubuntu = (FIXTURES / "ubuntu-22.04-40-vm-hotadd.rules").read_text()
    assert cloud.onlining_of({"40-vm-hotadd.rules": ubuntu}) == "udev rule 40-vm-hotadd.rules"
    commented = ubuntu.replace('\nSUBSYSTEM=="memory"', '\n#SUBSYSTEM=="memory"')
    assert cloud.onlining_of({"40-vm-hotadd.rules": commented}) == "none"
    debian = (FIXTURES / "debian-70-memory.rules").read_text()
    assert cloud.onlining_of({"70-memory.rules": debian}) == "none"


def test_dpkg_status_keeps_only_installed_packages():
    status = (FIXTURES / "debian-dpkg-status-excerpt.txt").read_text()
    removed = "Package: old\nStatus: deinstall ok config-files\nVersion: 1\n"
    packages = cloud.dpkg_packages(status + "\n" + removed)
    assert set(packages) == {"cloud-init", "kmod", "stress"}


def test_not_an_image_is_one_line(tmp_path, cache):
    with pytest.raises(UserError, match="does not exist"):
        cloud.load(f"cloud:{tmp_path / 'nope.qcow2'}")
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(UserError, match="is vmdk, not qcow2 or raw"):
        cloud.load(vmdk)


def test_user_data_logs_root_in_with_this_vms_key_and_pins_the_host_key():
    user = cloud.user_data("ssh-ed25519 AAAAclient", "-----PRIVATE-----\n", "ssh-ed25519 AAAAhost")
    assert user.startswith("#cloud-config\n")
    config = json.loads(user.split("\n", 1)[1])  # JSON is YAML
    assert config["ssh_authorized_keys"] == ["ssh-ed25519 AAAAclient"]
    assert config["disable_root"] is False and config["users"] == []
    assert config["ssh_keys"]["ed25519_public"] == "ssh-ed25519 AAAAhost"
    assert config["final_message"].startswith(cloud.READY_WORD)


def test_seed_iso_holds_user_data_and_meta_data(tmp_path):
    import io

    import pycdlib

    cloud.make_seed(tmp_path / "seed.iso", "vm-123", "#cloud-config\n{}\n")
    iso = pycdlib.PyCdlib()
    iso.open(str(tmp_path / "seed.iso"))
    assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    for name, want in (("user-data", "#cloud-config\n{}\n"), ("meta-data", "vm-123")):
        for kind in ("rr_path", "joliet_path"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **{kind: f"/{name}"})
            assert want in out.getvalue().decode()
    iso.close()


def test_overlay_leaves_the_base_alone(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    before = cloud.sha256_of(base)
    overlay = tmp_path / "run" / "disk.qcow2"
    overlay.parent.mkdir()
    cloud.make_overlay(base, "qcow2", overlay)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(overlay)], check=True,
                   capture_output=True)  # fmt: skip
    info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(overlay)]))
    assert info["backing-filename"] == str(base.resolve())
    assert cloud.sha256_of(base) == before


def test_cloud_command_line_boots_the_overlay_with_its_root_and_seed(tmp_path):
    config = VMConfig(
        kernel=Path("/k"), initrd=Path("/i"), disk=Path("/images/debian.qcow2"),
        root="PARTUUID=505cb3ee-b97f-4a4c-b9cc-102c8e125b31", swap="disk",
    )  # fmt: skip
    files = RunFiles(tmp_path, 2222)
    argv = build_argv(config, files)
    text = " ".join(argv)
    assert config.cmdline.startswith("root=PARTUUID=505cb3ee-b97f-4a4c-b9cc-102c8e125b31 ro ")
    assert "memhp_default_state=online_movable" in config.cmdline
    # the root disk comes first (vda), then the seed, then swap
    drives = [a for a in argv if a.startswith("file=")]
    assert [d.split(",")[0] for d in drives] == [
        f"file={files.overlay_image}", f"file={files.seed_image}", f"file={files.swap_image}",
    ]  # fmt: skip
    assert "/images/debian.qcow2" not in text  # QEMU reaches the base only through the overlay
    assert "readonly=on" in drives[1]


def test_embedded_command_line_is_unchanged_by_cloud_fields(tmp_path):
    argv = build_argv(VMConfig(kernel=Path("/k"), initrd=Path("/i")), RunFiles(tmp_path, 2222))
    assert not any("dynamem-root" in a or "seed" in a for a in argv)
    assert "root=" not in VMConfig(kernel=Path("/k"), initrd=Path("/i")).cmdline


def test_condition_names_a_cloud_guest_and_keeps_old_records_embedded():
    base = dict(memory=1 << 30, cpus=2, cpu_model="qemu64", accel="tcg", workload="idle",
                workload_size=0, touch=0, swap="none", swap_size=0,
                memhp_default_state="online_movable", kernel_args=(), warmup=False,
                steps=("shrink 256M",))  # fmt: skip
    assert Condition(**base).guest == "minimal"
    assert "; guest " not in Condition(**base).describe()
    cloudy = Condition(**base, guest="cloud debian-cloud eec5aa09dc38")
    assert "guest cloud debian-cloud eec5aa09dc38" in cloudy.describe()
    assert cloudy != Condition(**base)


def test_debian_cloud_recipe_loads_and_is_not_an_embedded_recipe():
    recipe = load_cloud_recipe("debian-cloud")
    assert recipe is not None and recipe.suite == "bookworm"
    for needed in ("cloud-init", "openssh-server", "python3-cffi-backend", "stress", "psmisc"):
        assert needed in recipe.packages
    assert load_cloud_recipe("minimal") is None
    with pytest.raises(UserError, match="is a cloud image"):
        load_recipe("debian-cloud")


def test_prepare_script_is_shared_and_mounts_tracefs_only_when_needed():
    from dynamem.paths import guests_dir

    prepare = (guests_dir() / "minimal" / "rootfs" / "etc" / "dynamem" / "prepare").read_text()
    rc = (guests_dir() / "minimal" / "rootfs" / "etc" / "dynamem" / "rc").read_text()
    assert ". /etc/dynamem/prepare" in rc
    assert "[ -e $tr/trace_clock ] || mount -t tracefs" in prepare
    assert "usleep" not in prepare  # busybox-only; a cloud image has no usleep


# -- bad input: one line, exit 2, nothing booted ---------------------------------------------


def _main(capsys, *argv):
    from dynamem.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def no_vm(tmp_path, monkeypatch):
    base = tmp_path / "runs"
    monkeypatch.setenv("DYNAMEM_RUN_BASE", str(base))
    yield
    assert not base.exists(), "a VM was started for bad input"


def test_missing_cloud_image_is_one_line(capsys, no_vm, cache, tmp_path):
    code, err = _main(capsys, "vm", "exec", "--guest", f"cloud:{tmp_path}/no.qcow2", "--", "true")
    assert code == 2
    assert err.strip() == f"dynamem: error: cloud image {tmp_path}/no.qcow2 does not exist"


def test_an_image_without_virtio_mem_is_refused_before_booting(capsys, no_vm, cache, tmp_path):
    config = DEBIAN_CONFIG.replace("CONFIG_VIRTIO_MEM=m", "# CONFIG_VIRTIO_MEM is not set")
    disk, _ = make_disk(tmp_path, config=config, rules={}, programs=PROGRAMS)
    argv = ["resize", "--guest", f"cloud:{disk}", "--memory", "1G", "--by", "-128M"]
    code, err = _main(capsys, *argv, "--mechanism", "virtio-mem")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "lacks for virtio-mem: CONFIG_VIRTIO_MEM" in err


def test_a_cloud_run_cannot_start_from_saved_states(capsys, no_vm, cache, tmp_path):
    disk, _ = make_disk(tmp_path, config=DEBIAN_CONFIG, rules={}, programs=PROGRAMS)
    out = tmp_path / "out"
    code, err = _main(capsys, "run", "--suite", "quick", "--start", "snapshot",
                      "--guest", f"cloud:{disk}", "--out", str(out))  # fmt: skip
    assert code == 2 and "start = snapshot saves no disk state" in err
    assert not out.exists()


def test_a_resumed_run_keeps_its_guest(capsys, no_vm, tmp_path):
    from dynamem.store import RunStore

    from .records import run_record

    out = tmp_path / "run"
    RunStore.create(out, run_record(["balloon-idle-r1"], guest="debian-cloud"))
    code, err = _main(capsys, "run", "--resume", str(out), "--guest", "minimal")
    assert code == 2 and f"{out} ran on --guest debian-cloud, not minimal" in err


def test_a_changed_base_image_fails_the_run_and_is_recorded(tmp_path, cache):
    from dynamem.record import CloudImageInfo
    from dynamem.runner import check_cloud_image
    from dynamem.store import RunStore

    from .records import run_record

    base = tmp_path / "base.qcow2"
    base.write_bytes(b"before")
    info = CloudImageInfo(
        name="base.qcow2", path=str(base), sha256=cloud.sha256_of(base), format="qcow2",
        os="Debian", kernel_release=RELEASE, root="PARTUUID=x", onlining="none",
    )  # fmt: skip
    store = RunStore.create(tmp_path / "run", run_record(["a-r1"], cloud_image=info))
    check_cloud_image(store)
    assert RunStore.open(tmp_path / "run").run.metadata.cloud_image.sha256_after == info.sha256
    base.write_bytes(b"after!")
    with pytest.raises(UserError, match="changed during the run"):
        check_cloud_image(store)
    after = RunStore.open(tmp_path / "run").run.metadata.cloud_image
    assert after.sha256_after == cloud.sha256_of(base) != after.sha256


def test_mbr_partitions_are_named_by_their_own_numbers(tmp_path):
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk")
    raw = tmp_path / "mbr.raw"
    with raw.open("wb") as f:
        f.truncate(32 << 20)
    # a primary, an extended and a logical partition: the logical one is number 5
    script = "label: dos\nlabel-id: 0x1234abcd\n,8M,83\n,,E\n,4M,83\n"
    subprocess.run(["sfdisk", "-q", str(raw)], input=script, text=True, check=True)
    roots = [root for _, root in cloud._partitions(raw)]
    assert roots == ["PARTUUID=1234abcd-01", "PARTUUID=1234abcd-02", "PARTUUID=1234abcd-05"]
    bare = tmp_path / "bare.raw"
    bare.write_bytes(b"\0" * 4096)
    assert cloud._partitions(bare) == [(0, "/dev/vda")]  # no table: the whole disk


def test_kernel_versions_sort_as_versions():
    releases = ["6.1.0-9-amd64", "6.1.0-13-amd64", "6.1.0-rc7-amd64", "5.10.0-30-amd64"]
    assert sorted(releases, key=cloud.version_key)[-1] == "6.1.0-13-amd64"


def test_the_nightly_refuses_a_cloud_guest(capsys, no_vm, tmp_path):
    code, err = _main(capsys, "nightly", "--guest", f"cloud:{tmp_path}/x.qcow2",
                      "--root", str(tmp_path / "n"))  # fmt: skip
    assert code == 2 and "the asv timeline tracks the embedded guest" in err
