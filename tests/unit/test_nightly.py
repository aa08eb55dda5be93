"""`dynamem nightly`'s pieces that need no guest: the timeline, asv's machine file and
config, and its refusals of bad input."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynamem import nightly
from dynamem.errors import UserError
from dynamem.paths import bench_dir, checkout

MANIFEST = {
    "run_id": "20261126-065212-quick",
    "created": "2026-11-26T06:52:12+00:00",
    "qemu_version": "7.2.22",
    "accel": "tcg",
    "guest_kernel": "6.1.0-56-amd64",
    "host_kernel": "6.1.0-28-amd64",
    "dynamem_commit": "e50289ee020c71da4b2864eacae51e84b06890df",
}


def git(repo, *args):
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def test_each_nightly_is_one_timeline_commit_dated_by_its_run(tmp_path):
    timeline = tmp_path / "timeline"
    first = nightly.commit_manifest(timeline, MANIFEST)
    second = nightly.commit_manifest(
        timeline, {**MANIFEST, "run_id": "b", "created": "2026-11-27T06:00:00+00:00"}
    )
    assert first != second
    assert git(timeline, "log", "--format=%H %cI", "main").split("\n")[:2] == [
        f"{second} 2026-11-27T06:00:00+00:00",
        f"{first} 2026-11-26T06:52:12+00:00",
    ]
    subject = git(timeline, "log", "-1", "--format=%s", first).strip()
    assert "QEMU 7.2.22 (tcg)" in subject and "guest 6.1.0-56-amd64" in subject
    assert json.loads(git(timeline, "show", f"{first}:manifest.json")) == MANIFEST
    assert nightly.recorded_runs(timeline) == ["b", MANIFEST["run_id"]]
    with pytest.raises(UserError, match="already on the timeline"):
        nightly.commit_manifest(timeline, MANIFEST)


def test_machine_file_is_written_without_questions(tmp_path):
    path = tmp_path / ".asv-machine.json"
    path.write_text(json.dumps({"version": 1, "other": {"machine": "other"}}))
    entry = nightly.machine_entry("tcg")
    assert entry["machine"].endswith("-tcg")
    assert set(entry) == {"machine", "os", "arch", "cpu", "num_cpu", "ram"}
    assert int(entry["num_cpu"]) >= 1 and entry["ram"].endswith("GiB")
    nightly.write_machine(entry, path)
    data = json.loads(path.read_text())
    assert data["other"] == {"machine": "other"} and data[entry["machine"]] == entry


def test_config_is_the_top_level_one_with_absolute_paths_and_measured_thresholds(tmp_path):
    top = json.loads((checkout() / "asv.conf.json").read_text())
    assert top["environment_type"] == "existing" and top["benchmark_dir"] == "bench"
    assert top["results_dir"].startswith("results/") and top["html_dir"].startswith("results/")
    assert {k: v for k, v in top.items() if k not in ("repo", "benchmark_dir", "results_dir",
            "html_dir")} == nightly.ASV_CONFIG  # fmt: skip
    conf = json.loads(nightly.Layout(tmp_path).config({".*x": 0.3}).read_text())
    assert conf["repo"] == str(tmp_path / "timeline")
    assert conf["results_dir"] == str(tmp_path / "asv")
    assert conf["benchmark_dir"] == str(bench_dir()) == str(checkout() / "bench")
    assert conf["regressions_thresholds"] == {".*x": 0.3}


def test_a_root_that_does_not_exist_yet_is_created(tmp_path):
    layout = nightly.Layout(tmp_path / "new" / "root")
    layout.prepare()
    assert layout.raw.is_dir() and layout.results.is_dir() and layout.html.is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot use .*file/root as the nightly's results root"):
        nightly.Layout(tmp_path / "file" / "root").prepare()


def dynamem(*argv):
    return subprocess.run(
        [sys.executable, "-m", "dynamem.cli", *argv], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--suite", "nosuch"], "no suite 'nosuch'"),
        (["--raw", "/nonexistent/run"], "is not a dynamem run"),
        (["--repeats", "0"], "expected at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    res = dynamem("nightly", "--root", str(tmp_path), *argv)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and message in res.stderr
    assert not (tmp_path / "timeline").exists()


def test_an_unfinished_run_is_not_recorded(tmp_path):
    from dynamem import runner
    from dynamem.scenario import load_suite
    from dynamem.store import RunStore

    from .records import metadata

    suite = load_suite("quick")
    store = RunStore.create(tmp_path / "raw" / "r", runner.new_run(suite, 1, metadata()))
    res = dynamem("nightly", "--root", str(tmp_path), "--raw", str(store.directory))
    assert res.returncode == 2
    assert "not a complete run (0 of 30 cells" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing written


def test_published_page_is_pointed_at_local_copies(tmp_path):
    asv_index = Path(importlib.util.find_spec("asv").origin).parent / "www" / "index.html"
    (tmp_path / "index.html").write_text(asv_index.read_text())
    www = nightly.vendor_dir()
    missing = [n for n, _, _ in nightly.VENDOR.values() if not (www / n).is_file()]
    assert missing == [], "scripts/setup.sh fetches these with npm; run it"
    left = nightly.localize(tmp_path, www)
    page = (tmp_path / "index.html").read_text()
    assert left == []  # every CDN script of this asv has a local copy
    assert not re.search(r'<script[^>]*src="https?://', page)
    assert 'href="vendor/bootstrap.min.css"' in page
    for name, _, _ in nightly.VENDOR.values():
        assert (tmp_path / "vendor" / name).stat().st_size > 1000, name
    # byte-identical copies keep asv's integrity hash; rebuilt ones drop it
    jquery = re.search(r'<script src="vendor/jquery-3.3.1.min.js"[^>]*>', page).group(0)
    assert 'integrity="sha256-FgpCb/KJQlLNfOu91ta32o/NMZxltwRo8QtmkMRdAu8="' in jquery
    flot = re.search(r'<script src="vendor/jquery.flot.js"[^>]*>', page).group(0)
    assert "integrity" not in flot


def test_a_script_without_a_local_copy_stays_on_its_cdn(tmp_path):
    tag = '<script src="https://cdn.example.invalid/x.js"></script>'
    (tmp_path / "index.html").write_text(tag)
    assert nightly.localize(tmp_path) == ["https://cdn.example.invalid/x.js"]
    assert (tmp_path / "index.html").read_text() == tag


def test_the_manifest_counts_resizes_that_were_not_ok():
    from .records import quick_pair, run_record

    cells = [quick_pair("s", 1, 1.0), quick_pair("s", 2, 1.0, shrink_outcome="timeout")]
    manifest = nightly.manifest_of(run_record([c.cell for c in cells]), cells, Path("/raw"))
    assert manifest["cells_failed"] == []
    assert manifest["resizes_not_ok"] == ["s step 0 (shrink 256M): 1/2 ok"]


def test_a_run_over_two_host_fingerprints_is_two_asv_machines(tmp_path, monkeypatch):
    """asv gets one machine per fingerprint, each reading only its own cells; a run on one
    host keeps the machine name it always had."""
    from dynamem.analysis import tracks

    from dynamem.record import HostInfo
    from dynamem.store import RunStore

    from .records import quick_pair, run_record

    cells = [quick_pair("balloon-idle", k, 1.0) for k in range(1, 5)]
    for c in cells:
        fp = "fast host" if c.repeat <= 2 else "slow host"
        c.host = HostInfo(name="n", worker="w", cpus=[0], fingerprint=fp)
    store = RunStore.create(tmp_path / "raw" / "r", run_record([c.cell for c in cells]))
    for c in cells:
        store.write_cell(c)
    calls, machines = [], []
    monkeypatch.setattr(nightly, "asv", lambda *a, config, env=None: calls.append((a, env)) or 0)
    monkeypatch.setattr(nightly, "write_machine", machines.append)
    monkeypatch.setattr(nightly, "localize", lambda html: [])
    done = nightly.record(store.directory, nightly.Layout(tmp_path))
    runs = [(a, env) for a, env in calls if a[0] == "run"]
    assert len(runs) == 2 and [a[0] for a, _ in calls].count("publish") == 1
    assert {env[tracks.ENV_HOST] for _, env in runs} == {"fast host", "slow host"}
    names = [m["machine"] for m in machines]
    assert len(set(names)) == 2 and {m["cpu"] for m in machines} == {"fast host", "slow host"}
    assert done.machine == ", ".join(names) and done.ok
    for _, env in runs:  # each machine's numbers come from its own cells only
        cache = tracks.cache_of(store.directory, env[tracks.ENV_HOST])
        assert cache.table.drop_duplicates("cell").shape[0] == 2
