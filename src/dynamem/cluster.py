"""`dynamem run --cluster`: a suite's cells as tasks on a Dask cluster.

Three ways to get one: `local:N` (N worker processes on this host), `ssh:HOSTS.toml`
(workers started on the listed hosts by Dask's own SSH deployment, every host key pinned)
and `tcp://ADDRESS` (a scheduler a lab already runs). The driver, this process, keeps the
store: a worker returns a finished cell record and the driver writes it, so a worker that
dies loses only the cell it was running. That cell runs once more; lost twice, it is
recorded failed with the reason.

Each worker runs one cell at a time, pinned to its own CPUs, disjoint from its host's
other workers (QEMU inherits the pinning). The driver decides which host runs what: repeat
r of every scenario of one condition goes to the same host, so on each host every
mechanism of a scenario group runs equally often and a host's speed is a block effect,
not a confound; within a host cells go in the run's seeded order. Cells from hosts whose
fingerprints differ are never pooled (`dynamem.placement`).
"""

import asyncio
import contextlib
import platform
import sys
import time
import tomllib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from dynamem.cell import Cell, guest_condition_label, host_cpu_model, qemu_version_text, run_cell
from dynamem.errors import UserError
from dynamem.placement import available_cpus, fingerprint, pin, split_cpus
from dynamem.record import CellRecord, HostInfo

LOST_LIMIT = 2  # attempts of one cell lost with their worker before it is recorded failed
NO_WORKER_S = 120.0  # how long the driver waits for any worker before it gives up
SSH_CONNECT_S = 30.0  # how long connecting to an ssh: host may take
REHOME_AFTER_S = 60.0  # how long a host may be without workers before its cells move
# what a task's future raises when its worker, not the cell, went away
LOST = (KilledWorker, CommClosedError, FutureCancelledError, asyncio.CancelledError)


@dataclass(frozen=True)
class SshHost:
    name: str
    address: str
    user: str
    key: Path
    known_hosts: Path
    port: int = 22
    workers: int = 1
    cpus_per_worker: int | None = None  # None: the host's CPUs shared equally
    workdir: str | None = None
    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = ()  # set in the worker (e.g. DYNAMEM_CACHE)


@dataclass(frozen=True)
class ClusterSpec:
    kind: str  # local, ssh or tcp
    text: str  # as given, recorded in the run's metadata
    workers: int = 0  # local
    hosts: tuple[SshHost, ...] = ()  # ssh
    listen: str = "127.0.0.1"  # ssh: where the scheduler listens for the hosts' workers
    address: str = ""  # tcp


_HOST_KEYS = {f for f in SshHost.__dataclass_fields__}


