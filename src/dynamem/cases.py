"""Case studies: several guests share a host memory budget and a controller moves memory.

The "Hotplug or Ballooning" study reached "no absolute winner" through two case studies in
which a runtime moved memory between VMs; this module runs them with each mechanism and
with static memory as the baseline. A case suite (`kind = "cases"`) holds `[[case]]`
tables; each case runs once per arm (a mechanism, or `static`) and repeat, on fresh guests:

1. plan and boot every guest (side by side), bring each to its starting size (unmeasured);
2. start each guest's phase script: for every phase, `dynamem-impact SIZE` under
   `timeout SECONDS` (or a sleep when idle), its progress log kept per phase;
3. every control interval, read each guest's pressure through its sampler (meminfo,
   vmstat, /proc/pressure/memory), ask the policy (dynamem.balance) for moves, and make
   them with `dynamem.resize`: shrinks first, then grows that spend only what is free of
   the budget after the shrinks' real outcomes; every decision is recorded;
4. meanwhile a thread reads each QEMU's resident guest RAM from /proc/PID/smaps, so the
   budget is checked on the host, not assumed;
5. stop the scripts, read the probes' logs, and write the arm's record.
"""

import contextlib
import re
import shlex
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynamem import mechanisms
from dynamem.balance import GuestView, Move, Policy, Pressure, make_policy, parse_pressure
from dynamem.caserecord import CaseArm, CaseGuest, Decision, Phase, load_arms, write_arm
from dynamem.errors import DynamemError, UserError
from dynamem.mechanisms import Mechanism, MemoryPlan
from dynamem.units import MiB, format_size, parse_size

STATIC = "static"
ARMS = (STATIC, *mechanisms.NAMES)
SUITE_KEYS = {"name", "kind", "description", "repeats", "seed", "defaults", "case"}
CASE_KEYS = {
    "name": "case name",
    "title": "what the report calls it",
    "arms": "static and mechanisms to run (default: all four)",
    "budget": "host memory for all guests' RAM",
    "floor": "no guest goes below this",
    "start": "each guest's size when the workloads start (static: budget / guests)",
    "ceiling": "no guest goes above this",
    "interval": "control interval, seconds",
    "tail": "seconds after the last phase before the workloads stop",
    "cpus": "vCPUs per guest",
    "swap": "disk, zram or none",
    "swap_size": "guest swap size",
    "kernel_args": "extra guest kernel arguments",
    "dimm_size": "DIMM size",
    "policy": "controller policy (target-available)",
    "target": "MemAvailable the policy keeps",
    "low": "MemAvailable below which a guest is under pressure",
    "psi_avg10": "memory PSI some avg10 (%) that marks pressure",
    "move_deadline": "seconds one move may take",
    "quantum": "smallest move (moves are multiples of it and of the mechanism's unit)",
    "guests": 'one phase list per guest, e.g. ["700M 40s", "idle 80s"]',
}
_PHASE = re.compile(  # whole seconds, as `timeout` and `sleep` get them in the phase script
    r"^\s*(?:(?P<idle>idle)|(?P<size>\d+(?:\.\d+)?[KMGkmg]?i?B?))\s+(?P<seconds>\d+)\s*s\s*$"
)
DEFAULTS: dict[str, Any] = {
    "arms": list(ARMS),
    "interval": 2.0,
    "tail": 10.0,
    "cpus": 1,
    "swap": "disk",
    "swap_size": "512M",
    "kernel_args": ["psi=1"],  # Debian's kernel has PSI but leaves it off by default
    "dimm_size": "128M",
    "policy": "target-available",
    "target": "256M",
    "low": "128M",
    "psi_avg10": 10.0,
    "move_deadline": 20.0,
    "quantum": "32M",
}
MIN_RAM_MAPPING = 100 * MiB  # smaps: a private anonymous rw mapping this big is guest RAM


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    arms: tuple[str, ...]
    budget: int
    floor: int
    start: int
    ceiling: int
    interval: float
    tail: float
    cpus: int
    swap: str
    swap_size: int
    kernel_args: tuple[str, ...]
    dimm_size: int
    policy: str
    policy_options: tuple[tuple[str, Any], ...]
    move_deadline: float
    quantum: int
    guests: tuple[tuple[tuple[int, float], ...], ...]  # per guest: (size, seconds) phases

    @property
    def static_size(self) -> int:
        """The baseline's fixed size per guest: the budget shared out evenly (in whole
        quanta), so static memory uses the same budget the controller may hand out."""
        return self.budget // len(self.guests) // self.quantum * self.quantum

    @property
    def duration(self) -> float:
        """Seconds from the workloads' start to their stop."""
        return max(sum(s for _, s in g) for g in self.guests) + self.tail

    def make_policy(self) -> Policy:
        return make_policy(self.policy, **dict(self.policy_options))


