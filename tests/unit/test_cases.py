"""The case studies' pure parts: pressure parsing, the policy, the suite, the host's RAM
reading, and the analysis of arms captured from real guests (tests/fixtures/cases)."""

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
from dynamem.analysis import cases as acases
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamem import cases
from dynamem.balance import GuestView, Pressure, TargetAvailable, parse_pressure, parse_psi
from dynamem.caserecord import load_arms, load_series
from dynamem.cli import main
from dynamem.errors import UserError
from dynamem.store import RunStore
from dynamem.units import MiB

FIX = Path(__file__).parent.parent / "fixtures"
CASES = FIX / "cases"
# /proc/pressure/memory of the embedded guest booted with psi=1, idle (tests/fixtures/cases/
# guest-*-thrashing.txt: the same guest while dynamem-impact thrashed 700 MiB in 640 MiB)
PSI_IDLE = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"  # noqa: E501


def look(avail_mib: int, t_s: float = 0.0, pswpin: int = 0, psi: float = 0.0) -> Pressure:
    return Pressure(int(t_s * 1e9), 1_000_000, avail_mib * 1024, pswpin, 0, 0, 0, 0, psi)


def view(name: str, size_mib: int, avail_mib: int, **kw: object) -> GuestView:
    return GuestView(name, size_mib * MiB, 384 * MiB, 1024 * MiB, look(avail_mib), **kw)  # type: ignore[arg-type]


def test_psi_parsed_and_absent_psi_is_told_apart_from_none_stalled() -> None:
    assert parse_psi(PSI_IDLE) == (0.0, 0)
    busy = (CASES / "guest-psi-thrashing.txt").read_text()
    avg10, total = parse_psi(busy)
    assert avg10 == float(busy.split("avg10=")[1].split()[0]) > 10
    assert total == int(busy.split("total=")[1].split()[0]) > 0
    assert parse_psi("") == (0.0, -1)  # no /proc/pressure (PSI off): not "never stalled"


def test_pressure_from_a_thrashing_guest() -> None:
    files = [(CASES / f"guest-{k}-thrashing.txt").read_text() for k in ("meminfo", "vmstat", "psi")]
    p = parse_pressure(5, *files)
    assert p.t_ns == 5 and p.mem_total_kb > p.mem_available_kb >= 0
    vmstat = dict(line.split() for line in files[1].splitlines())
    assert (p.pswpin, p.pswpout, p.pgmajfault) == tuple(
        int(vmstat[k]) for k in ("pswpin", "pswpout", "pgmajfault")
    )
    assert p.pswpout > 0 and p.psi_some_us > 0  # it really was swapping and stalled
    why = TargetAvailable().pressured(GuestView("g", 640 * MiB, 384 * MiB, 1024 * MiB, p))
    assert "MemAvailable 0 < 128M" in why and "PSI some avg10 73.3%" in why
    with pytest.raises(ValueError, match="MemAvailable"):
        parse_pressure(0, "MemTotal: 5 kB\n", files[1], "")


def test_no_pressure_no_moves() -> None:
    policy = TargetAvailable()
    guests = [view("a", 768, 500), view("b", 768, 400)]
    assert policy.decide(guests, 2560 * MiB, 32 * MiB, 10) == []