def _host(data: Any, k: int, base: Path, where: str) -> SshHost:
    if not isinstance(data, dict):
        raise UserError(f"{where}: host {k} is not a table")
    unknown = sorted(set(data) - _HOST_KEYS)
    if unknown:
        raise UserError(f"{where}: host {k} has unknown key {unknown[0]!r}")
    for key in ("address", "user", "key", "known_hosts"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UserError(f"{where}: host {k} needs {key} (a string)")
    for key in ("port", "workers", "cpus_per_worker"):
        if key in data and (not isinstance(data[key], int) or data[key] < 1):
            raise UserError(f"{where}: host {k}: {key} must be a positive integer")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise UserError(f"{where}: host {k}: env must be a table of strings")
    paths = {}
    for key in ("key", "known_hosts"):
        path = (base / Path(data[key]).expanduser()).resolve()
        if not path.is_file():
            raise UserError(f"{where}: host {k}: {key} {path} does not exist")
        paths[key] = path
    name = data.get("name") or f"{data['address']}:{data.get('port', 22)}"
    if "/" in name:
        raise UserError(f"{where}: host {k}: name {name!r} must not contain '/'")
    return SshHost(**{**data, **paths, "name": name, "env": tuple(sorted(env.items()))})


def load_hosts(path: Path) -> tuple[tuple[SshHost, ...], str]:
    """The hosts of an `ssh:` cluster file and the scheduler's listen address."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cluster hosts file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"cluster hosts file {path}: {exc}") from exc
    unknown = sorted(set(data) - {"listen", "host"})
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (expected listen, [[host]])")
    hosts = tuple(_host(h, k, path.parent, str(path)) for k, h in enumerate(data.get("host", [])))
    if not hosts:
        raise UserError(f"{path}: no [[host]] entries")
    names = Counter(h.name for h in hosts)
    if (dup := next((n for n, c in names.items() if c > 1), None)) is not None:
        raise UserError(f"{path}: two hosts are named {dup!r}")
    loopback = all(h.address in ("127.0.0.1", "localhost", "::1") for h in hosts)
    listen = data.get("listen") or ("127.0.0.1" if loopback else "")
    if not listen:
        raise UserError(
            f"{path}: set listen = \"ADDRESS\" (this host's address the hosts' workers reach "
            "the scheduler on)"
        )
    return hosts, str(listen)


def parse_spec(text: str) -> ClusterSpec:
    """`local:N`, `ssh:HOSTS.toml` or `tcp://HOST:PORT`; anything else is a one-line error."""
    if text.startswith("local:"):
        n = text.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--cluster {text}: local:N needs a positive worker count")
        split_cpus(available_cpus(), int(n))  # too many workers for this host: one line now
        return ClusterSpec("local", text, workers=int(n))
    if text.startswith("ssh:"):
        hosts, listen = load_hosts(Path(text.removeprefix("ssh:")).expanduser())
        return ClusterSpec("ssh", text, hosts=hosts, listen=listen)
    if text.startswith(("tcp://", "tls://")):
        return ClusterSpec("tcp", text, address=text)
    raise UserError(f"--cluster {text}: expected local:N, ssh:HOSTS.toml or tcp://HOST:PORT")


def _dashboard() -> str | None:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return None
    return "127.0.0.1:0"


def _ssh_cluster(spec: ClusterSpec) -> Any:
    from distributed import Scheduler, SpecCluster
    from distributed.deploy.ssh import Worker

    workers = {}
    for h in spec.hosts:
        connect = {
            "port": h.port,
            "username": h.user,
            "client_keys": [str(h.key)],
            "known_hosts": str(h.known_hosts),
            "connect_timeout": SSH_CONNECT_S,  # an unreachable host: an error, not a hang
        }
        for i in range(h.workers):
            name = f"{h.name}/{i}"
            kwargs: dict[str, Any] = {"name": name, "nthreads": 1}
            if h.workdir:
                kwargs["local_directory"] = h.workdir
            if h.env:
                kwargs["env"] = dict(h.env)
            workers[name] = {
                "cls": Worker,
                "options": {
                    "address": h.address,
                    "connect_options": connect,
                    "kwargs": kwargs,
                    "remote_python": h.python,
                },
            }
    dashboard = _dashboard()
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": spec.listen,
            "dashboard": dashboard is not None,
            "dashboard_address": f"{spec.listen}:0",
        },
    }
    return SpecCluster(workers, scheduler, name="dynamem-ssh")


@contextlib.contextmanager
def connect(spec: ClusterSpec) -> Iterator[Any]:
    """A Dask client on the cluster `spec` names; a cluster started here is stopped on
    exit (its workers' QEMUs die with them: they are started with PDEATHSIG)."""
    import dask
    from distributed import Client, LocalCluster

    # A worker that dies while running a cell fails that task at once: the driver, not
    # the scheduler, decides whether it runs again (and records that it was lost).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if spec.kind == "tcp":
            try:
                client = Client(spec.address, timeout=30)
            except OSError as exc:
                raise UserError(f"--cluster {spec.text}: no scheduler answers ({exc})") from exc
            with client:
                yield client
            return
        if spec.kind == "local":
            dashboard = _dashboard()
            cluster = LocalCluster(
                n_workers=spec.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=dashboard,
            )
        else:
            try:
                cluster = _ssh_cluster(spec)
            except Exception as exc:  # asyncssh's and Dask's own errors, many kinds
                raise UserError(f"--cluster {spec.text}: starting workers failed: {exc}") from exc
        with cluster, Client(cluster) as client:
            yield client


@dataclass
class Slot:
    """One worker: it runs one cell at a time on its own CPUs."""

    address: str
    name: str
    host: str  # the host it belongs to, for assignment (a real host may hold several)
    cpus: list[int]
    node: str = ""  # the host's own name
    fingerprint: str = ""  # what its cells record (placement.host_info), known up front
    busy: Any = None  # the future of the cell it runs


def probe(qemu: str) -> dict[str, Any]:
    """Run on each worker once: what its slot needs before any cell runs there."""
    return {
        "cpus": available_cpus(),
        "node": platform.node() or "host",
        "cpu": host_cpu_model(),
        "kernel": platform.release(),
        "qemu": qemu_version_text(qemu),
    }


def host_of(spec: ClusterSpec, name: str, info: dict[str, Any]) -> str:
    if spec.kind == "local":
        return "local"
    if spec.kind == "ssh":
        return name.split("/", 1)[0]
    return str(info.get("host") or name)


def plan_slots(
    spec: ClusterSpec,
    workers: dict[str, dict[str, Any]],
    probes: dict[str, dict[str, Any]],
    accel: str,
) -> list[Slot]:
    """A slot per worker, with the CPU set it pins its cells to: its host's CPUs split into
    disjoint sets, one per worker of that host (or `cpus_per_worker` each)."""
    per_host: dict[str, list[tuple[str, str]]] = {}
    for address, info in workers.items():
        name = str(info.get("name", address))
        per_host.setdefault(host_of(spec, name, info), []).append((name, address))
    per_worker = {h.name: h.cpus_per_worker for h in spec.hosts}
    slots = []
    for host, members in sorted(per_host.items()):
        members.sort()
        pool = probes[members[0][1]]["cpus"]
        sets = split_cpus(pool, len(members), per_worker.get(host))
        for (name, address), cpus in zip(members, sets, strict=True):
            p = probes[address]
            fp = fingerprint(p["cpu"], p["kernel"], accel, p["qemu"], len(cpus))
            slots.append(Slot(address, name, host, cpus, p["node"], fp))
    return slots


def assign(cells: list[Cell], hosts: dict[str, int], accel: str) -> dict[str, deque[Cell]]:
    """Per host, its cells in run order. Hosts take repeats in proportion to their worker
    counts; repeat r of every scenario of one condition goes to the same host, the start
    offset by the condition so that a suite of few repeats still reaches every host."""
    cycle = _interleaved(hosts)
    conditions = sorted({c.scenario.condition(accel).describe() for c in cells})
    offset = {d: k for k, d in enumerate(conditions)}
    queues: dict[str, deque[Cell]] = {h: deque() for h in hosts}
    for cell in cells:
        g = offset[cell.scenario.condition(accel).describe()]
        queues[cycle[(cell.repeat - 1 + g) % len(cycle)]].append(cell)
    return queues


def _interleaved(hosts: dict[str, int]) -> list[str]:
    """Each host `n` times, spread out: a:2, b:1 -> a b a."""
    order = sorted(hosts)
    slots = sorted(((k + 0.5) / n, h) for h in order for n in [hosts[h]] for k in range(n))
    return [h for _, h in slots]


def run_on_worker(
    cell: Cell, cpus: list[int], *, accel_request: str | None, qemu: str, guest: str, accel: str
) -> CellRecord:
    """The task: pin this worker's thread (and the QEMU it starts) and run the cell."""
    from distributed import get_worker

    pin(cpus)
    return run_cell(
        cell, accel_request=accel_request, qemu=qemu, guest=guest, accel=accel,
        worker=str(get_worker().name),
    )  # fmt: skip


def _text(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - some of Dask's exceptions cannot always print
        return type(exc).__name__


class Dispatch:
    """The driver's loop: what each host still has to run, what each worker runs, and what
    happened to cells whose worker went away."""

    def __init__(
        self,
        client: Any,
        slots: list[Slot],
        cells: list[Cell],
        write: Callable[[CellRecord], None],
        options: dict[str, Any],
        report: Callable[[str], None],
        progress: Callable[[str], None],
    ) -> None:
        self.client, self.write, self.options = client, write, options
        self.report, self.progress = report, progress
        self.slots = {s.name: s for s in slots}
        self.gone: dict[str, Slot] = {}  # workers that left; a restarted one comes back
        self.empty_since: dict[str, float] = {}  # hosts without a worker, since when
        self.queues = assign(cells, dict(Counter(s.host for s in slots)), options["accel"])
        self.running: dict[Any, tuple[Slot, Cell]] = {}
        self.lost: dict[str, list[str]] = {}  # cell id -> why each attempt was lost
        self.attempts = Counter[str]()
        self.done_on = Counter[str]()  # host -> cells written
        self.moved: list[str] = []  # cells that ran away from the host they were given

    def left(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def loop(self) -> None:
        from distributed import wait

        idle_since = time.monotonic()
        while self.running or self.left():
            self.refresh()
            if self.slots:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > NO_WORKER_S:
                raise UserError(
                    f"no Dask worker left for {NO_WORKER_S:g} s; {self.left()} cells not "
                    "run (finish them with --resume)"
                )
            self.rehome()
            self.submit()
            if not self.running:
                time.sleep(0.5)
                continue
            # a look at the workers every second; a future cancelled under us (the
            # scheduler's connection dropped) is handled below as a lost cell
            with contextlib.suppress(TimeoutError, FuturesCancelledError):
                wait(list(self.running), timeout=1.0, return_when="FIRST_COMPLETED")
            for future in [f for f in self.running if f.done()]:
                self.collect(future)

    def collect(self, future: Any) -> None:
        """A finished task: its record written, or its cell lost (worker gone) or failed
        (the task itself raised on the worker)."""
        slot, cell = self.running.pop(future)
        slot.busy = None
        try:
            record = future.result()
        except LOST as exc:  # the worker, not the cell, went away
            self.lose(slot, cell, _text(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the task itself failed on the worker
            why = f"the task failed on worker {slot.name}: {_text(exc)}"
            self.write(self.failed(slot, cell, why))
            self.done_on[slot.host] += 1
            return
        record.lost_attempts = self.lost.get(cell.id, [])
        self.write(record)
        self.done_on[slot.host] += 1
        self.progress(f"{cell.id} done on {slot.name}")

    def submit(self) -> None:
        for slot in self.slots.values():
            queue = self.queues.get(slot.host)
            if slot.busy is not None or not queue:
                continue
            cell = queue.popleft()
            self.attempts[cell.id] += 1
            slot.busy = self.client.submit(
                run_on_worker, cell, slot.cpus, **self.options,
                key=f"cell-{cell.id}-{self.attempts[cell.id]}", pure=False,
                workers=[slot.address], allow_other_workers=False,
            )  # fmt: skip
            self.running[slot.busy] = (slot, cell)
            self.progress(f"{cell.id} on {slot.name}")

    def refresh(self) -> None:
        """Follow the scheduler's worker list: a restarted worker (same name, new address)
        takes its old CPUs; a worker gone while running a cell loses that cell."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(info.get("name", a)): a for a, info in workers.items()}
        for name, slot in list(self.gone.items()):  # back after a restart
            if name in by_name:
                slot.address = by_name[name]
                self.slots[name] = self.gone.pop(name)
                self.empty_since.pop(slot.host, None)
                self.report(f"worker {name} on {slot.host} is back")
        for name, slot in list(self.slots.items()):
            address = by_name.get(name)
            if address == slot.address:
                continue
            if slot.busy is not None:
                future = slot.busy
                slot.busy = None
                if future in self.running:
                    _, cell = self.running.pop(future)
                    future.cancel()
                    self.lose(slot, cell, "the worker left the cluster")
            if address is None:
                self.gone[name] = self.slots.pop(name)
                self.report(f"worker {name} on {slot.host} is gone")
            else:
                slot.address = address
                self.report(f"worker {name} on {slot.host} is back at {address}")

    def rehome(self) -> None:
        """Cells of a host that has no worker left go to the others (listed in the run's
        output; the report finds the broken balance in the records themselves)."""
        alive = sorted({s.host for s in self.slots.values()})
        if not alive:
            return
        now = time.monotonic()
        for host, queue in self.queues.items():
            if host in alive or not queue:
                continue
            # a host whose workers are restarting (their nannies) gets its cells back then
            since = self.empty_since.setdefault(host, now)
            if now - since < REHOME_AFTER_S:
                continue
            for k, cell in enumerate(queue):
                target = alive[k % len(alive)]
                self.queues[target].append(cell)
                self.moved.append(f"{cell.id}: {host} -> {target}")
            self.report(f"host {host} has no worker left; its {len(queue)} cells moved")
            queue.clear()

    def lose(self, slot: Slot, cell: Cell, reason: str) -> None:
        """A cell whose worker went away: queued again at the head of its host's queue, or,
        lost `LOST_LIMIT` times, recorded failed with the reasons."""
        reasons = self.lost.setdefault(cell.id, [])
        reasons.append(f"worker {slot.name} on {slot.host}: {reason[:300]}")
        self.report(f"cell {cell.id}: lost with worker {slot.name} ({reason[:200]})")
        if len(reasons) < LOST_LIMIT:
            self.queues.setdefault(slot.host, deque()).appendleft(cell)
            return
        record = self.failed(
            slot, cell, f"lost with its worker {len(reasons)} times; last: {reasons[-1]}"
        )
        record.lost_attempts = list(reasons)
        self.write(record)

    def failed(self, slot: Slot, cell: Cell, why: str) -> CellRecord:
        """The record of a cell that never produced its own, on the slot it was given."""
        s = cell.scenario
        return CellRecord(
            cell=cell.id,
            scenario=s.name,
            repeat=cell.repeat,
            mechanism=s.mechanism_config(),
            condition=s.condition(
                self.options["accel"], guest_condition_label(self.options.get("guest", "minimal"))
            ),
            scenario_config=dict(s.raw),
            failed_at="cluster",
            error=f"cluster: {why}",
            lost_attempts=self.lost.get(cell.id, []),
            reproduces=s.reproduces,
            host=HostInfo(slot.node, slot.name, slot.cpus, slot.fingerprint),
        )

    def counts(self) -> str:
        return ", ".join(f"{h} {n}" for h, n in sorted(self.done_on.items()))


def run_cells(
    spec: ClusterSpec,
    cells: list[Cell],
    write: Callable[[CellRecord], None],
    *,
    options: dict[str, Any],
    report: Callable[[str], None],
    progress: Callable[[str], None],
    started: Callable[[Dispatch], None] = lambda d: None,
) -> Dispatch:
    """Run `cells` on the cluster; `write` gets every record as it arrives. `options` are
    run_cell's accel_request, qemu, guest and accel."""
    with connect(spec) as client:
        expected = spec.workers or sum(h.workers for h in spec.hosts) or 1
        try:
            client.wait_for_workers(expected, timeout=NO_WORKER_S)
        except TimeoutError as exc:
            raise UserError(
                f"--cluster {spec.text}: {expected} workers did not join within {NO_WORKER_S:g} s"
            ) from exc
        workers = client.scheduler_info(n_workers=-1)["workers"]
        slots = plan_slots(spec, workers, client.run(probe, options["qemu"]), options["accel"])
        link = client.dashboard_link if client.scheduler_info().get("services") else ""
        report(
            f"cluster {spec.text}: {len(slots)} workers on {len({s.host for s in slots})} "
            f"host(s)" + (f"; dashboard {link}" if link else "")
        )
        for s in slots:
            report(f"  worker {s.name} on {s.host}: CPUs {','.join(map(str, s.cpus))}")
        vcpus = max((c.scenario.cpus for c in cells), default=0)
        fewest = min(len(s.cpus) for s in slots)
        if fewest < vcpus:
            report(
                f"warning: a worker has {fewest} host CPU{'s' if fewest > 1 else ''} for guests "
                f"of up to {vcpus} vCPUs: their vCPUs share host CPUs, which slows resizes "
                "and can change which mechanism wins (a different condition from a serial run)"
            )
        d = Dispatch(client, slots, cells, write, options, report, progress)
        started(d)
        try:
            d.loop()
        finally:
            for future in d.running:
                future.cancel()
    return d