@dataclass(frozen=True)
class CaseSuite:
    name: str
    description: str
    repeats: int
    seed: int
    cases: tuple[Case, ...]
    source: str

    def arm_ids(self) -> list[str]:
        """Every arm, in run order: per repeat, each case's arms in turn (so a slow drift
        of the host spreads over all arms instead of landing on the last mechanism)."""
        rng = np.random.default_rng(self.seed)
        out = []
        for r in range(1, self.repeats + 1):
            for case in self.cases:
                order = rng.permutation(len(case.arms))
                out += [f"{case.name}-{case.arms[i]}-r{r}" for i in order]
        return out

    def arm(self, arm_id: str) -> tuple[Case, str, int]:
        for case in self.cases:
            for arm in case.arms:
                prefix = f"{case.name}-{arm}-r"
                if arm_id.startswith(prefix) and arm_id[len(prefix) :].isdigit():
                    return case, arm, int(arm_id[len(prefix) :])
        raise UserError(f"no arm {arm_id!r} in case suite {self.name}")


def is_case_text(text: str) -> bool:
    try:
        return tomllib.loads(text).get("kind") == "cases"
    except tomllib.TOMLDecodeError:
        return False


def _phase(text: object, where: str) -> tuple[int, float]:
    if not isinstance(text, str) or not (m := _PHASE.match(text)):
        raise UserError(
            f"{where}: bad phase {text!r} (use 'SIZE Ns' or 'idle Ns' in whole seconds, "
            "e.g. '700M 40s')"
        )
    size = 0 if m.group("idle") else parse_size(m.group("size"), what=f"{where} phase size")
    seconds = float(m.group("seconds"))
    if seconds <= 0:
        raise UserError(f"{where}: phase {text!r} must last more than 0 s")
    return size, seconds


