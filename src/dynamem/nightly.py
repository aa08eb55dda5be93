"""`dynamem nightly`: what the nightly CI job does — run the suite, record it, publish.

asv files a track value under a commit of the benchmarked repository, so two nightlies on
one dynamem commit would overwrite each other (and what changes from night to night is
mostly QEMU, the guest kernel and the host, not dynamem). So asv does not benchmark
dynamem's history: its `repo` is a *timeline*, a local git repository
(`results/timeline/`) in which every nightly commits one `manifest.json` — run id, QEMU
version, accelerator, host kernel and CPU, guest kernel and image, dynamem version and
commit. The nightly then runs `asv run --set-commit-hash <that commit>`, so each nightly is
its own commit and its own point on every graph, dated when its run started; asv's
regression detection walks the timeline's `main` branch like any history.

Steps: (1) run the suite through the runner into `results/raw/<run-id>/` (the raw store
stays the truth; `--raw DIR` records a finished run instead), (2) commit its manifest to
the timeline, (3) write this host's asv machine entry (CPU model, cores, RAM, accelerator
in the machine name, so TCG and KVM numbers never share a graph), (4) `asv run` with
DYNAMEM_ASV_RAW pointing at the run, so asv reads it instead of booting the suite again,
(5) `asv publish` into `results/html/`.
"""

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamem.errors import UserError
from dynamem.paths import bench_dir, cache_dir, results_dir
from dynamem.record import CellRecord, RunRecord
from dynamem.scenario import load_suite_text

CONFIG_NAME = "asv.conf.json"
AUTHOR = ["-c", "user.name=dynamem nightly", "-c", "user.email=nightly@dynamem.invalid"]
# What asv.conf.json holds besides the paths (kept here so an installed dynamem needs no
# checkout); the checkout's asv.conf.json is the same for `asv` run by hand there.
ASV_CONFIG: dict[str, Any] = {
    "version": 1,
    "project": "dynamem",
    "project_url": "https://example.invalid/dynamem",
    "branches": ["main"],
    "environment_type": "existing",
    "show_commit_url": "#",
    "hash_length": 8,
}


def default_root() -> Path:
    return results_dir()


@dataclass(frozen=True)
class Layout:
    """Where a nightly writes: raw runs, the timeline, asv results, the HTML."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def timeline(self) -> Path:
        return self.root / "timeline"

    @property
    def results(self) -> Path:
        return self.root / "asv"

    @property
    def html(self) -> Path:
        return self.root / "html"

    def prepare(self) -> None:
        """Create the root and what dynamem owns in it; one line if that is impossible."""
        try:
            for d in (self.root, self.raw, self.results, self.html):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use {self.root} as the nightly's results root: {exc}") from exc

    def config(self, thresholds: dict[str, float] | None = None) -> Path:
        """asv's configuration for this root (absolute paths), with the regression
        thresholds measured for this night; written into the root, never into the
        checkout."""
        conf = dict(ASV_CONFIG)
        conf.update(
            repo=str(self.timeline.resolve()),
            benchmark_dir=str(bench_dir().resolve()),
            results_dir=str(self.results.resolve()),
            html_dir=str(self.html.resolve()),
        )
        if thresholds:
            conf["regressions_thresholds"] = thresholds
        path = self.root / CONFIG_NAME
        try:
            path.write_text(json.dumps(conf, indent=4) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc}") from exc
        return path


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        ["git", *AUTHOR, "-C", str(repo), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if res.returncode != 0:
        raise UserError(f"git {args[0]} in {repo} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def manifest_of(run: RunRecord, cells: list[CellRecord], raw: Path) -> dict[str, Any]:
    """What a timeline commit says of its run; resize outcomes from the metric table."""
    from dynamem.analysis.metrics import outcome_counts, tidy

    counts = outcome_counts(tidy(cells, run.run_id))
    meta = run.metadata
    return {
        "run_id": run.run_id,
        "created": run.created,
        "suite": run.suite.name,
        "raw_run": str(raw),
        "cells": len(run.order),
        "cells_finished": len(cells),
        "cells_failed": sorted(c.cell for c in cells if not c.ok),
        "resizes_not_ok": [
            f"{r.scenario} step {r.step_index} ({r.step}): {r.ok}/{r.n} ok"
            for r in counts.itertuples(index=False)
            if r.ok < r.n
        ],
        "qemu_version": meta.qemu_version,
        "accel": meta.accel,
        "accel_reason": meta.accel_reason,
        "host_kernel": meta.host_kernel,
        "host_cpu": meta.host_cpu,
        "host_cpus": meta.host_cpus,
        "guest_kernel": meta.guest_kernel,
        "guest_image": meta.guest_image,
        "dynamem_version": meta.dynamem_version,
        "dynamem_commit": meta.git_commit,
    }


def recorded_runs(timeline: Path) -> list[str]:
    if not (timeline / ".git").exists() or not _git(timeline, "branch", "--list", "main"):
        return []
    log = _git(timeline, "log", "--format=%(trailers:key=Run-Id,valueonly)", "main")
    return [line.strip() for line in log.splitlines() if line.strip()]


def commit_manifest(timeline: Path, manifest: dict[str, Any]) -> str:
    """One commit on the timeline's `main`, dated when the run started; returns its hash."""
    if not (timeline / ".git").exists():
        timeline.mkdir(parents=True, exist_ok=True)
        _git(timeline, "init", "-q", "-b", "main")
    if manifest["run_id"] in recorded_runs(timeline):
        raise UserError(f"run {manifest['run_id']} is already on the timeline in {timeline}")
    (timeline / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _git(timeline, "add", "manifest.json")
    title = (
        f"nightly {manifest['run_id']}: QEMU {manifest['qemu_version']} ({manifest['accel']}), "
        f"guest {manifest['guest_kernel']}, host {manifest['host_kernel']}, "
        f"dynamem {manifest['dynamem_commit'][:12]}"
    )
    date = manifest["created"]
    _git(
        timeline,
        "commit",
        "-q",
        "-m",
        title,
        "-m",
        f"Run-Id: {manifest['run_id']}",
        env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date},
    )
    return _git(timeline, "rev-parse", "HEAD")