def test_free_budget_is_spent_before_anyone_shrinks() -> None:
    policy = TargetAvailable()
    guests = [view("a", 768, 20), view("b", 768, 600), view("c", 768, 600)]
    moves = policy.decide(guests, 2560 * MiB, 32 * MiB, 10)
    assert [(m.guest, m.kind, m.size // MiB) for m in moves] == [("a", "grow", 256)]
    assert "MemAvailable 20M" in moves[0].reason


def test_a_donor_with_slack_shrinks_first_and_keeps_its_floor_and_target() -> None:
    policy = TargetAvailable()
    guests = [view("a", 896, 10), view("b", 768, 700), view("c", 896, 30)]  # budget full
    moves = policy.decide(guests, 2560 * MiB, 128 * MiB, 10)
    kinds = [m.kind for m in moves]
    assert kinds.index("shrink") < kinds.index("grow")
    shrunk = sum(m.size for m in moves if m.kind == "shrink" and m.guest == "b")
    grown = sum(m.size for m in moves if m.kind == "grow")
    assert shrunk == grown and shrunk % (128 * MiB) == 0
    assert 768 * MiB - shrunk >= 384 * MiB  # floor
    assert 700 * MiB - shrunk >= policy.target  # the donor keeps its target


def test_a_guest_that_just_received_memory_gives_none_and_the_starved_one_is_logged() -> None:
    policy = TargetAvailable(cooldown=3)
    guests = [view("a", 1024, 700, received_at=9), view("b", 512, 40)]
    moves = policy.decide(guests, 1536 * MiB, 32 * MiB, 10)
    assert [(m.guest, m.kind, m.size) for m in moves] == [("b", "none", 0)]
    assert "no free budget, no slack" in moves[0].reason


def test_swap_ins_and_psi_mark_pressure_even_with_memory_available() -> None:
    policy = TargetAvailable()
    swapping = GuestView("a", 768 * MiB, 384 * MiB, 1024 * MiB,
                         look(300, t_s=2.0, pswpin=400), look(300, t_s=0.0))  # fmt: skip
    assert "swap-in 200 pages/s" in policy.pressured(swapping)
    stalled = view("b", 768, 300)
    stalled.now = look(300, psi=12.5)
    assert "PSI some avg10 12.5%" in policy.pressured(stalled)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(3, 8), st.integers(0, 1000)), min_size=2, max_size=4),
    st.integers(0, 6),
)
def test_moves_never_break_the_budget_floor_ceiling_or_unit(
    guests: list[tuple[int, int]], free_units: int
) -> None:
    unit = 128 * MiB
    views = [GuestView(f"g{i}", s * unit, 3 * unit, 8 * unit, look(min(a, s * 128)))
             for i, (s, a) in enumerate(guests)]  # fmt: skip
    budget = sum(v.size for v in views) + free_units * unit
    moves = TargetAvailable().decide(views, budget, unit, 10)
    size = {v.name: v.size for v in views}
    for m in moves:
        assert m.size % unit == 0
        size[m.guest] += m.delta
    assert sum(size.values()) <= budget
    assert all(3 * unit <= s <= 8 * unit for s in size.values())
    assert [m.kind for m in moves] == sorted((m.kind for m in moves), key=lambda k: k != "shrink")


def test_the_built_in_case_suite_plans_every_mechanism_over_the_whole_range() -> None:
    from dynamem.scenario import suite_path

    suite = cases.load_case_text(suite_path("cases").read_text(), "cases.toml")
    assert [c.name for c in suite.cases] == ["balancing", "overcommit"]
    ids = suite.arm_ids()
    assert len(ids) == 8 and len(set(ids)) == 8
    over = suite.cases[1]
    assert len(over.guests) * over.ceiling > over.budget  # overcommitted by construction
    for arm in ("balloon", "dimm", "virtio-mem"):
        mech, plan = cases.plan_memory(over, arm)
        assert min(plan.path) == over.floor and max(plan.path) == over.ceiling
        assert plan.before == over.start
        assert plan.boot == (over.ceiling if arm == "balloon" else over.floor)
        assert cases.move_unit(mech, over) % mech.granularity == 0
    assert "psi=1" in over.kernel_args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": "1G"}, "exceed the budget"),
        ({"start": "2G"}, "floor <= start <= ceiling"),
        ({"arms": ["static", "ballon"]}, "arms must be a list from"),
        ({"guests": [["700M 40s"]]}, "at least two guests"),
        ({"guests": [["700M forty"], ["idle 2s"]]}, "bad phase .700M forty."),
        ({"guests": [["700M 1.5s"], ["idle 2s"]]}, "in whole seconds"),
        ({"guests": [["2G 4s"], ["idle 2s"]]}, "cannot fit under the ceiling"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"interval": 0}, "interval must be a positive number"),
        ({"policy": "greedy"}, "unknown policy 'greedy'"),
        ({"dimm_size": "100M"}, "dimm"),
        ({"floor": "64M"}, "floor must be at least 100M"),
        ({"low": "300M"}, "low must be below target"),
    ],
)
def test_bad_cases_are_refused_in_one_line(change: dict[str, object], message: str) -> None:
    import tomli_w

    base = {"name": "c", "budget": "2G", "start": "640M", "floor": "384M", "ceiling": "1G",
            "guests": [["700M 4s"], ["idle 4s"]]}  # fmt: skip
    text = tomli_w.dumps({"kind": "cases", "case": [{**base, **change}]})
    with pytest.raises(UserError, match=message) as err:
        cases.load_case_text(text, "x.toml")
    assert "\n" not in str(err.value)


