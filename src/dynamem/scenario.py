"""Scenarios and suites as data (TOML), validated in full before anything starts.

A suite file holds `name`, `description`, `repeats`, `seed`, a `[defaults]` table and
`[[scenario]]` tables. A scenario names a mechanism, a workload and a sequence of steps
("shrink 256M", "grow 1G", "settle 5s"); any scenario key may be set in `[defaults]`.
"""

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamem import faults, mechanisms
from dynamem import observer as observers
from dynamem.errors import UserError
from dynamem.mechanisms import Mechanism, MemoryPlan
from dynamem.qemu.config import ONLINE_STATES, SWAP_KINDS, default_cpu, vcpus_for
from dynamem.record import Condition, MechanismConfig
from dynamem.units import format_size, parse_size

WORKLOADS = ("idle", "stress", "pagecache", "impact")
# How a cell's guest starts: a fresh boot, or the saved post-boot state of its machine
# configuration (dynamem.qemu.snapshot). Never pooled: part of the condition.
STARTS = ("boot", "snapshot")
REPRODUCIBLE = ("hyperalloc",)  # published experiments a scenario may say it reproduces
_STEP = re.compile(
    r"^\s*(?:(?P<resize>shrink|grow)\s+(?P<size>\S+)"
    r"|(?P<timed>settle|free)\s+(?P<seconds>\d+(?:\.\d+)?)\s*s"
    r"|oom\s+(?P<oom>\S+)"
    r"|(?P<reboot>reboot))\s*$"
)

# key -> (type check, description); every key a scenario (or [defaults]) may hold
SCENARIO_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "name": (str, "scenario name"),
    "mechanism": (str, "balloon, dimm or virtio-mem"),
    "variant": (str, "virtio-mem: sbm or bbm"),
    "deflate_on_oom": (bool, "balloon option"),
    "free_page_reporting": (bool, "balloon option"),
    "dimm_size": (str, "DIMM size"),
    "memory": (str, "guest size before the first step"),
    "boot_memory": (str, "boot RAM (default: what the steps need)"),
    "maxmem": (str, "upper bound for hotplugged memory"),
    "cpus": (int, "vCPUs"),
    "cpu_model": (str, "QEMU -cpu model (default: host under KVM, qemu64 under TCG)"),
    "observer": (str, "how resizes are watched: adaptive (default), minimal, dense, sparse"),
    "start": (str, "boot (a fresh guest per cell, default) or snapshot (a saved post-boot state)"),
    "memhp_default_state": (str, "how the guest onlines hotplugged memory"),
    "kernel_args": (list, "extra guest kernel arguments"),
    "swap": (str, "disk, zram or none"),
    "swap_size": (str, "guest swap size"),
    "workload": (str, "idle, stress, pagecache or impact"),
    "workload_size": (str, "working set: a size or a percentage of memory"),
    "touch": (str, "touch this much memory (a size or a percentage) and free it first"),
    "steps": (list, 'e.g. ["shrink 256M", "settle 2s", "grow 256M"]'),
    "warmup": (bool, "do the steps once, unmeasured, before measuring"),
    "repeats": (int, "cells (fresh guests) per scenario"),
    "deadline": ((int, float), "seconds each step (and the workload's start) may take"),
    "reproduces": (str, "a published experiment this scenario runs, scaled: hyperalloc"),
    "no_progress": (
        (int, float),
        "seconds without host-side progress that end a resize (default: per mechanism)",
    ),
}
# Only with DYNAMEM_FAULT_INJECTION=1, for the harness's own tests (see dynamem.faults).
HIDDEN_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "inject": (str, "a fault to inject, e.g. qemu-kill@step0"),
    "inject_repeats": (list, "the repeats the fault is injected into (default: every one)"),
}
SUITE_KEYS = {"name", "description", "repeats", "seed", "defaults", "scenario", "control_arm",
              "force_repeats", "force_start"}  # fmt: skip
