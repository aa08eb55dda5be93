"""Bad input: one line naming the problem, exit 2, and nothing started."""

import pytest

from dynamem.cli import main


@pytest.fixture(autouse=True)
def run_base(tmp_path, monkeypatch):
    """Where a VM's run directory would go: it must not even be created."""
    base = tmp_path / "runs"
    monkeypatch.setenv("DYNAMEM_RUN_BASE", str(base))
    yield base
    assert not base.exists(), "a VM was started for bad input"


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["vm", "exec", "--memory", "1X", "--", "true"], "malformed size '1X'"),
        (["vm", "exec", "--memory=-5G", "--", "true"], "malformed size '-5G'"),
        (["vm", "exec", "--memory", "", "--", "true"], "malformed size ''"),
        (["vm", "exec", "--accel", "hvf", "--", "true"], "unknown accelerator 'hvf'"),
        (
            ["vm", "exec", "--qemu", "/nonexistent/qemu", "--", "true"],
            "/nonexistent/qemu not found",
        ),
        (["vm", "exec", "--guest", "nosuchguest", "--", "true"], "unknown guest 'nosuchguest'"),
        (["vm", "exec"], "no command given"),
        (["frobnicate"], "invalid choice"),
        (
            ["resize", "--mechanism", "virtio-mem", "--variant", "bbm", "--by", "-64M"],
            "not a multiple of the virtio-mem/bbm granularity 128M",
        ),
        (["resize", "--mechanism", "dimm", "--by", "-100M"], "not a multiple of the dimm"),
        (["resize", "--mechanism", "balloon", "--by", "+256M"], "above its boot RAM 2G"),
        (["resize", "--mechanism", "dimm", "--by", "0"], "must be greater than zero"),
        (["resize", "--mechanism", "dimm", "--by", "-1X"], "malformed resize '1X'"),
        (["resize", "--mechanism", "dimm", "--by", "+512M", "--maxmem", "2G"], "maxmem is 2G"),
        (["resize", "--mechanism", "dimm", "--by", "+64G"], "at most 256"),
        (["resize", "--mechanism", "baloon", "--by", "-1G"], "unknown mechanism 'baloon'"),
        (["resize", "--mechanism", "balloon", "--by", "-3G"], "cannot shrink a 2G guest"),
        (["vm", "exec", "--cpus", "0", "--", "true"], "expected at least 1, got '0'"),
        (["vm", "exec", "--memory", "0", "--", "true"], "size '0' must be greater than zero"),
        (["vm", "exec", "--ready-timeout", "nan", "--", "true"], "positive number of seconds"),
        (["vm", "exec", "--ready-timeout", "-1", "--", "true"], "positive number of seconds"),
        (["vm", "exec", "--timeout", "0", "--", "true"], "positive number of seconds"),
        (["vm", "exec", "--qemu", "/etc/passwd", "--", "true"], "cannot run /etc/passwd"),
        (["resize", "--mechanism", "dimm", "--by", "+128M", "--dimm-size", "0"], "greater than"),
        (["resize", "--mechanism", "dimm", "--by", "+128M", "--dimm-size", "64M"], "block size"),
        (["resize", "--mechanism", "dimm", "--by="], "malformed resize ''"),
        (["resize", "--mechanism", "balloon", "--by", "-1000"], "granularity 4K"),
        (["resize", "--mechanism", "virtio-mem", "--by", "-3M"], "virtio-mem/sbm granularity 2M"),
        (
            ["resize", "--mechanism", "virtio-mem", "--by", "+512M", "--maxmem", "2G"],
            "the steps need 2560M but maxmem is 2G",
        ),
        (["resize", "--mechanism", "virtio-mem", "--variant", "xbm", "--by", "-2M"], "xbm"),
        (
            ["resize", "--mechanism", "balloon", "--by", "-256M", "--touch", "150%"],
            "between 0 and 100",
        ),
        (["resize", "--mechanism", "balloon", "--by", "-256M", "--stress", "1Q"], "malformed"),
        (["resize", "--mechanism", "balloon", "--by", "-256M", "--swap", "nfs"], "invalid choice"),
        (["run"], "give --suite NAME|FILE or --resume RUN_DIR"),
        (["run", "--suite", "nosuch"], "no suite 'nosuch'"),
        (["run", "--resume", "/nonexistent"], "not a dynamem run"),
        (["run", "--suite", "quick", "--repeats", "0"], "expected at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dynamem: error: ")
    assert needle in err