def _ram() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_entry(accel: str) -> dict[str, str]:
    from dynamem.cell import host_cpu_model as cpu_model

    return {
        "machine": f"{platform.node() or 'host'}-{accel}",
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "num_cpu": str(os.cpu_count() or 1),
        "ram": _ram(),
    }


def serial_fingerprint(manifest: dict[str, Any]) -> str:
    """The fingerprint a serial run's cells on this host have (all of its CPUs)."""
    from dynamem.cell import host_cpu_model
    from dynamem.placement import available_cpus, fingerprint

    return fingerprint(host_cpu_model(), platform.release(), manifest["accel"],
                       manifest["qemu_version"], len(available_cpus()))  # fmt: skip


def write_machine(entry: dict[str, str], path: Path | None = None) -> None:
    """asv's machine file (~/.asv-machine.json), without asv's interactive questions."""
    path = path or Path.home() / ".asv-machine.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise UserError(f"{path} is corrupt: {exc}") from exc
    data[entry["machine"]] = entry
    data["version"] = 1
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")


def asv(*args: str, config: Path, env: dict[str, str] | None = None) -> int:
    """`asv ARGS --config CONFIG` with this Python; output goes to ours (the CI log)."""
    src = str(Path(__file__).resolve().parents[1])  # what imports dynamem in asv's workers
    pythonpath = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "ASV_PYTHONPATH": pythonpath, "PYTHONPATH": pythonpath}
    sys.stdout.flush()
    return subprocess.run(
        [sys.executable, "-m", "asv", *args, "--config", str(config)],
        env={**full_env, **(env or {})},
    ).returncode


# asv 0.6's index.html loads these from CDNs, which a runner without internet (or a reader
# of the artifact offline) cannot reach. They are fetched once from the npm registry with
# `npm pack` (pinned versions, checked against the registry's integrity hashes by npm) into
# the cache, and copied beside the page: nothing third-party is kept in this repository.
# URL -> (local name, npm package@version, path inside the package).
VENDOR: dict[str, tuple[str, str, str]] = {
    "https://code.jquery.com/jquery-3.3.1.min.js": (
        "jquery-3.3.1.min.js", "jquery@3.3.1", "dist/jquery.min.js"
    ),
    **{
        f"https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/{name}.min.js": (
            f"{name}.js", "flot@0.8.3", f"{name}.js"
        )
        for name in (
            "jquery.flot", "jquery.flot.time", "jquery.flot.selection", "jquery.flot.categories"
        )
    },
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": (
        "jquery.flot.orderBars.js", "flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"
    ),
    # stupidtable 1.0.1 is not on npm; 1.1.3 keeps its API.
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": (
        "stupidtable.min.js", "stupid-table-plugin@1.1.3", "stupidtable.min.js"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": (
        "md5.min.js", "blueimp-md5@2.19.0", "js/md5.min.js"
    ),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": (
        "bootstrap.min.js", "bootstrap@3.1.1", "dist/js/bootstrap.min.js"
    ),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": (
        "bootstrap.min.css", "bootstrap@3.1.1", "dist/css/bootstrap.min.css"
    ),
}  # fmt: skip