# The control arm's twin of a scenario: the same condition, watched without guest-visible
# latency (dynamem.observer "minimal"), so the report can put the observer's cost on the
# host-side latency with an interval.
CONTROL = "minimal"
# Names become file and directory names (cells/<name>-r1.json, results/raw/<stamp>-<name>).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A kernel argument is one word of the guest's command line: no spaces, quotes or controls.
KERNEL_ARG = re.compile(r"^[A-Za-z0-9_.,:=/+@%-]+$")
CPU_MODEL = re.compile(r"^[A-Za-z0-9_.,=+-]{1,200}$")


@dataclass(frozen=True)
class Step:
    """resize (delta), settle (wait), free (stop the workload, watch QEMU's RSS for
    `seconds`), oom (ask for `size` more than the guest has), reboot (system_reset)."""

    kind: str
    delta: int = 0
    seconds: float = 0.0
    size: int = 0

    def __str__(self) -> str:
        from dynamem.units import format_size

        if self.kind in ("settle", "free"):
            return f"{self.kind} {self.seconds:g}s"
        if self.kind == "oom":
            return f"oom {format_size(self.size)}"
        if self.kind == "reboot":
            return "reboot"
        return f"{'grow' if self.delta > 0 else 'shrink'} {format_size(abs(self.delta))}"


@dataclass(frozen=True)
class Scenario:
    name: str
    mechanism: str
    steps: tuple[Step, ...]
    variant: str | None = None
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    dimm_size: int = 128 << 20
    memory: int = 2 << 30
    boot_memory: int | None = None
    maxmem: int | None = None
    cpus: int = 2
    cpu_model: str | None = None  # None: the accelerator's default
    memhp_default_state: str = "online_movable"
    kernel_args: tuple[str, ...] = ()
    swap: str = "disk"
    swap_size: int = 1 << 30
    workload: str = "idle"
    workload_size: int = 0
    touch: int = 0
    warmup: bool = True
    repeats: int = 5
    deadline: float = 120.0
    no_progress: float | None = None  # None: the mechanism's default
    observer: str = observers.DEFAULT
    start: str = "boot"
    reproduces: str | None = None
    inject: faults.Fault | None = None
    inject_repeats: tuple[int, ...] = ()  # empty: every repeat
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def fault_for(self, repeat: int) -> faults.Fault | None:
        """The fault to inject into this repeat's cell, if any."""
        if self.inject_repeats and repeat not in self.inject_repeats:
            return None
        return self.inject

    @property
    def deltas(self) -> tuple[int, ...]:
        return tuple(s.delta for s in self.steps if s.kind == "resize")

    def mechanism_object(self) -> Mechanism:
        mech = mechanisms.make(
            self.mechanism,
            self.variant,
            dimm_size=self.dimm_size,
            deflate_on_oom=self.deflate_on_oom,
            free_page_reporting=self.free_page_reporting,
        )
        if self.no_progress is not None:
            mech.no_progress_s = self.no_progress
        return mech

    def mechanism_config(self) -> MechanismConfig:
        mech = self.mechanism_object()
        return MechanismConfig(
            name=mech.name,
            variant=mech.variant,
            dimm_size=self.dimm_size if self.mechanism == "dimm" else None,
            block_size=mech.granularity if self.mechanism == "virtio-mem" else None,
            boot_memory=self.boot_memory,
            maxmem=self.maxmem,
            no_progress_s=mech.no_progress_s,
        )

    def condition(self, accel: str, guest: str = "minimal") -> Condition:
        """What this scenario's cells measure under `accel` on `guest` (its label,
        launch.guest_label), the mechanism aside."""
        return Condition(
            memory=self.memory,
            cpus=vcpus_for(accel, self.cpus),
            cpu_model=self.cpu_model or default_cpu(accel),
            accel=accel,
            workload=self.workload,
            workload_size=self.workload_size,
            touch=self.touch,
            swap=self.swap,
            swap_size=self.swap_size if self.swap != "none" else 0,
            memhp_default_state=self.memhp_default_state,
            kernel_args=self.kernel_args,
            warmup=self.warmup,
            steps=tuple(str(s) for s in self.steps),
            observer=self.observer,
            start=self.start,
            guest=guest,
        )

    def memory_plan(self, mech: Mechanism) -> MemoryPlan:
        # A balloon step above boot RAM is recorded as `unsupported` when it runs.
        return mech.plan_path(self.memory, self.deltas, self.boot_memory, self.maxmem, strict=False)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    repeats: int
    seed: int
    scenarios: tuple[Scenario, ...]
    source: str  # the TOML text, stored with every run


