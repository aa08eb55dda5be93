"""Two real `dynamem nightly` runs on a tiny suite give two points on every asv graph, and
the published page serves its data files and renders in headless Chromium."""

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dynamem.paths import bench_dir, cache_dir

from .conftest import cli, qemu_pids_mentioning

pytestmark = pytest.mark.slow

TINY = """
name = "tiny-nightly"
repeats = 1
seed = 5
[defaults]
memory = "1G"
swap = "none"
warmup = false
steps = ["shrink 128M", "grow 128M"]
[[scenario]]
name = "vmem-impact"
mechanism = "virtio-mem"
workload = "impact"
workload_size = "256M"
[[scenario]]
name = "balloon-idle"
mechanism = "balloon"
"""


TINY_ICOUNT = """
name = "tiny-icount"
repeats = 1
seed = 5
[defaults]
memory = "1G"
cpus = 1
swap = "none"
warmup = false
steps = ["shrink 128M", "grow 128M"]
[[scenario]]
name = "balloon-idle"
mechanism = "balloon"
"""


@pytest.fixture(scope="module")
def two_nightlies(image, tmp_path_factory):
    """(results root, the two commands' outputs); HOME is private (asv's machine file)."""
    tmp = tmp_path_factory.mktemp("nightly")
    suite = tmp / "tiny.toml"
    suite.write_text(TINY)
    root = tmp / "results"
    home = tmp / "home"
    home.mkdir()
    base = Path("/tmp") / f"dm-{os.getpid()}-{time.monotonic_ns()}"
    env = {"HOME": str(home), "DYNAMEM_RUN_BASE": str(base), "DYNAMEM_CACHE": str(cache_dir())}
    runs = []
    try:
        # The second night also runs a deterministic subset, as its own asv machine.
        icount = tmp / "tiny-icount.toml"
        icount.write_text(TINY_ICOUNT)
        for deterministic in ("", str(icount)):
            args = ("nightly", "--suite", str(suite), "--root", str(root),
                    "--deterministic", deterministic)  # fmt: skip
            runs.append(cli(*args, timeout=1500, env=env))
    finally:
        leftover = qemu_pids_mentioning(str(base))
        shutil.rmtree(base, ignore_errors=True)
    assert leftover == [], f"QEMU processes left behind: {leftover}"
    return root, runs


def graph_files(html: Path, benchmark: str, machine: str) -> list[Path]:
    return [
        p
        for p in html.glob(f"graphs/**/{benchmark}.json")
        if "summary" not in p.parts and f"machine-{machine}" in p.parts
    ]