def vendor_dir() -> Path:
    return cache_dir() / "asv-www"


def fetch_vendor(dest: Path) -> list[str]:
    """Fill `dest` with VENDOR's files via `npm pack`; returns what could not be fetched."""
    wanted = {name: (pkg, member) for name, pkg, member in VENDOR.values()}
    missing = [n for n in wanted if not (dest / n).is_file()]
    npm = shutil.which("npm")
    if not missing or npm is None:
        return missing
    dest.mkdir(parents=True, exist_ok=True)
    packages = sorted({wanted[n][0] for n in missing})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = subprocess.run(
                [npm, "pack", "--silent", *packages], cwd=tmp, capture_output=True, text=True,
                timeout=300,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return missing
        if res.returncode != 0:
            return missing
        for name in missing:
            pkg, member = wanted[name]
            tgz = Path(tmp) / (pkg.replace("@", "-", 1).replace("/", "-") + ".tgz")
            try:
                with tarfile.open(tgz) as tar:
                    f = tar.extractfile(f"package/{member}")
                    data = f.read() if f is not None else b""
            except (OSError, KeyError, tarfile.TarError):
                continue
            if data:
                tmp_file = dest / f".{name}.tmp"
                tmp_file.write_bytes(data)
                tmp_file.replace(dest / name)
    return [n for n in wanted if not (dest / n).is_file()]


_REMOTE_TAG = re.compile(r'<(?:script|link)\b[^>]*?\b(?:src|href)="(https?://[^"]+)"[^>]*>')
_SRI = re.compile(r'\s+integrity="(sha256|sha384|sha512)-([^"]+)"')


def localize(html: Path, www: Path | None = None) -> list[str]:
    """Point the published index.html at local copies of its CDN scripts, so the page
    works offline; returns the URLs left on their CDN. A matching SRI hash is kept."""
    if www is None:
        www = vendor_dir()
        fetch_vendor(www)
    index = html / "index.html"
    (html / "vendor").mkdir(exist_ok=True)
    left: list[str] = []

    def local(match: re.Match[str]) -> str:
        tag, url = match.group(0), match.group(1)
        name = VENDOR[url][0] if url in VENDOR else None
        if name is None or not (www / name).is_file():
            left.append(url)
            return tag
        data = (www / name).read_bytes()
        (html / "vendor" / name).write_bytes(data)
        tag = tag.replace(url, f"vendor/{name}")
        sri = _SRI.search(tag)
        if sri:
            digest = base64.b64encode(hashlib.new(sri.group(1), data).digest()).decode()
            if digest != sri.group(2):
                tag = tag.replace(sri.group(0), "")
        return tag

    index.write_text(_REMOTE_TAG.sub(local, index.read_text()))
    return left


def check_tools() -> None:
    if shutil.which("git") is None:
        raise UserError("nightly needs git (apt-get install git)")
    import importlib.util

    if importlib.util.find_spec("asv") is None:
        raise UserError("nightly needs asv (pip install asv)")


@dataclass
class Nightly:
    run_id: str
    raw: Path
    commit: str
    machine: str
    cells_failed: list[str]
    resizes_not_ok: list[str]
    asv_run_status: int
    publish_status: int
    html: Path

    @property
    def ok(self) -> bool:
        return not self.cells_failed and self.asv_run_status == 0 and self.publish_status == 0


def record(raw: Path, layout: Layout, frame: str | None = None) -> Nightly:
    """Steps 2-5 for a finished raw run: timeline commit, machine, asv run, asv publish.

    `frame`: the main suite when `raw` is a subset of it run as another machine (the
    deterministic subset), so both machines' benchmarks have the same parameters."""
    from dynamem.analysis import tracks
    from dynamem.store import RunStore

    store = RunStore.open(raw)
    cells, problems = store.load_cells()
    if problems or store.completed() != set(store.run.order):
        raise UserError(
            f"{raw} is not a complete run ({len(store.completed())} of "
            f"{len(store.run.order)} cells; finish it with `dynamem run --resume {raw}`)"
        )
    layout.prepare()
    manifest = manifest_of(store.run, cells, raw.resolve())
    commit = commit_manifest(layout.timeline, manifest)
    print(f"timeline commit {commit[:12]} for run {manifest['run_id']}", file=sys.stderr)
    from dynamem.analysis.metrics import host_fingerprint

    # One asv machine per host fingerprint: a run spread over unlike hosts never puts their
    # numbers on one graph. A run on one host keeps the machine name it always had.
    fingerprints = sorted({host_fingerprint(c) for c in cells}) or [""]
    grid = tracks.framed(
        tracks.grid_of(load_suite_text(store.run.suite.toml, f"run {store.run.run_id}")), frame
    )
    plans = []  # (machine entry, env, that machine's regression thresholds)
    for fp in fingerprints:
        entry = machine_entry(manifest["accel"])
        env = {"DYNAMEM_ASV_RAW": str(raw.resolve())}
        if frame:
            env[tracks.ENV_FRAME] = frame
        # A serial run on this host keeps the machine name nightlies always had; any other
        # fingerprint (another host, cells pinned to fewer CPUs) is a machine of its own.
        if fp not in ("", serial_fingerprint(manifest)):
            digest = hashlib.sha256(fp.encode()).hexdigest()[:8]
            entry.update(machine=f"{entry['machine']}-{digest}", cpu=fp)
        if len(fingerprints) > 1:
            env[tracks.ENV_HOST] = fp
        cache = tracks.cache_of(raw, env.get(tracks.ENV_HOST))
        history = tracks.history(layout.results, entry["machine"], grid)
        plans.append((entry, env, tracks.thresholds(cache, history)))
    # asv reads one config: each benchmark's threshold is the widest any machine needs
    merged: dict[str, float] = {}
    for _, _, found in plans:
        for key, value in found.items():
            merged[key] = max(value, merged.get(key, value))
    config = layout.config(merged)
    machines, statuses = [], []
    for entry, env, _ in plans:
        write_machine(entry)
        statuses.append(
            asv(
                "run",
                "--set-commit-hash",
                commit,
                "-E",
                f"existing:{sys.executable}",
                "--machine",
                entry["machine"],
                "--show-stderr",
                config=config,
                env=env,
            )  # fmt: skip
        )
        machines.append(entry["machine"])
    publish_status = asv("publish", config=config)
    if publish_status == 0:
        for url in localize(layout.html):
            print(f"warning: the page still loads {url} from its CDN", file=sys.stderr)
    return Nightly(
        run_id=manifest["run_id"],
        raw=raw,
        commit=commit,
        machine=", ".join(machines),
        cells_failed=manifest["cells_failed"],
        resizes_not_ok=manifest["resizes_not_ok"],
        asv_run_status=max(statuses, key=abs),
        publish_status=publish_status,
        html=layout.html,
    )


def run_suite(
    suite_name: str, repeats: int | None, layout: Layout, *, accel: str, qemu: str, guest: str
) -> Path:
    """Step 1: the suite through dynamem's runner into `<root>/raw/<run-id>/`."""
    from dynamem import runner
    from dynamem.scenario import load_suite, with_repeats

    suite = load_suite(suite_name)
    if repeats:
        suite = with_repeats(suite, repeats)
    layout.prepare()
    store = runner.start_run(
        suite, suite.seed, accel_request=accel, qemu=qemu, guest=guest, raw_dir=layout.raw
    )
    run = store.run
    print(
        f"nightly run {run.run_id}: {len(run.order)} cells -> {store.directory} "
        f"({run.metadata.accel})",
        file=sys.stderr,
    )
    try:
        runner.run_suite(
            store, accel_request=accel, qemu=qemu, guest=guest,
            report=lambda m: print(m, file=sys.stderr),
        )  # fmt: skip
    except KeyboardInterrupt:
        print(
            f"\ndynamem: interrupted; finish with `dynamem run --resume {store.directory}`, "
            f"then record it with `dynamem nightly --raw {store.directory}`",
            file=sys.stderr,
        )
        raise
    return store.directory