def parse_step(text: object, where: str) -> Step:
    if not isinstance(text, str) or not (m := _STEP.match(text)):
        raise UserError(
            f"{where}: bad step {text!r} (use 'shrink SIZE', 'grow SIZE', 'settle Ns', "
            "'free Ns', 'oom SIZE' or 'reboot')"
        )
    if m.group("timed"):
        return Step(m.group("timed"), seconds=float(m.group("seconds")))
    if m.group("oom"):
        return Step("oom", size=parse_size(m.group("oom"), what=f"{where} oom size"))
    if m.group("reboot"):
        return Step("reboot")
    size = parse_size(m.group("size"), what=f"{where} step size")
    return Step("resize", delta=size if m.group("resize") == "grow" else -size)


def _size_or_pct(text: str, memory: int, where: str) -> int:
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise UserError(f"{where}: malformed percentage {text!r}") from None
        if not 0 < pct < 100:
            raise UserError(f"{where}: percentage {text!r} must be between 0 and 100")
        return int(memory * pct / 100) // (1 << 20) << 20
    return parse_size(text, what=f"{where} size")


def build_scenario(data: dict[str, Any], where: str) -> Scenario:
    known = {**SCENARIO_KEYS, **HIDDEN_KEYS} if faults.enabled() else SCENARIO_KEYS
    for key, value in data.items():
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(SCENARIO_KEYS)})")
        expected, what = known[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(
                f"{where}: {key} must be {_type_name(expected)} ({what}), got {value!r}"
            )
    for key in ("name", "mechanism", "steps"):
        if key not in data:
            raise UserError(f"{where}: missing required key {key!r}")
    if not NAME.match(data["name"]):
        raise UserError(
            f"{where}: name {data['name']!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it names the result files)"
        )
    where = f"{where} ({data['name']})"
    for arg in data.get("kernel_args", ()):
        if not isinstance(arg, str) or not KERNEL_ARG.match(arg):
            raise UserError(
                f"{where}: kernel argument {arg!r} must be one word of letters, digits and "
                "_.,:=/+@%-"
            )
    repeats_hit = data.get("inject_repeats", [])
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in repeats_hit):
        raise UserError(f"{where}: inject_repeats must be a list of repeat numbers (1, 2, ...)")
    if data["mechanism"] not in mechanisms.NAMES:
        raise UserError(
            f"{where}: unknown mechanism {data['mechanism']!r} "
            f"(choose from {', '.join(mechanisms.NAMES)})"
        )
    workload = data.get("workload", "idle")
    if workload not in WORKLOADS:
        raise UserError(
            f"{where}: unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})"
        )
    if data.get("swap", "disk") not in SWAP_KINDS:
        raise UserError(
            f"{where}: unknown swap {data['swap']!r} (choose from {', '.join(SWAP_KINDS)})"
        )
    if data.get("memhp_default_state", "online_movable") not in ONLINE_STATES:
        raise UserError(f"{where}: unknown memhp_default_state {data['memhp_default_state']!r}")
    steps = tuple(parse_step(s, where) for s in data["steps"])
    if not any(s.kind == "resize" for s in steps):
        raise UserError(f"{where}: steps must hold at least one shrink or grow")
    if any(s.kind == "free" for s in steps) and data.get("workload", "idle") == "idle":
        raise UserError(f"{where}: a 'free' step needs a workload to free")
    memory = parse_size(data.get("memory", "2G"), what=f"{where} memory")
    if workload != "idle" and "workload_size" not in data:
        raise UserError(f"{where}: workload {workload!r} needs workload_size")
    sizes = {
        k: parse_size(data[k], what=f"{where} {k}")
        for k in ("boot_memory", "maxmem", "dimm_size", "swap_size")
        if k in data
    }
    for key in ("repeats", "cpus"):
        if key in data and data[key] < 1:
            raise UserError(f"{where}: {key} must be at least 1")
    if data.get("observer", observers.DEFAULT) not in observers.OBSERVERS:
        raise UserError(
            f"{where}: unknown observer {data['observer']!r} "
            f"(choose from {', '.join(observers.OBSERVERS)})"
        )
    if data.get("start", "boot") not in STARTS:
        raise UserError(
            f"{where}: unknown start {data['start']!r} (choose from {', '.join(STARTS)})"
        )
    if data.get("reproduces", "hyperalloc") not in REPRODUCIBLE:
        raise UserError(
            f"{where}: reproduces {data['reproduces']!r} is not one of {', '.join(REPRODUCIBLE)}"
        )
    for key in ("deadline", "no_progress"):
        if key in data and not 0 < data[key] < math.inf:
            raise UserError(f"{where}: {key} must be a positive number of seconds")
    if "cpu_model" in data and not CPU_MODEL.match(data["cpu_model"]):
        raise UserError(
            f"{where}: cpu_model {data['cpu_model']!r} must be one word of letters, digits "
            "and _.,=+-"
        )
    scenario = Scenario(
        name=data["name"],
        mechanism=data["mechanism"],
        steps=steps,
        variant=data.get("variant"),
        deflate_on_oom=data.get("deflate_on_oom", False),
        free_page_reporting=data.get("free_page_reporting", False),
        dimm_size=sizes.get("dimm_size", 128 << 20),
        memory=memory,
        boot_memory=sizes.get("boot_memory"),
        maxmem=sizes.get("maxmem"),
        cpus=data.get("cpus", 2),
        cpu_model=data.get("cpu_model"),
        memhp_default_state=data.get("memhp_default_state", "online_movable"),
        kernel_args=tuple(str(a) for a in data.get("kernel_args", ())),
        swap=data.get("swap", "disk"),
        swap_size=sizes.get("swap_size", 1 << 30),
        workload=workload,
        workload_size=_size_or_pct(data["workload_size"], memory, where)
        if "workload_size" in data
        else 0,
        touch=_size_or_pct(data["touch"], memory, where) if "touch" in data else 0,
        warmup=data.get("warmup", True),
        repeats=data.get("repeats", 5),
        deadline=float(data.get("deadline", 120.0)),
        no_progress=float(data["no_progress"]) if "no_progress" in data else None,
        observer=data.get("observer", observers.DEFAULT),
        start=data.get("start", "boot"),
        reproduces=data.get("reproduces"),
        inject=faults.parse(data["inject"], len(steps), data["mechanism"])
        if "inject" in data
        else None,
        inject_repeats=tuple(int(r) for r in data.get("inject_repeats", ())),
        raw=dict(data),
    )
    if scenario.touch >= memory:
        raise UserError(
            f"{where}: touch {format_size(scenario.touch)} is not below the guest's memory"
        )
    fault = scenario.inject
    after_request = fault is not None and fault.kind in faults.AFTER_REQUEST
    if after_request and fault and fault.step is not None and steps[fault.step].kind != "resize":
        raise UserError(f"{where}: {fault} needs a resize at step {fault.step}")
    if workload in ("stress", "impact") and scenario.workload_size >= memory:
        raise UserError(
            f"{where}: workload_size {format_size(scenario.workload_size)} is not below the "
            f"guest's memory {format_size(memory)}: it could never become resident"
        )
    try:
        mech = scenario.mechanism_object()
        scenario.memory_plan(mech)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc
    return scenario