def test_missing_guest_image_says_how_to_build_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMEM_CACHE", str(tmp_path))
    code, err = run(capsys, "vm", "exec", "--", "true")
    assert code == 2
    assert "not built; run: dynamem guest build minimal" in err


def fake_qemu(tmp_path, output):
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f"#!/bin/sh\necho '{output}'\n")
    script.chmod(0o755)
    return str(script)


def test_too_old_qemu_is_refused(capsys, tmp_path):
    qemu = fake_qemu(tmp_path, "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6)")
    code, err = run(capsys, "vm", "exec", "--qemu", qemu, "--", "true")
    assert code == 2 and err.count("\n") == 1
    assert "is QEMU 6.2.0; dynamem needs 7.2.0 or newer" in err


def test_a_qemu_without_a_version_is_refused(capsys, tmp_path):
    code, err = run(capsys, "vm", "exec", "--qemu", fake_qemu(tmp_path, "hello"), "--", "true")
    assert code == 2 and "cannot read the QEMU version" in err


@pytest.fixture
def fake_image(tmp_path, monkeypatch):
    """A guest image in a private cache, with a manifest whose checksums match."""
    import json

    from dynamem.guest.apt import sha256_file
    from dynamem.guest.build import image_dir
    from dynamem.guest.recipe import load_recipe

    monkeypatch.setenv("DYNAMEM_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("minimal")
    directory = image_dir(recipe, recipe.load_lock())
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"kernel" * 100)
    (directory / "initrd.img").write_bytes(b"initrd" * 100)
    sums = {f: sha256_file(directory / f) for f in ("vmlinuz", "initrd.img")}
    manifest = {"kernel_release": "6.1.0-test", "sha256": sums}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_corrupt_guest_image_fails_its_checksum_before_booting(capsys, fake_image):
    with open(fake_image / "initrd.img", "r+b") as f:
        f.write(b"X")  # one flipped byte
    code, err = run(capsys, "vm", "exec", "--accel", "tcg", "--", "true")
    assert code == 2 and err.count("\n") == 1
    assert "initrd.img is missing or fails its checksum" in err
    assert "dynamem guest build --force" in err


def test_a_missing_kernel_or_a_corrupt_manifest_is_refused(capsys, fake_image):
    (fake_image / "vmlinuz").unlink()
    code, err = run(capsys, "vm", "exec", "--accel", "tcg", "--", "true")
    assert code == 2 and "vmlinuz is missing or fails its checksum" in err
    (fake_image / "manifest.json").write_text("{truncated")
    code, err = run(capsys, "vm", "exec", "--accel", "tcg", "--", "true")
    assert code == 2 and "is missing or corrupt" in err


def test_run_refuses_a_results_directory_in_use(capsys, tmp_path, fake_image):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    code, err = run(capsys, "run", "--suite", "quick", "--accel", "tcg", "--out", str(out))
    assert code == 2 and "exists and is not empty; use --resume" in err


def test_run_into_a_read_only_results_directory_is_one_line(capsys, tiny_fs, fake_image):
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    code, err = run(capsys, "run", "--suite", "quick", "--accel", "tcg", "--out", f"{tiny_fs}/r")
    assert code == 2 and err.count("\n") == 1
    assert "cannot write the run directory" in err and "Read-only file system" in err