def test_phase_script_and_outcomes() -> None:
    script = cases.phase_script(((700 * MiB, 40.0), (0, 80.0), (300 * MiB, 10.0)))
    assert f"timeout 40 dynamem-impact {700 * MiB} /tmp/dynamem-case/p0.log" in script
    assert "echo 0 $?" in script and "echo start 2 " in script
    # each busy phase waits for its planned offset from the script's start (here 120 s)
    assert "w=$((t0 + 12000 - " in script and "p1.log" not in script
    assert cases.phase_outcome(0, None, False) == "idle"
    assert cases.phase_outcome(MiB, 143, True) == "completed"  # busybox timeout: SIGTERM
    assert cases.phase_outcome(MiB, 124, True) == "completed"  # coreutils timeout
    assert cases.phase_outcome(MiB, 137, True) == "killed"  # SIGKILL: the OOM killer
    assert cases.phase_outcome(MiB, 143, False) == "failed"  # never became resident


def test_guest_ram_is_read_from_qemus_large_private_mappings() -> None:
    # a real QEMU's smaps (a balloon guest with 1 GiB of boot RAM), trimmed to its large
    # mappings, heap and stack: only the RAM mapping counts, not TCG's rwx code buffer,
    # a malloc arena, or the heap
    smaps = (CASES / "qemu-smaps.txt").read_text()
    assert cases.guest_ram_rss_kb(smaps) == 401368


def _run_copy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(CASES / "run", run)
    return run


def test_reaction_times_and_the_budget_check_from_a_real_arm(tmp_path: Path) -> None:
    run = _run_copy(tmp_path)
    arms = {a.mechanism: a for a in load_arms(run)[0]}
    arm, series = arms["virtio-mem"], load_series(run, "mini-virtio-mem-r1")
    served, unserved, unseen = acases.reaction_times(arm, series)
    # g1 got its first grow about 1.5 s after the look that saw it under pressure; g2 was
    # starved for four rounds before g1's memory came free
    assert len(served) == 2 and unserved == unseen == 0
    assert 0 < served.min() < 3 < 8 < served.max()
    check = acases.budget_check(arm, series)
    assert check["peak"] <= arm.budget and check["longest_above_s"] == 0.0
    assert check["peak_vmrss"] > check["peak"]  # QEMU's own memory is on top, apart
    assert 0.4 < check["period_s"] < 0.7


def test_budget_excess_is_timed_from_first_sample_above_to_first_back_under(tmp_path: Path) -> None:
    run = _run_copy(tmp_path)
    arm = load_arms(run)[0][0]
    t = np.arange(10, dtype=np.int64) * 500_000_000
    over = int(arm.budget * 1.2 / 1024)
    ram = np.array([[0], [0], [over], [over], [over], [0], [0], [over], [0], [0]])
    check = acases.budget_check(arm, {"host_t_ns": t, "host_ram_kb": ram, "host_vmrss_kb": ram})
    assert check["longest_above_s"] == pytest.approx(1.5)


def test_case_report_from_real_arms(tmp_path: Path) -> None:
    run = _run_copy(tmp_path)
    md, page = acases.build_case_report(RunStore.open(run), tmp_path / "report")
    text = md.read_text()
    assert "### mini" in text and "(tcg" not in text
    assert (tmp_path / "report" / "case-mini.png").stat().st_size > 20_000
    assert "| virtio-mem | 2/2 | 0 |" in text
    assert "5 ok; 4 rounds with a starved guest" in text
    assert "no case study has two mechanism arms that may lead" in text  # one mechanism
    assert page.exists()


def test_an_arm_without_a_record_is_listed_as_failed(tmp_path: Path) -> None:
    run = _run_copy(tmp_path)
    (run / "cases" / "mini-static-r1.json").unlink()
    md, _ = acases.build_case_report(RunStore.open(run), tmp_path / "report")
    assert "- `mini-static-r1`: never finished" in md.read_text()


def test_verdict_names_the_leader_of_each_measure(tmp_path: Path) -> None:
    run = _run_copy(tmp_path)
    arm = next(a for a in load_arms(run)[0] if a.mechanism == "virtio-mem")
    series = load_series(run, arm.arm)
    a = acases.summarize(arm, series)
    b = acases.summarize(copy.deepcopy(arm), series)
    assert a.psi_s is not None and a.psi_s > 0
    b.arm.mechanism, b.pages, b.swap_bytes = "balloon", a.pages + 1, a.swap_bytes + 1
    b.psi_s = a.psi_s / 2
    text = acases.verdict({"mini": [a, b]})
    assert 'agrees with "no absolute winner"' in text
    assert "leads: balloon 2 of 3, virtio-mem 1 of 3" in text  # the reaction tie is no lead
    assert "mini, work done: **balloon**" in text and "swap traffic: **virtio-mem**" in text
    b.reaction = np.array([0.001])
    assert "mostly does **not** agree" in acases.verdict({"mini": [a, b]})
    b.swap_bytes = 0
    assert "balloon leads on every measure" in acases.verdict({"mini": [a, b]})