def _type_name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list"}.get(
        expected.__name__, expected.__name__
    )


def load_suite_text(text: str, source: str) -> Suite:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc})") from exc
    if data.get("kind") == "cases":
        raise UserError(
            f"{source} is a case-study suite: only `dynamem run --suite` runs it (not the "
            "nightly, asv or --cluster)"
        )
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise UserError(
            f"{source}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(SUITE_KEYS))})"
        )
    defaults = data.get("defaults", {})
    entries = data.get("scenario", [])
    if not isinstance(defaults, dict) or not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: needs [defaults] as a table and at least one [[scenario]]")
    repeats, seed = data.get("force_repeats", data.get("repeats", 5)), data.get("seed", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"{source}: repeats must be a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{source}: seed must be an integer")
    if "name" in data and (not isinstance(data["name"], str) or not NAME.match(data["name"])):
        raise UserError(
            f"{source}: suite name {data['name']!r} must be 1-64 letters, digits, '.', '_' "
            "or '-' (it names the run directory)"
        )
    control = data.get("control_arm", False)
    if not isinstance(control, bool):
        raise UserError(f"{source}: control_arm must be true or false")
    scenarios = []
    names = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{source}: scenario {i + 1} must be a table")
        merged = {"repeats": repeats, **defaults, **entry}
        if "force_repeats" in data:  # what `--repeats N` writes: every scenario's count
            merged["repeats"] = data["force_repeats"]
        if "force_start" in data:  # what `--start MODE` writes: every scenario's start
            merged["start"] = data["force_start"]
        built = [build_scenario(merged, f"{source}: scenario {i + 1}")]
        if control and built[0].observer != CONTROL:
            twin = {**merged, "name": f"{built[0].name}-{CONTROL}", "observer": CONTROL}
            built.append(build_scenario(twin, f"{source}: scenario {i + 1}'s control arm"))
        for scenario in built:
            if scenario.name in names:
                raise UserError(f"{source}: two scenarios are named {scenario.name!r}")
            names.add(scenario.name)
            scenarios.append(scenario)
    return Suite(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        repeats=repeats,
        seed=seed,
        scenarios=tuple(scenarios),
        source=text,
    )