def _size(data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a size like '1G' ({CASE_KEYS[key]})")
    return parse_size(value, what=f"{where} {key}")


def _number(data: dict[str, Any], key: str, where: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UserError(f"{where}: {key} must be a positive number ({CASE_KEYS[key]})")
    return float(value)


def build_case(data: dict[str, Any], where: str) -> Case:
    for key in data:
        if key not in CASE_KEYS:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(CASE_KEYS)})")
    for key in ("name", "budget", "floor", "start", "ceiling", "guests"):
        if key not in data:
            raise UserError(f"{where}: missing required key {key!r} ({CASE_KEYS[key]})")
    from dynamem.scenario import KERNEL_ARG, NAME

    if not isinstance(data["name"], str) or not NAME.match(data["name"]):
        raise UserError(f"{where}: name {data['name']!r} must be 1-64 letters, digits, . _ -")
    where = f"{where} ({data['name']})"
    arms = data["arms"]
    if not isinstance(arms, list) or not arms or any(a not in ARMS for a in arms):
        raise UserError(f"{where}: arms must be a list from {', '.join(ARMS)}, got {arms!r}")
    if len(set(arms)) != len(arms):
        raise UserError(f"{where}: arms {arms!r} names one twice")
    sizes = {
        k: _size(data, k, where)
        for k in (
            "budget",
            "floor",
            "start",
            "ceiling",
            "quantum",
            "swap_size",
            "dimm_size",
            "target",
            "low",
        )
    }
    if not sizes["floor"] <= sizes["start"] <= sizes["ceiling"]:
        raise UserError(f"{where}: needs floor <= start <= ceiling")
    if sizes["floor"] < MIN_RAM_MAPPING:
        raise UserError(
            f"{where}: floor must be at least {format_size(MIN_RAM_MAPPING)} (the host check "
            "finds guest RAM by QEMU's mappings of that size or more)"
        )
    if sizes["low"] >= sizes["target"]:
        raise UserError(f"{where}: low must be below target (else every guest is under pressure)")
    guests = data["guests"]
    if not isinstance(guests, list) or len(guests) < 2:
        raise UserError(f"{where}: guests must list at least two guests' phase lists")
    phases = []
    for i, g in enumerate(guests):
        if not isinstance(g, list) or not g:
            raise UserError(f"{where}: guest {i + 1} must be a non-empty list of phases")
        phases.append(tuple(_phase(p, f"{where} guest {i + 1}") for p in g))
        for size, _ in phases[-1]:
            if size >= sizes["ceiling"]:
                raise UserError(
                    f"{where} guest {i + 1}: a {format_size(size)} working set cannot fit under "
                    f"the ceiling {format_size(sizes['ceiling'])}"
                )
    if len(guests) * sizes["start"] > sizes["budget"]:
        raise UserError(
            f"{where}: {len(guests)} guests starting at {format_size(sizes['start'])} exceed "
            f"the budget {format_size(sizes['budget'])}"
        )
    if len(guests) * sizes["floor"] > sizes["budget"]:
        raise UserError(f"{where}: the guests' floors alone exceed the budget")
    if sizes["budget"] // len(guests) // sizes["quantum"] * sizes["quantum"] > sizes["ceiling"]:
        raise UserError(f"{where}: the static arm's share of the budget exceeds the ceiling")
    if data["swap"] not in ("disk", "zram", "none"):
        raise UserError(f"{where}: swap must be disk, zram or none")
    kargs = data["kernel_args"]
    if not isinstance(kargs, list) or not all(
        isinstance(a, str) and KERNEL_ARG.match(a) for a in kargs
    ):
        raise UserError(f"{where}: kernel_args must be a list of single words")
    cpus = data["cpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise UserError(f"{where}: cpus must be a positive integer")
    if data["policy"] != "target-available":
        raise UserError(
            f"{where}: unknown policy {data['policy']!r} (choose from target-available)"
        )
    case = Case(
        name=data["name"],
        title=str(data.get("title", data["name"])),
        arms=tuple(arms),
        budget=sizes["budget"],
        floor=sizes["floor"],
        start=sizes["start"],
        ceiling=sizes["ceiling"],
        interval=_number(data, "interval", where),
        tail=_number(data, "tail", where),
        cpus=cpus,
        swap=data["swap"],
        swap_size=sizes["swap_size"],
        kernel_args=tuple(kargs),
        dimm_size=sizes["dimm_size"],
        policy=data["policy"],
        policy_options=(
            ("target", sizes["target"]),
            ("low", sizes["low"]),
            ("psi_avg10", _number(data, "psi_avg10", where)),
        ),
        move_deadline=_number(data, "move_deadline", where),
        quantum=sizes["quantum"],
        guests=tuple(phases),
    )
    for arm in case.arms:  # every mechanism must be able to hold the whole range
        if arm != STATIC:
            try:
                plan_memory(case, arm)
            except UserError as exc:
                raise UserError(f"{where}: {arm}: {exc}") from exc
    return case


def load_case_text(text: str, source: str) -> CaseSuite:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc})") from exc
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise UserError(
            f"{source}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(SUITE_KEYS))})"
        )
    defaults, entries = data.get("defaults", {}), data.get("case", [])
    if not isinstance(defaults, dict) or not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: needs [defaults] as a table and at least one [[case]]")
    repeats, seed = data.get("repeats", 1), data.get("seed", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats != 1:
        raise UserError(
            f"{source}: repeats must be 1 (each arm runs once; the report does not pool "
            "repeats of a case study)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{source}: seed must be an integer")
    cases, names = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{source}: case {i + 1} must be a table")
        case = build_case({**DEFAULTS, **defaults, **entry}, f"{source}: case {i + 1}")
        if case.name in names:
            raise UserError(f"{source}: two cases are named {case.name!r}")
        names.add(case.name)
        cases.append(case)
    return CaseSuite(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        repeats=repeats,
        seed=seed,
        cases=tuple(cases),
        source=text,
    )


def plan_memory(case: Case, arm: str) -> tuple[Mechanism, MemoryPlan]:
    """A mechanism bound to a plan that spans floor..ceiling and starts at `start`: the
    balloon boots at the ceiling and inflates down; hotplug boots at the floor and plugs."""
    mech = mechanisms.make(arm, None, dimm_size=case.dimm_size)
    deltas = tuple(d for d in (case.floor - case.start, case.ceiling - case.floor) if d) or (0,)
    boot = case.ceiling if arm == "balloon" else None
    mplan = mech.plan_path(case.start, deltas, boot, None)
    return mech.with_plan(mplan), mplan


def dry_run_lines(suite: CaseSuite) -> list[str]:
    lines = []
    for arm_id in suite.arm_ids():
        case, arm, _ = suite.arm(arm_id)
        sizes = (
            f"{format_size(case.static_size)} each, fixed"
            if arm == STATIC
            else f"{format_size(case.floor)}..{format_size(case.start)}.."
            f"{format_size(case.ceiling)}"
        )
        lines.append(
            f"{arm_id}: {len(case.guests)} guests, budget {format_size(case.budget)}, "
            f"{arm} {sizes}, {case.duration:g} s"
        )
    return lines


# -- the host's view: resident guest RAM of every QEMU -------------------------------------


def guest_ram_rss_kb(smaps: str) -> int:
    """Resident kB of a QEMU's guest RAM: its private anonymous read-write mappings of at
    least MIN_RAM_MAPPING (boot RAM, DIMM backends, virtio-mem's region). QEMU's own heap,
    thread stacks and TCG's executable code buffer are smaller, named or not rw-p."""
    total, take = 0, False
    for line in smaps.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            take = head[1] == "rw-p" and len(head) == 5 and hi - lo >= MIN_RAM_MAPPING
        elif take and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


class RssWatch:
    """Samples every guest's resident RAM (smaps) and VmRSS at a fixed period."""

    def __init__(self, pids: list[int], period_s: float = 0.5) -> None:
        self.pids, self.period = pids, period_s
        self.t_ns: list[int] = []
        self.ram_kb: list[list[int]] = []
        self.vmrss_kb: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="case-rss", daemon=True)

    def __enter__(self) -> "RssWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            ram, rss = [], []
            try:
                for pid in self.pids:
                    ram.append(guest_ram_rss_kb(Path(f"/proc/{pid}/smaps").read_text()))
                    status = Path(f"/proc/{pid}/status").read_text()
                    rss.append(int(status.split("VmRSS:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                ram = []  # a QEMU gone: the arm records why
            if ram:
                self.t_ns.append(time.monotonic_ns())
                self.ram_kb.append(ram)
                self.vmrss_kb.append(rss)
            self._stop.wait(self.period)

    def arrays(self) -> dict[str, np.ndarray]:
        n = len(self.pids)
        return {
            "host_t_ns": np.array(self.t_ns, dtype=np.int64),
            "host_ram_kb": np.array(self.ram_kb, dtype=np.int64).reshape(-1, n),
            "host_vmrss_kb": np.array(self.vmrss_kb, dtype=np.int64).reshape(-1, n),
        }


# -- one arm ---------------------------------------------------------------------------------

PHASE_DIR = "/tmp/dynamem-case"


# the guest's uptime in centiseconds (its fraction has two digits; "1xx - 100" keeps a
# leading zero from reading as octal)
_UPTIME_CS = "$(read u _ </proc/uptime; echo $((${u%.*} * 100 + 1${u#*.} - 100)))"


def phase_script(phases: tuple[tuple[int, float], ...]) -> str:
    """The guest's phase script: each busy phase a probe under `timeout`, started at its
    planned offset from the script's start (so a phase that ends early, e.g. OOM-killed,
    does not pull the later ones forward), its start, exit status and progress log kept."""
    status = f"{PHASE_DIR}/status"
    parts = [f"mkdir -p {PHASE_DIR}", f"t0={_UPTIME_CS}"]
    offset = 0
    for k, (size, seconds) in enumerate(phases):
        if size:
            parts += [
                f"w=$((t0 + {offset * 100} - {_UPTIME_CS}))",
                '[ "$w" -gt 0 ] && sleep "$((w / 100)).$((w % 100 / 10))$((w % 10))"',
                f"echo start {k} {_UPTIME_CS} >>{status}",
                f"timeout {seconds:g} dynamem-impact {size} {PHASE_DIR}/p{k}.log "
                f">{PHASE_DIR}/p{k}.out 2>&1; echo {k} $? >>{status}",
            ]
        offset += int(seconds)
    parts.append(f"echo done >>{status}")
    return "; ".join(parts)


def phase_outcome(size: int, exit_code: int | None, ready: bool) -> str:
    """What became of a phase: `timeout` ends a probe that ran its whole phase (coreutils
    exits 124, busybox 143 = SIGTERM); SIGKILL (137) is the OOM killer's."""
    if not size:
        return "idle"
    if exit_code in (124, 143) and ready:
        return "completed"
    if exit_code == 137:
        return "killed"
    return "failed"


@dataclass
class _Guest:
    name: str
    vm: Any
    mech: Mechanism | None
    mplan: MemoryPlan | None
    record: CaseGuest
    looks: list[Pressure]
    sizes: list[int]
    pressured: list[int]
    received_at: int = -(10**9)
    gave_at: int = -(10**9)
    script_pid: int = 0
    # the target of this guest's last grow if it did not finish: its request stands in
    # QEMU (virtio-mem's requested-size, the balloon's target), so the guest may still get
    # there; the budget counts it until the next request on this guest replaces it
    pending: int | None = None

    def size(self) -> int:
        if self.mech is None:
            return self.record.start
        # host_bytes_at maps a guest size to what QEMU reports: invert it at 0
        return self.mech.host_bytes(self.vm) - self.mech.host_bytes_at(0)

    def committed(self) -> int:
        """What the budget must count for this guest: its size, or an unfinished grow's
        target if that is larger."""
        return max(self.size(), self.pending or 0)


def _look(g: _Guest) -> Pressure:
    files = ["/proc/meminfo", "/proc/vmstat", "/proc/pressure/memory"]
    snap = g.vm.sampler.snapshot(files)
    return parse_pressure(time.monotonic_ns(), *(snap[f] for f in files))


def _execute(g: _Guest, move: Move, decision: Decision, case: Case) -> None:
    from dynamem.resize import resize

    assert g.mech is not None
    r = resize(
        g.vm,
        g.mech,
        move.delta,
        deadline_s=case.move_deadline,
        stall_s=min(g.mech.no_progress_s, case.move_deadline / 2),
    )
    decision.outcome = r.outcome
    decision.done = int(r.host_done_bytes or 0)
    decision.message = r.message
    decision.t_request_ns = r.t_request_ns
    decision.host_latency_s = r.host_latency_s
    decision.guest_latency_s = r.guest_latency_s
    if r.t_request_ns is not None and r.guest_latency_s is not None:
        decision.t_visible_ns = r.t_request_ns + int(r.guest_latency_s * 1e9)


def move_unit(mech: Mechanism, case: Case) -> int:
    """Moves are multiples of this: the case's quantum rounded up to the mechanism's unit
    (a DIMM's size; virtio-mem's block; the balloon's page)."""
    unit = mech.granularity if mech.name != "dimm" else case.dimm_size
    return -(-case.quantum // unit) * unit


def control_round(
    guests: list[_Guest], policy: Policy, case: Case, round_: int, decisions: list[Decision]
) -> None:
    """Look at every guest, decide, make the moves (shrinks, then grows within the budget)."""
    views = []
    for g in guests:
        look, size = _look(g), g.committed()
        before = g.looks[-1] if g.looks else None
        g.looks.append(look)  # with its size, only once both were read
        g.sizes.append(size)
        view = GuestView(
            g.name, size, g.record.floor, g.record.ceiling, look, before, g.received_at, g.gave_at
        )
        g.pressured.append(1 if policy.pressured(view) else 0)
        views.append(view)
    if guests[0].mech is None:
        return  # static memory: looked at, never moved
    unit = move_unit(guests[0].mech, case)
    moves = policy.decide(views, case.budget, unit, round_)
    by_name = {g.name: g for g in guests}
    now = time.monotonic_ns()
    for move in sorted(moves, key=lambda m: m.kind != "shrink"):
        g = by_name[move.guest]
        d = Decision(
            round=round_,
            t_ns=now,
            guest=move.guest,
            kind=move.kind,
            requested=move.size,
            reason=move.reason,
        )
        decisions.append(d)
        if move.kind == "none":
            continue
        if move.kind == "grow":
            free = case.budget - sum(x.committed() for x in guests)
            size = min(move.size, free // unit * unit)
            if size <= 0:
                d.message = (
                    f"not run: only {format_size(max(free, 0))} of the budget free "
                    "(a shrink fell short)"
                )
                continue
            if size < move.size:
                d.message = f"cut to {format_size(size)}: a shrink fell short"
                move = Move(move.guest, "grow", size, move.reason)
        start = g.size()
        _execute(g, move, d, case)
        g.pending = start + move.delta if move.kind == "grow" and d.outcome != "ok" else None
        if g.pending is not None:
            d.message = (d.message + "; " if d.message else "") + (
                f"its request stands: {format_size(g.pending)} counted against the budget"
            )
        if d.done:
            if move.kind == "grow":
                g.received_at = round_
            else:
                g.gave_at = round_


def _collect_phases(g: _Guest, phases: tuple[tuple[int, float], ...]) -> dict[str, np.ndarray]:
    """Each phase's outcome into the record; its probe log into the series."""
    status = g.vm.run(["cat", f"{PHASE_DIR}/status"], timeout=30, check=False).stdout
    codes, starts = {}, {}
    for line in status.splitlines():
        words = line.split()
        if len(words) == 2 and words[0].isdigit() and words[1].lstrip("-").isdigit():
            codes[int(words[0])] = int(words[1])
        elif len(words) == 3 and words[0] == "start" and words[1].isdigit() and words[2].isdigit():
            starts[int(words[1])] = int(words[2]) * 10_000_000  # guest ns (uptime)
    series: dict[str, np.ndarray] = {}
    for k, p in enumerate(g.record.phases):
        if not p.size:
            continue
        out = g.vm.run(["cat", f"{PHASE_DIR}/p{k}.out"], timeout=30, check=False).stdout
        text = g.vm.run(["cat", f"{PHASE_DIR}/p{k}.log"], timeout=120, check=False).stdout
        rows = [ln.split() for ln in text.splitlines() if len(ln.split()) == 2]
        data = np.array(rows, dtype=np.int64).reshape(-1, 2)
        series[f"{g.name}_p{k}_guest_ns"], series[f"{g.name}_p{k}_pages"] = data[:, 0], data[:, 1]
        p.ready = "ready" in out
        p.pages = int(data[-1, 1]) if len(data) else 0
        p.exit_code = codes.get(k)
        p.outcome = phase_outcome(p.size, p.exit_code, p.ready)
        if k in starts:  # on the host's clock, from this guest's workload start
            host_ns = starts[k] + g.record.guest_offset_ns
            p.started_s = (host_ns - g.record.workload_start_ns) / 1e9
    return series


def _guest_offset_ns(vm: Any) -> int:
    """host = guest + offset, from a ping's midpoint (a static arm's sampler sent no looks
    to take it from)."""
    sent = time.monotonic_ns()
    pong = vm.sampler.barrier()
    return int((sent + time.monotonic_ns()) // 2 - pong.guest_ns)


def run_arm(
    suite: CaseSuite,
    arm_id: str,
    *,
    accel_request: str | None,
    qemu: str,
    guest: str,
    accel: str,
    report: Any = print,
) -> tuple[CaseArm, dict[str, np.ndarray]]:
    """One arm on fresh guests; failures are recorded with the phase they happened in."""
    from dynamem.cell import guest_condition_label, plan_for, prepare
    from dynamem.launch import plan_vm
    from dynamem.qemu.config import default_cpu
    from dynamem.qemu.machine import VM

    case, arm, repeat = suite.arm(arm_id)
    policy = case.make_policy()
    t_start = time.monotonic()
    record = CaseArm(
        arm=arm_id,
        case=case.name,
        title=case.title,
        mechanism=arm,
        repeat=repeat,
        budget=case.budget,
        interval_s=case.interval,
        accel=accel,
        cpu_model=default_cpu(accel),
        cpus=case.cpus,
        swap=case.swap,
        swap_size=case.swap_size if case.swap != "none" else 0,
        kernel_args=list(case.kernel_args),
        guest_image=guest_condition_label(guest),
        policy=policy.describe(),
        move_deadline_s=case.move_deadline,
    )
    series: dict[str, np.ndarray] = {}
    guests: list[_Guest] = []
    phase = "plan"
    try:
        with contextlib.ExitStack() as stack:
            for i, phases in enumerate(case.guests):
                name = f"g{i + 1}"
                options = dict(
                    guest=guest,
                    cpus=case.cpus,
                    accel_request=accel_request,
                    qemu=qemu,
                    kernel_args=case.kernel_args,
                    swap=case.swap,
                    swap_size=case.swap_size,
                )
                mech = mplan = None
                if arm == STATIC:
                    plan = plan_vm(memory=case.static_size, **options)  # type: ignore[arg-type]
                else:
                    mech, mplan = plan_memory(case, arm)
                    plan = plan_for(mech, mplan, **options)
                    record.mechanism_config = _mechanism_config(mech, mplan)
                at, cg_phases = 0.0, []
                for size, seconds in phases:
                    outcome = "unknown" if size else "idle"
                    cg_phases.append(Phase(size=size, seconds=seconds, start_s=at, outcome=outcome))
                    at += seconds
                cg = CaseGuest(
                    name=name,
                    floor=case.floor,
                    start=case.static_size if arm == STATIC else case.start,
                    ceiling=case.ceiling,
                    boot_memory=plan.config.memory,
                    phases=cg_phases,
                    kernel_cmdline=plan.config.cmdline,
                )
                vm = stack.enter_context(VM(plan.config))
                guests.append(_Guest(name, vm, mech, mplan, cg, [], [], []))
            phase = "boot"
            _boot_all(guests)
            record.qemu_version = ".".join(map(str, plan.qemu_version))
            record.guest_kernel = guests[0].vm.kernel_release or ""
            record.cpu_model = guests[0].vm.config.cpu_model
            record.guests = [g.record for g in guests]
            phase = "preparation"
            for g in guests:
                if g.mech is not None and g.mplan is not None:
                    prepare(g.vm, g.mech, g.mplan, warmup=False)
            report(f"  {arm_id}: {len(guests)} guests ready, workloads for {case.duration:g} s")
            phase = "workloads"
            base = [_look(g) for g in guests]
            watch = RssWatch([g.vm.pid for g in guests])
            failure: Exception | None = None
            try:
                with watch:
                    _control(guests, policy, case, record)
            except Exception as exc:  # noqa: BLE001 - raised again once the guests are read
                failure, phase = exc, f"control round {len(guests[0].looks)}"
            finally:  # the host's samples up to a failure are measurements too
                series.update(watch.arrays())
            record.duration_s = (time.monotonic_ns() - record.t0_ns) / 1e9 if record.t0_ns else 0.0
            for g, phases, b in zip(guests, case.guests, base, strict=True):
                try:  # what each guest still holds, read before any guest is stopped
                    series.update(_stop_and_collect(g, phases, b))
                except Exception as exc:  # noqa: BLE001 - one guest's loss is not the others'
                    if failure is None:
                        failure, phase = exc, f"workload stop ({g.name})"
                series.update(_guest_series(g))
            if failure is not None:
                raise failure
            record.status = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded outcome
        message = str(exc) if isinstance(exc, DynamemError) else f"{type(exc).__name__}: {exc}"
        why = [f"{g.name}: {g.vm.diagnosis}" for g in guests if g.vm.diagnosis]  # e.g. a panic
        record.failed_at, record.error = phase, f"{phase}: {message}"
        if why and not any(w.split(": ", 1)[1] in message for w in why):
            record.error += f" ({'; '.join(why)})"
        record.guests = [g.record for g in guests]
        for g in guests:
            if g.looks:
                series.update(_guest_series(g))
    record.wall_s = time.monotonic() - t_start
    return record, series


def _control(guests: list[_Guest], policy: Policy, case: Case, record: CaseArm) -> None:
    """Start every guest's phase script, then a control round every interval until the
    case's duration has passed (a round that moves memory lasts as long as its moves)."""
    for g, phases in zip(guests, case.guests, strict=True):
        script = shlex.quote(phase_script(phases))
        line = f"sh -c {script} </dev/null >/dev/null 2>&1 & echo $!"
        g.script_pid = int(g.vm.run(["sh", "-c", line], timeout=30).stdout.split()[-1])
        g.record.workload_start_ns = time.monotonic_ns()
    record.t0_ns = guests[0].record.workload_start_ns
    end = time.monotonic() + case.duration
    round_ = 0
    while time.monotonic() < end:
        tick = time.monotonic()
        control_round(guests, policy, case, round_, record.decisions)
        for g in guests:
            g.vm.check_health()
        round_ += 1
        time.sleep(max(0.0, tick + case.interval - time.monotonic()))


def _stop_and_collect(
    g: _Guest, phases: tuple[tuple[int, float], ...], base: Pressure
) -> dict[str, np.ndarray]:
    if g.script_pid:
        stop = f"kill {g.script_pid}; killall timeout dynamem-impact; true"
        g.vm.run(["sh", "-c", stop], timeout=30, check=False)
    g.record.guest_offset_ns = _guest_offset_ns(g.vm)
    series = _collect_phases(g, phases)
    _finish_guest(g, base)
    return series


def _mechanism_config(mech: Mechanism, mplan: MemoryPlan) -> Any:
    from dynamem.record import MechanismConfig

    return MechanismConfig(
        name=mech.name,
        variant=mech.variant,
        dimm_size=getattr(mech, "dimm_size", None) if mech.name == "dimm" else None,
        block_size=mech.granularity if mech.name == "virtio-mem" else None,
        boot_memory=mplan.boot,
        maxmem=None,
        no_progress_s=mech.no_progress_s,
    )


def _boot_all(guests: list[_Guest]) -> None:
    """Boot side by side (a serial boot would triple the arm's set-up time). Each QEMU is
    launched from this thread: it dies with the thread that started it."""
    errors: list[BaseException] = []
    for g in guests:
        g.vm.launch()

    def boot(g: _Guest) -> None:
        try:
            g.vm.await_ready()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in this thread
            errors.append(exc)
        g.record.boot_s = time.monotonic() - g.vm.timings["t0"]

    # daemon: a Ctrl-C here stops the QEMUs (the caller's ExitStack) and must not wait
    # for these threads' boot deadlines before the process can exit
    threads = [threading.Thread(target=boot, args=(g,), daemon=True) for g in guests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _finish_guest(g: _Guest, base: Pressure) -> None:
    end = _look(g)
    r = g.record
    r.oom_kills = end.oom_kill - base.oom_kill
    r.swap_in_pages = end.pswpin - base.pswpin
    r.swap_out_pages = end.pswpout - base.pswpout
    r.major_faults = end.pgmajfault - base.pgmajfault
    r.psi_some_s = (end.psi_some_us - base.psi_some_us) / 1e6 if end.psi_some_us >= 0 else None
    r.end_size = g.size()


def _guest_series(g: _Guest) -> dict[str, np.ndarray]:
    looks = g.looks
    cols = {
        "t_ns": [p.t_ns for p in looks],
        "mem_total_kb": [p.mem_total_kb for p in looks],
        "mem_available_kb": [p.mem_available_kb for p in looks],
        "pswpin": [p.pswpin for p in looks],
        "pswpout": [p.pswpout for p in looks],
        "pgmajfault": [p.pgmajfault for p in looks],
        "oom_kill": [p.oom_kill for p in looks],
        "psi_some_us": [p.psi_some_us for p in looks],
        "size": g.sizes[: len(looks)],
        "pressured": g.pressured[: len(looks)],
    }
    out = {f"{g.name}_{k}": np.array(v, dtype=np.int64) for k, v in cols.items()}
    out[f"{g.name}_psi_avg10"] = np.array([p.psi_some_avg10 for p in looks], dtype=np.float64)
    return out


# -- a run of a case suite --------------------------------------------------------------------


def start_run(
    suite: CaseSuite, *, accel_request: str | None, qemu: str, guest: str, out: Path | None = None
) -> Any:
    """The run directory: run.json (its order is the arms) and an empty cases/."""
    import datetime

    from dynamem.launch import is_cloud_guest
    from dynamem.paths import results_dir
    from dynamem.record import RunRecord, SuiteSource
    from dynamem.runner import run_metadata
    from dynamem.store import RunStore

    if is_cloud_guest(guest):
        raise UserError(
            f"--guest {guest}: case studies boot several guests per arm and run on the embedded "
            "guest only (a cloud image's boot alone takes about 107 s under TCG here)"
        )
    metadata = run_metadata(
        accel_request, qemu, guest, {a for c in suite.cases for a in c.arms if a != STATIC}
    )
    stamp = datetime.datetime.now(datetime.UTC)
    run = RunRecord(
        run_id=f"{stamp:%Y%m%d-%H%M%S}-{suite.name}",
        created=stamp.isoformat(timespec="seconds"),
        suite=SuiteSource(name=suite.name, toml=suite.source),
        seed=suite.seed,
        order=suite.arm_ids(),
        metadata=metadata,
    )
    return RunStore.create(out or results_dir() / "raw" / run.run_id, run)


def is_case_run(store: Any) -> bool:
    return is_case_text(store.run.suite.toml)


def run_cases(
    store: Any, *, accel_request: str | None, qemu: str, guest: str, report: Any = print
) -> list[CaseArm]:
    """Every arm of the run not yet recorded; returns all arm records."""
    run = store.run
    if accel_request not in (None, "auto", run.metadata.accel):
        raise UserError(
            f"run {run.run_id} was recorded under {run.metadata.accel}; not {accel_request}"
        )
    suite = load_case_text(run.suite.toml, f"run {run.run_id}")
    done = {a.arm for a in load_arms(store.directory)[0]}
    for i, arm_id in enumerate(run.order):
        if arm_id in done:
            continue
        report(f"[{i + 1}/{len(run.order)}] {arm_id}")
        record, series = run_arm(
            suite,
            arm_id,
            accel_request=run.metadata.accel,
            qemu=qemu,
            guest=guest,
            accel=run.metadata.accel,
            report=report,
        )
        write_arm(store.directory, record, series)
        moved = sum(d.done for d in record.decisions if d.kind == "grow" and d.done > 0)
        report(
            f"  {arm_id}: {record.status}{' (' + record.error + ')' if record.error else ''}; "
            f"{len(record.decisions)} decisions, {format_size(moved)} moved to guests, "
            f"{record.wall_s:.0f} s"
        )
    return load_arms(store.directory)[0]
