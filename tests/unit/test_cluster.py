"""The pure parts of `--cluster`: the spec and hosts file with their one-line errors, CPU
sets, balanced assignment, a lost worker's cell, host load, and never pooling hosts."""

from collections import Counter, deque

import pytest
from dynamem.analysis.compare import compare_tables, host_mismatch
from dynamem.analysis.metrics import condition_of, pool_hosts, tidy
from dynamem.analysis.report import build_report

from dynamem import cluster, placement
from dynamem.errors import UserError
from dynamem.record import HostInfo
from dynamem.runner import cells_in_order
from dynamem.scenario import load_suite, with_repeats

from .records import quick_pair, run_record


def host(fp: str, worker: str = "serial") -> HostInfo:
    return HostInfo(name="h", worker=worker, cpus=[0], fingerprint=fp)


# -- the spec and the hosts file --------------------------------------------------------------


def test_local_and_scheduler_specs(monkeypatch):
    monkeypatch.setattr(cluster, "available_cpus", lambda: [0, 1, 2, 3])
    assert cluster.parse_spec("local:3") == cluster.ClusterSpec("local", "local:3", workers=3)
    with pytest.raises(UserError, match="5 workers with one CPU each at least need 5 CPUs"):
        cluster.parse_spec("local:5")  # before any run directory or worker exists
    tcp = cluster.parse_spec("tcp://10.0.0.5:8786")
    assert tcp.kind == "tcp" and tcp.address == "tcp://10.0.0.5:8786"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("local:0", "local:N needs a positive worker count"),
        ("local:two", "local:N needs a positive worker count"),
        ("slurm:4", "expected local:N, ssh:HOSTS.toml or tcp://HOST:PORT"),
        ("ssh:/nonexistent/hosts.toml", "cluster hosts file /nonexistent/hosts.toml"),
    ],
)
def test_a_bad_spec_is_one_line(text, message):
    with pytest.raises(UserError) as err:
        cluster.parse_spec(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def write_hosts(tmp_path, body: str):
    (tmp_path / "id").write_text("key")
    (tmp_path / "known").write_text("[127.0.0.1]:2201 ssh-ed25519 AAAA")
    path = tmp_path / "hosts.toml"
    path.write_text(body)
    return path


HOST = """
[[host]]
name = "{name}"
address = "{address}"
port = 2201
user = "dm"
key = "id"
known_hosts = "known"
workers = 2
cpus_per_worker = 1
"""


def test_a_hosts_file_resolves_its_paths_and_defaults(tmp_path):
    path = write_hosts(tmp_path, HOST.format(name="a", address="127.0.0.1") + HOST.format(
        name="b", address="127.0.0.1"))  # fmt: skip
    spec = cluster.parse_spec(f"ssh:{path}")
    assert [h.name for h in spec.hosts] == ["a", "b"] and spec.listen == "127.0.0.1"
    a = spec.hosts[0]
    assert a.key == tmp_path / "id" and a.known_hosts == tmp_path / "known"
    assert (a.port, a.workers, a.cpus_per_worker, a.user) == (2201, 2, 1, "dm")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (HOST.format(name="a", address="127.0.0.1").replace('user = "dm"\n', ""),
         "host 0 needs user"),
        (HOST.format(name="a", address="127.0.0.1") + "colour = 1\n",
         "host 0 has unknown key 'colour'"),
        (HOST.format(name="a", address="127.0.0.1").replace('"known"', '"missing"'),
         "known_hosts"),
        (HOST.format(name="a", address="127.0.0.1").replace("workers = 2", "workers = 0"),
         "workers must be a positive integer"),
        (HOST.format(name="a", address="127.0.0.1") * 2, "two hosts are named 'a'"),
        (HOST.format(name="a", address="10.1.2.3"), "set listen"),
        ("", "no [[host]] entries"),
        ("[[host]\n", "hosts.toml"),
    ],
)  # fmt: skip
def test_a_bad_hosts_file_is_one_line(tmp_path, body, message):
    path = write_hosts(tmp_path, body)
    with pytest.raises(UserError) as err:
        cluster.parse_spec(f"ssh:{path}")
    assert message in str(err.value) and "\n" not in str(err.value)