def suites_dir() -> Path:
    from dynamem.paths import suites_dir as shipped

    return shipped()


def suite_path(name_or_path: str) -> Path:
    """A built-in suite's file (suites/NAME.toml), or the TOML file given."""
    path = Path(name_or_path)
    if not path.suffix:
        path = suites_dir() / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in suites_dir().glob("*.toml")))
        raise UserError(f"no suite {name_or_path!r} (built in: {known}; or give a .toml file)")
    return path


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (suites/NAME.toml) or a TOML file."""
    path = suite_path(name_or_path)
    return load_suite_text(path.read_text(), str(path))


def _with_top_key(suite: Suite, key: str, value: str) -> Suite:
    """The suite with a top-level `key = value` in its text too, so a resumed run (which
    re-reads the stored text) plans the same cells."""
    text = re.sub(rf"^{key}\s*=.*$\n?", "", suite.source, flags=re.MULTILINE)
    return load_suite_text(f"{key} = {value}\n" + text, suite.name)


def with_control_arm(suite: Suite) -> Suite:
    return _with_top_key(suite, "control_arm", "true")


def with_start(suite: Suite, start: str) -> Suite:
    """Every scenario started `start` (`force_start` overrides the scenarios' own)."""
    if start not in STARTS:
        raise UserError(f"unknown start {start!r} (choose from {', '.join(STARTS)})")
    return _with_top_key(suite, "force_start", f'"{start}"')


def with_repeats(suite: Suite, repeats: int) -> Suite:
    """Every scenario `repeats` times (`force_repeats` overrides scenarios' own counts)."""
    return _with_top_key(suite, "force_repeats", str(int(repeats)))
