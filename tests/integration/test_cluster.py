"""`dynamem run --cluster` on real guests: local workers pinned to disjoint CPUs, a worker
killed mid-cell, and two "hosts" that are real sshd instances on loopback ports with
their own pinned host keys."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamem.store import RunStore

from .conftest import cli, qemu_pids_mentioning

pytestmark = pytest.mark.slow

SMALL = """
name = "small"
repeats = {repeats}
seed = 5
[defaults]
memory = "512M"
swap = "none"
warmup = false
[[scenario]]
name = "vmem"
mechanism = "virtio-mem"
steps = ["shrink 128M"]
[[scenario]]
name = "balloon"
mechanism = "balloon"
steps = ["shrink 128M"]
"""


def suite_file(tmp_path: Path, repeats: int) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(repeats=repeats))
    return path


def test_local_workers_run_every_cell_on_their_own_cpus(image, run_base, tmp_path):
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite_file(tmp_path, 2)), "--out", str(out),
              "--cluster", "local:2", timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "cluster local:2: 2 workers on 1 host(s)" in res.stderr
    store = RunStore.open(out)
    assert store.run.metadata.cluster == "local:2"
    cells, problems = store.load_cells()
    assert problems == [] and sorted(c.cell for c in cells) == sorted(store.run.order)
    sets = {}
    for c in cells:
        assert c.ok, c.error
        assert c.host is not None and c.host.load is not None and c.host.load.seconds > 0
        assert c.host.qemu_cpus == c.host.cpus  # QEMU really ran on the worker's CPUs
        half = len(os.sched_getaffinity(0)) // 2
        assert c.host.fingerprint.endswith(f"{half} host CPU{'s' if half > 1 else ''}")
        assert not c.lost_attempts
        sets.setdefault(c.host.worker, set()).add(tuple(c.host.cpus))
    # two workers, each always on the same CPU, none shared
    assert len(sets) == 2 and all(len(s) == 1 for s in sets.values())
    (a,), (b,) = sets.values()
    assert not set(a) & set(b)
    html = Path(res.stdout.split("report: ")[1].split()[0])
    md = (html.parent / "report.md").read_text()
    assert "cluster `local:2`" in md and "H1 " in md and "H2 " not in md


def _worker_running_a_cell(run_base: Path, deadline_s: float) -> int:
    """The PID of the worker process whose QEMU is up (QEMU's parent)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for pid in qemu_pids_mentioning(str(run_base)):
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid > 1:
                return ppid
        time.sleep(0.2)
    raise AssertionError("no cell's QEMU came up")


def test_a_killed_worker_loses_only_its_cell_which_runs_again(image, run_base, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamem.cli", "run", "--suite", str(suite_file(tmp_path, 2)),
         "--out", str(out), "--cluster", "local:2", "--no-report"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        worker = _worker_running_a_cell(run_base, 300)
        time.sleep(1.0)  # into the cell
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "lost with worker" in err
    store = RunStore.open(out)
    assert store.completed() == set(store.run.order)  # every other cell, and the lost one
    cells, _ = store.load_cells()
    lost = [c for c in cells if c.lost_attempts]
    assert len(lost) == 1 and lost[0].ok
    assert "KilledWorker" in lost[0].lost_attempts[0] or "left" in lost[0].lost_attempts[0]
    assert all(c.ok for c in cells)
    assert qemu_pids_mentioning(str(run_base)) == []  # the killed worker's QEMU died with it


# -- two hosts over real SSH ----------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    """A real OpenSSH server on a loopback port, with its own host key and one client key."""

    def __init__(self, directory: Path, client_pub: Path) -> None:
        directory.mkdir(parents=True)
        self.port = _free_port()
        self.host_key = directory / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.host_key)], check=True)  # fmt: skip
        config = directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {client_pub}\nPidFile {directory}/sshd.pid\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
        )
        self.log = directory / "sshd.log"
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"sshd did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def known_host_line(self) -> str:
        key = Path(f"{self.host_key}.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def two_hosts(tmp_path):
    if shutil.which("/usr/sbin/sshd") is None:
        pytest.fail("openssh-server is not installed (scripts/setup.sh test installs it)")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
    keys = tmp_path / "client"
    keys.mkdir()
    client = keys / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client)], check=True)
    servers = [Sshd(tmp_path / f"sshd{k}", Path(f"{client}.pub")) for k in range(2)]
    try:
        yield servers, client
    finally:
        for s in servers:
            s.stop()


def test_a_suite_over_two_ssh_hosts_is_one_run_with_one_host_section(
    image, run_base, tmp_path, two_hosts
):
    servers, client = two_hosts
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(s.known_host_line() for s in servers) + "\n")
    user = (
        os.environ.get("USER")
        or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    )
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        "".join(
            f'[[host]]\nname = "h{k}"\naddress = "127.0.0.1"\nport = {s.port}\n'
            f'user = "{user}"\nkey = "{client}"\nknown_hosts = "{known}"\nworkers = 1\n'
            f'cpus_per_worker = 1\npython = "{sys.executable}"\nworkdir = "{tmp_path}/w{k}"\n'
            # the remote workers start their QEMUs under this test's run-dir base
            f'env = {{ DYNAMEM_RUN_BASE = "{run_base}" }}\n'
            for k, s in enumerate(servers)
        )
    )
    out = tmp_path / "run"
    suite = suite_file(tmp_path, 2)
    res = cli("run", "--suite", str(suite), "--out", str(out), "--cluster", f"ssh:{hosts}",
              timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr + "".join(s.log.read_text() for s in servers)
    store = RunStore.open(out)
    cells, problems = store.load_cells()
    assert problems == [] and len(cells) == len(store.run.order) == 4  # as a serial run
    # each "host" ran one repeat of both mechanisms (the balanced assignment)
    ran = {(c.host.worker, c.scenario) for c in cells if c.ok}
    assert ran == {(w, s) for w in ("h0/0", "h1/0") for s in ("vmem", "balloon")}
    assert len({c.host.fingerprint for c in cells}) == 1
    md = (Path(res.stdout.split("report: ")[1].split()[0]).parent / "report.md").read_text()
    where = next(line for line in md.splitlines() if line.startswith("| where |"))
    assert "H1 " in where and "H2 " not in where and "4 cells on 2 workers" in where
    assert json.loads((out / "run.json").read_text())["metadata"]["cluster"] == f"ssh:{hosts}"


def test_a_suite_runs_on_a_scheduler_a_lab_already_runs(image, run_base, tmp_path):
    """`--cluster tcp://`: a Dask scheduler and a worker started by hand (as a lab would),
    on loopback; the cells run on that worker and the driver writes them."""
    port = _free_port()
    env = {**os.environ, "DYNAMEM_RUN_BASE": str(run_base)}
    py = sys.executable
    procs = [
        subprocess.Popen([py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                          "--port", str(port), "--no-dashboard"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env),
        subprocess.Popen([py, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                          "--nthreads", "1", "--name", "lab-worker", "--no-dashboard",
                          "--local-directory", str(tmp_path / "dask")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env),
    ]  # fmt: skip
    try:
        out = tmp_path / "run"
        res = cli("run", "--suite", str(suite_file(tmp_path, 1)), "--out", str(out),
                  "--cluster", f"tcp://127.0.0.1:{port}", "--no-report", timeout=900)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "1 workers on 1 host(s)" in res.stderr
        cells, problems = RunStore.open(out).load_cells()
        assert problems == [] and len(cells) == 2 and all(c.ok for c in cells)
        assert {c.host.worker for c in cells} == {"lab-worker"}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