def test_cli_dry_run_and_options_that_do_not_apply(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--suite", "cases", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 8 and all("3 guests" in line for line in out)
    assert "balancing-static-r1: 3 guests, budget 2560M, static 832M each, fixed, 130 s" in out
    assert main(["run", "--suite", "cases", "--repeats", "2"]) == 2
    assert "--repeats does not apply to a case-study suite" in capsys.readouterr().err


def test_repeats_other_than_one_are_refused() -> None:
    with pytest.raises(UserError, match="repeats must be 1"):
        cases.load_case_text('kind = "cases"\nrepeats = 2\n[[case]]\nname = "x"\n', "x.toml")


def test_the_static_arm_gets_the_budget_shared_out() -> None:
    from dynamem.scenario import suite_path

    suite = cases.load_case_text(suite_path("cases").read_text(), "cases.toml")
    balancing, over = suite.cases
    assert balancing.static_size == 832 * MiB  # 2560M / 3, in whole 32M quanta
    assert over.static_size == 672 * MiB
    assert balancing.static_size > balancing.start  # more than the mechanisms start with


def test_the_nightly_and_scenario_loader_refuse_a_case_suite() -> None:
    from dynamem.scenario import load_suite

    with pytest.raises(UserError, match="is a case-study suite"):
        load_suite("cases")


def test_compare_refuses_a_case_study_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_copy(tmp_path)
    assert main(["compare", str(run), str(run)]) == 2
    assert "is a case-study run" in capsys.readouterr().err


class _FakeVM:
    def __init__(self, plugged: int) -> None:
        self.plugged = plugged


class _FakeMech:
    """virtio-mem as the controller sees it: QEMU reports the plugged bytes."""

    name, granularity, no_progress_s = "virtio-mem", 2 * MiB, 30.0

    def host_bytes(self, vm: _FakeVM) -> int:
        return vm.plugged

    def host_bytes_at(self, size: int) -> int:
        return size - 384 * MiB  # boot RAM at the floor


def test_a_short_shrink_cuts_the_grow_and_an_unfinished_grow_stays_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dynamem.caserecord import CaseGuest, Decision

    avail = {"g1": 10, "g2": 600}  # MiB: g1 under pressure, g2 with slack
    monkeypatch.setattr(cases, "_look", lambda g: look(avail[g.name]))

    def execute(g: cases._Guest, move: object, d: Decision, case: object) -> None:
        if d.kind == "shrink":  # half of it, then no progress: partial
            d.outcome, d.done = "partial", -d.requested // 2
            g.vm.plugged += d.done
        else:  # the guest plugs nothing before the deadline; QEMU's request stands
            d.outcome, d.done = "timeout", 0

    monkeypatch.setattr(cases, "_execute", execute)
    suite = cases.load_case_text(
        'kind = "cases"\n[[case]]\nname = "c"\nbudget = "1536M"\nstart = "768M"\n'
        'floor = "384M"\nceiling = "1G"\nguests = [["700M 4s"], ["idle 4s"]]\n',
        "c.toml",
    )
    case = suite.cases[0]
    guests = [
        cases._Guest(
            n,
            _FakeVM(384 * MiB),
            _FakeMech(),
            None,  # type: ignore[arg-type]
            CaseGuest(
                name=n,
                floor=384 * MiB,
                start=768 * MiB,
                ceiling=1024 * MiB,
                boot_memory=384 * MiB,
                phases=[],
            ),
            [],
            [],
            [],
        )  # fmt: skip
        for n in ("g1", "g2")
    ]
    decisions: list[Decision] = []
    cases.control_round(guests, case.make_policy(), case, 0, decisions)
    shrink, grow = decisions
    assert (shrink.guest, shrink.kind, shrink.requested) == ("g2", "shrink", 256 * MiB)
    assert (grow.guest, grow.kind) == ("g1", "grow")
    # only what the shrink really freed is spent (128 MiB), and the grow's request stands
    assert grow.message.startswith("cut to 128M: a shrink fell short")
    assert guests[0].pending == 896 * MiB and "counted against the budget" in grow.message
    assert guests[0].committed() + guests[1].committed() <= case.budget
    # the next round counts g1 at its standing target, not at what it has so far
    cases.control_round(guests, case.make_policy(), case, 1, decisions)
    assert guests[0].sizes[-1] == 896 * MiB
    assert sum(g.sizes[-1] for g in guests) <= case.budget