# -- CPU sets, slots and assignment --------------------------------------------------------------


def test_cpu_sets_are_disjoint_and_never_more_than_the_host_has():
    assert placement.split_cpus([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert placement.split_cpus([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]
    assert placement.split_cpus([4, 5, 6], 3, per_worker=1) == [[4], [5], [6]]
    with pytest.raises(UserError, match="3 workers with one CPU each at least need 3 CPUs"):
        placement.split_cpus([0, 1], 3)
    with pytest.raises(UserError, match="2 workers with 2 CPUs each need 4 CPUs"):
        placement.split_cpus([0, 1, 2], 2, per_worker=2)


def test_slots_of_a_local_cluster_split_the_host_and_carry_the_fingerprint():
    spec = cluster.parse_spec("local:2")
    workers = {"tcp://127.0.0.1:1": {"name": 1}, "tcp://127.0.0.1:2": {"name": 0}}
    probe = {"cpus": [0, 1], "node": "n", "cpu": "AMD EPYC", "kernel": "6.1", "qemu": "7.2.22"}
    slots = cluster.plan_slots(spec, workers, dict.fromkeys(workers, probe), "tcg")
    assert [(s.name, s.cpus, s.host) for s in slots] == [("0", [0], "local"), ("1", [1], "local")]
    assert slots[0].fingerprint == "AMD EPYC, Linux 6.1, QEMU 7.2.22, tcg, 1 host CPU"


def per_host_mechanisms(queues, accel="tcg"):
    """{(host, condition): Counter(mechanism)}."""
    out: dict[tuple[str, str], Counter] = {}
    for h, q in queues.items():
        for c in q:
            key = (h, c.scenario.condition(accel).describe())
            out.setdefault(key, Counter())[c.scenario.mechanism] += 1
    return out


@pytest.mark.parametrize("repeats", [1, 2, 5])
def test_every_mechanism_of_a_condition_runs_equally_often_on_each_host(repeats):
    cells = cells_in_order(with_repeats(load_suite("quick"), repeats), 7)
    queues = cluster.assign(cells, {"a": 1, "b": 1}, "tcg")
    assert sorted(c.id for q in queues.values() for c in q) == sorted(c.id for c in cells)
    for counts in per_host_mechanisms(queues).values():
        assert len(set(counts.values())) == 1 and set(counts) == {"balloon", "dimm", "virtio-mem"}
    # the quick suite has two conditions (idle, stress): even one repeat reaches both hosts
    assert all(queues[h] for h in "ab")
    for q in queues.values():  # each host keeps the run's seeded order
        assert [c.id for c in q] == [c.id for c in cells if c in q]


def test_a_host_with_more_workers_gets_more_repeats():
    cells = cells_in_order(with_repeats(load_suite("quick"), 6), 7)
    queues = cluster.assign(cells, {"big": 2, "small": 1}, "tcg")
    assert (len(queues["big"]), len(queues["small"])) == (24, 12)
    assert cluster._interleaved({"a": 2, "b": 1}) == ["a", "b", "a"]


# -- a lost worker's cell ------------------------------------------------------------------------


def test_a_cell_lost_once_runs_again_and_lost_twice_is_recorded_failed():
    cells = cells_in_order(with_repeats(load_suite("quick"), 1), 7)
    slot = cluster.Slot(
        "tcp://x:1", "a/0", "a", [3], "node-a", "CPU, Linux 6.1, QEMU 7.2, tcg, 1 host CPU"
    )
    written = []
    d = cluster.Dispatch(None, [slot], cells, written.append, {"accel": "tcg"}, print, print)
    cell = d.queues["a"].popleft()
    d.lose(slot, cell, "KilledWorker: gone")
    assert d.queues["a"][0] == cell and written == []
    d.queues["a"].popleft()
    d.lose(slot, cell, "CommClosedError")
    (record,) = written
    assert record.status == "failed" and record.failed_at == "cluster"
    assert record.lost_attempts == [
        "worker a/0 on a: KilledWorker: gone", "worker a/0 on a: CommClosedError"]  # fmt: skip
    assert "lost with its worker 2 times" in record.error
    assert record.host.fingerprint == slot.fingerprint and record.host.cpus == [3]
    assert cell not in d.queues["a"]


def test_a_host_without_workers_hands_its_cells_to_the_others():
    cells = cells_in_order(with_repeats(load_suite("quick"), 2), 7)
    slots = [cluster.Slot("tcp://x:1", "a/0", "a", [0]), cluster.Slot("tcp://y:1", "b/0", "b", [0])]
    d = cluster.Dispatch(None, slots, cells, print, {"accel": "tcg"}, print, print)
    n_b = len(d.queues["b"])
    del d.slots["b/0"]
    d.rehome()  # its worker may be restarting: the cells wait for it a while
    assert len(d.queues["b"]) == n_b
    d.empty_since["b"] -= cluster.REHOME_AFTER_S
    d.rehome()
    assert not d.queues["b"] and len(d.queues["a"]) == len(cells)
    assert len(d.moved) == n_b and all(m.endswith("b -> a") for m in d.moved)


# -- host load -----------------------------------------------------------------------------------

STAT_0 = """cpu  300 0 300 1400 0 0 0 0 0 0
cpu0 100 0 100 800 0 0 0 0 0 0
cpu1 200 0 200 600 0 0 0 0 0 0
intr 1 2 3
"""
STAT_1 = """cpu  700 0 500 1600 0 0 0 0 0 0
cpu0 100 0 100 900 0 0 0 0 0 0
cpu1 600 0 400 700 0 0 0 0 0 0
intr 1 2 3
"""


def test_busy_share_over_all_cpus_and_over_the_cells_own():
    a, b = placement.cpu_times(STAT_0), placement.cpu_times(STAT_1)
    assert a.shape == (2, 9) and list(a[:, 0]) == [0, 1]
    assert placement.busy_share(a, b) == pytest.approx(600 / 800)  # 600 busy of 800 jiffies
    assert placement.busy_share(a, b, [0]) == pytest.approx(0.0)
    assert placement.busy_share(a, b, [1]) == pytest.approx(600 / 700)


# -- never pooling hosts ---------------------------------------------------------------------


def with_host(cells, fp, worker="serial"):
    for c in cells:
        c.host = host(fp, worker)
    return cells


def test_cells_of_two_host_fingerprints_are_two_conditions_and_compare_pairs_them_by_host():
    fast = with_host([quick_pair("s", k, 1.0 + k / 100) for k in range(1, 6)], "fast host")
    slow = with_host([quick_pair("s", k, 3.0 + k / 100) for k in range(6, 11)], "slow host")
    table = tidy(fast + slow)
    assert set(table.host) == {"fast host", "slow host"}
    assert condition_of(fast[0]) != condition_of(slow[0])
    assert condition_of(fast[0]).endswith("; host fast host")
    same, missing = compare_tables(table, table)
    lat = same[(same.metric == "latency_guest_s") & (same.step == "shrink 256M")]
    assert sorted(lat.median_a) == pytest.approx([1.03, 3.08])  # one row per host, never pooled
    # a run on the fast host only against one on the slow host only: refused unless pooled
    a, b = tidy(fast), tidy(slow)
    assert "fast host only in A" in host_mismatch(a, b)
    assert host_mismatch(pool_hosts(a), pool_hosts(b)) is None
    pooled, _ = compare_tables(pool_hosts(a), pool_hosts(b))
    row = pooled[(pooled.metric == "latency_guest_s") & (pooled.step == "shrink 256M")].iloc[0]
    assert row.ratio == pytest.approx(3.08 / 1.03, rel=0.01) and row.host == "pooled hosts"


def test_the_report_keeps_hosts_apart_and_says_where_cells_ran(tmp_path):
    from dynamem.store import RunStore

    cells = with_host([quick_pair("s", k, 1.0) for k in range(1, 4)], "fast host", "local/0")
    cells += with_host([quick_pair("s", k, 3.0) for k in range(4, 7)], "slow host", "local/1")
    cells[0].lost_attempts = ["worker local/1 on local: KilledWorker"]
    store = RunStore.create(
        tmp_path / "run", run_record([c.cell for c in cells], cluster="local:2")
    )
    for c in cells:
        store.write_cell(c)
    md = build_report(store, tmp_path / "out")[0].read_text()
    where = next(line for line in md.splitlines() if line.startswith("| where |"))
    assert "cluster `local:2`" in where
    assert "H1 fast host: 3 cells on 1 worker" in where and "H2 slow host: 3 cells" in where
    assert "1 cells lost a worker and ran again (1 then ok)" in where
    assert "never pooled" in where
    rows = [line for line in md.splitlines() if line.startswith("| shrink 256M: latency")]
    assert len(rows) == 2 and any("3.00 s" in r for r in rows) and any("1.00 s" in r for r in rows)
    assert not any("3.00 s" in r and "1.00 s" in r for r in rows)


def test_queues_are_deques():  # the driver pops from the left and re-queues at the head
    queues = cluster.assign(cells_in_order(load_suite("quick"), 1), {"a": 1}, "tcg")
    assert isinstance(queues["a"], deque)


def test_the_report_names_a_host_where_mechanisms_ran_unequally_often():
    from dynamem.analysis.report import _unbalanced

    cells = with_host([quick_pair("b", k, 1.0) for k in range(1, 3)], "fp")
    cells += with_host(
        [quick_pair("v", k, 1.0, mechanism="virtio-mem", variant="sbm") for k in range(1, 3)],
        "fp",
    )
    assert _unbalanced(cells) == []
    cells[0].status = "failed"
    assert _unbalanced(cells) == ["h (balloon 1, virtio-mem/sbm 2)"]


class FakeClient:
    """The scheduler's worker list over time (what `Dispatch.refresh` reads)."""

    def __init__(self, *lists):
        self.lists = list(lists)

    def scheduler_info(self, n_workers=0):
        return {"workers": self.lists.pop(0)}


def test_a_worker_restarted_by_its_nanny_gets_its_cpus_back_and_a_vanished_one_its_cells_moved():
    cells = cells_in_order(with_repeats(load_suite("quick"), 2), 7)
    slots = [
        cluster.Slot("tcp://l:1", "0", "local", [0]),
        cluster.Slot("tcp://l:2", "1", "local", [1]),
    ]
    client = FakeClient(
        {"tcp://l:1": {"name": 0}},  # worker 1 is gone (its nanny is restarting it)
        {"tcp://l:1": {"name": 0}, "tcp://l:9": {"name": 1}},  # back, at a new address
    )
    lines = []
    d = cluster.Dispatch(client, slots, cells, print, {"accel": "tcg"}, lines.append, print)
    d.refresh()
    assert set(d.slots) == {"0"} and "worker 1 on local is gone" in lines
    d.refresh()
    assert set(d.slots) == {"0", "1"} and d.slots["1"].address == "tcp://l:9"
    assert d.slots["1"].cpus == [1]


def test_a_task_that_fails_on_its_worker_is_recorded_failed_at_once_not_retried():
    class Done:
        def __init__(self, exc):
            self.exc = exc

        def done(self):
            return True

        def result(self):
            raise self.exc

    cells = cells_in_order(with_repeats(load_suite("quick"), 1), 7)
    slot = cluster.Slot("tcp://x:1", "a/0", "a", [0], "n", "fp")
    written = []
    d = cluster.Dispatch(None, [slot], cells[:2], written.append, {"accel": "tcg"}, print, print)
    first, second = d.queues["a"].popleft(), d.queues["a"].popleft()
    gone = cluster.CommClosedError("in <TCP>: Stream is closed")
    d.running = {Done(ModuleNotFoundError("No module named 'dynamem'")): (slot, first),
                 Done(gone): (slot, second)}  # fmt: skip
    d.queues["a"].clear()
    for future in list(d.running):
        d.collect(future)
    assert [r.cell for r in written] == [first.id]  # the worker's own error: failed once
    assert "No module named 'dynamem'" in written[0].error and not written[0].lost_attempts
    assert d.lost[second.id][0].startswith("worker a/0 on a: CommClosedError")
    assert list(d.queues["a"]) == [second]  # lost with its worker: queued again
