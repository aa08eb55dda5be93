"""What keeps a run private: a 0700 run directory holding every socket, log and key, keys
made per run, the guest's host key pinned, SSH reachable on loopback only."""

import stat
from pathlib import Path

import paramiko

from dynamem.keys import make_keypair
from dynamem.paths import make_run_dir
from dynamem.qemu.config import RunFiles, VMConfig, build_argv
from dynamem.ssh import GuestShell


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_directory_is_0700_even_under_a_permissive_umask(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("DYNAMEM_RUN_BASE", str(tmp_path))
    old = os.umask(0)
    try:
        run_dir = make_run_dir()
    finally:
        os.umask(old)
    assert run_dir.parent == tmp_path and mode(run_dir) == 0o700


def test_keys_are_fresh_per_run_and_private(tmp_path):
    one = make_keypair(tmp_path, "a")
    two = make_keypair(tmp_path, "b")
    assert mode(one.private) == 0o600
    assert one.public_line != two.public_line
    assert one.public_line.startswith("ssh-ed25519 ")


def test_every_file_qemu_uses_is_inside_the_run_directory():
    files = RunFiles(Path("/run/dm-x"), 40022, {"hostkey": Path("/run/dm-x/keys/hostkey")})
    config = VMConfig(
        kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"), swap="disk", data_size=1
    )
    argv = build_argv(config, files)
    paths = [
        part.split("=", 1)[1]
        for arg in argv
        for part in arg.split(",")
        if part.startswith(("path=", "file="))
    ]
    assert len(paths) == 6  # QMP, console, sampler, swap, data, host key
    assert all(p.startswith("/run/dm-x/") for p in paths), paths
    # Nothing listens beyond loopback: the only host port is the SSH forward on 127.0.0.1.
    netdev = argv[argv.index("-netdev") + 1]
    assert [p for p in netdev.split(",") if p.startswith("hostfwd=")] == [
        "hostfwd=tcp:127.0.0.1:40022-:22"
    ]
    assert not any("server=on" in a or "0.0.0.0" in a or a == "-vnc" for a in argv)


def test_the_guest_host_key_is_pinned_and_unknown_keys_are_rejected(tmp_path):
    client = make_keypair(tmp_path, "client")
    host = make_keypair(tmp_path, "hostkey")
    shell = GuestShell(40022, client.private, host.public_line)
    ssh: paramiko.SSHClient = shell._conn.client
    assert isinstance(ssh._policy, paramiko.RejectPolicy)  # not fabric's AutoAddPolicy
    known = ssh.get_host_keys()
    assert list(known.keys()) == ["[127.0.0.1]:40022"]
    assert known["[127.0.0.1]:40022"]["ssh-ed25519"].get_base64() == host.public_line.split()[1]
    assert shell._conn.host == "127.0.0.1"