def test_two_nightlies_give_two_points_per_graph(two_nightlies):
    root, runs = two_nightlies
    for res in runs:
        assert res.returncode == 0, res.stderr[-3000:]
        assert "timeline commit" in res.stdout
    log = subprocess.run(
        ["git", "-C", str(root / "timeline"), "log", "--format=%H", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(log) == 3  # two nightlies, the second with its deterministic subset
    raw_runs = sorted(p.name for p in (root / "raw").iterdir())
    assert len(raw_runs) == 3
    index = json.loads((root / "html" / "index.json").read_text())
    assert sorted(index["revision_to_hash"].values()) == sorted(log)
    machines = {p["machine"] for p in index["graph_param_list"]}
    machine = next(m for m in machines if m.endswith(("-tcg", "-kvm")))
    assert machines == {machine, machine.rsplit("-", 1)[0] + "-tcg-icount"}
    benchmarks = index["benchmarks"]
    shipped = sum(line.lstrip().startswith("def track_") for f in bench_dir().glob("*.py")
                  for line in f.read_text().splitlines())  # fmt: skip
    assert shipped >= 9 and len(benchmarks) == shipped
    for name, bench in benchmarks.items():
        assert bench["unit"] and bench["pretty_name"], name
        files = graph_files(root / "html", name, machine)
        assert len(files) == 1, (name, files)
        points = json.loads(files[0].read_text())
        assert len(points) == 2, (name, points)  # one point per nightly
        for _, values in points:
            # every grid point this suite holds has a value (idle has no stall to measure)
            measured = [v for v in values if v is not None]
            assert measured, (name, values)
    stall = json.loads(
        graph_files(
            root / "html", "resize.ShrinkWorkloadStall.track_shrink_workload_stall", machine
        )[0].read_text()
    )
    params = benchmarks["resize.ShrinkWorkloadStall.track_shrink_workload_stall"]["params"]
    assert params == [["'balloon'", "'virtio-mem/sbm'"], ["'128 MiB'"], ["'idle'", "'impact 256M'"]]
    for _, values in stall:  # (balloon, idle), (balloon, impact), (vmem, idle), (vmem, impact)
        assert values[3] is not None and values[3] >= 9  # impact logs every 10 ms at best
        assert values[:3] == [None, None, None]  # no stall without impact; no balloon-impact
    assert "regressions" in json.loads((root / "html" / "regressions.json").read_text())
    # The deterministic machine: one night, the same parameters, its balloon idle shrink a
    # guest-clock duration, the points its subset lacks n/a.
    icount = machine.rsplit("-", 1)[0] + "-tcg-icount"
    shrink = "resize.ShrinkLatency.track_shrink_latency"
    (points,) = [json.loads(f.read_text()) for f in graph_files(root / "html", shrink, icount)]
    assert len(points) == 1
    values = points[0][1]  # (balloon, idle), (balloon, impact), (vmem, idle), (vmem, impact)
    assert values[0] is not None and 0 < values[0] < 60
    assert values[1:] == [None, None, None]
    accels = [
        json.loads((root / "raw" / r / "run.json").read_text())["metadata"]["accel"]
        for r in raw_runs
    ]
    main_accel = machine.rsplit("-", 1)[1]
    assert sorted(accels) == sorted([main_accel, main_accel, "tcg-icount"])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(two_nightlies):
    """The published HTML over HTTP on 127.0.0.1 (asv's page loads its JSON by XHR)."""
    root, _ = two_nightlies
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root / "html"))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200, url
        return resp.read()


def test_published_page_serves_its_graph_data(served):
    root, url = served
    page = fetch(f"{url}/index.html").decode()
    assert "https://code.jquery.com" not in page and 'src="vendor/jquery-3.3.1.min.js"' in page
    for local in re.findall(r'(?:src|href)="(vendor/[^"]+)"', page):  # works offline
        assert fetch(f"{url}/{local}"), local
    index = json.loads(fetch(f"{url}/index.json"))
    assert "regressions" in json.loads(fetch(f"{url}/regressions.json"))
    machines = {p["machine"] for p in index["graph_param_list"]}
    machine = next(m for m in machines if m.endswith(("-tcg", "-kvm")))  # two nights
    for name in index["benchmarks"]:
        for path in graph_files(root / "html", name, machine):
            rel = path.relative_to(root / "html").as_posix()
            data = json.loads(fetch(f"{url}/{urllib.request.pathname2url(rel)}"))
            assert len(data) == 2 and all(values for _, values in data), name
        assert json.loads(fetch(f"{url}/graphs/summary/{name}.json")), name


def test_graph_page_renders_in_chromium(served, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    root, url = served
    page = f"{url}/#resize.ShrinkLatency.track_shrink_latency"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run(
        [*common, "--dump-dom", page], capture_output=True, text=True, timeout=180
    ).stdout
    assert "Shrink latency" in dom  # the pretty name, in the benchmark tree
    assert "mechanism" in dom and "virtio-mem/sbm" in dom  # the parameter selectors
    assert "<canvas" in dom  # flot drew the graph
    shot = tmp_path / "graph.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1400,1000", page],
        capture_output=True,
        timeout=180,
    )
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
