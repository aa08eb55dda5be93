"""Suite files: a valid plan or a one-line error naming the problem, nothing else."""

import pytest

from dynamem.errors import UserError
from dynamem.runner import cells_in_order, estimate_cell_s
from dynamem.scenario import load_suite, load_suite_text, parse_step
from dynamem.units import GiB

GOOD = """
name = "t"
repeats = 2
seed = 7
[defaults]
memory = "1G"
steps = ["shrink 256M", "settle 1s", "grow 256M"]
[[scenario]]
name = "a"
mechanism = "virtio-mem"
[[scenario]]
name = "b"
mechanism = "balloon"
workload = "stress"
workload_size = "50%"
"""


def test_a_valid_suite():
    suite = load_suite_text(GOOD, "t.toml")
    a, b = suite.scenarios
    assert a.deltas == (-256 << 20, 256 << 20)
    assert [str(s) for s in a.steps] == ["shrink 256M", "settle 1s", "grow 256M"]
    assert b.workload_size == 512 << 20 and b.repeats == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('mechanism = "virtio-mem"', 'mechanism = "virtio-mem"\ncolour = "red"'),
            "unknown key 'colour'",
        ),
        (('mechanism = "virtio-mem"', 'mechanism = "hotplug"'), "unknown mechanism 'hotplug'"),
        (('workload = "stress"', 'workload = "fio"'), "unknown workload 'fio'"),
        (('memory = "1G"', "memory = 1"), "memory must be a string"),
        (('"settle 1s"', '"wait 1s"'), "bad step 'wait 1s'"),
        (('"shrink 256M"', '"shrink 101M"'), "not a multiple of the virtio-mem/sbm granularity"),
        (('name = "b"\n', ""), "missing required key 'name'"),
        (('workload_size = "50%"', 'workload_size = "150%"'), "between 0 and 100"),
        (("repeats = 2", "repeats = 0"), "repeats must be a positive integer"),
        (('name = "b"', 'name = "a"'), "two scenarios are named 'a'"),
        (("[defaults]", '[defaults]\ncpus = "two"'), "cpus must be an integer"),
    ],
)
def test_bad_suites_name_the_problem(change, message):
    text = GOOD.replace(*change)
    with pytest.raises(UserError, match=message):
        load_suite_text(text, "t.toml")


def test_balloon_growing_past_boot_ram_is_left_to_run_time():
    text = GOOD.replace(
        'steps = ["shrink 256M", "settle 1s", "grow 256M"]', 'steps = ["grow 256M"]'
    )
    suite = load_suite_text(text, "t.toml")  # recorded as `unsupported` when it runs
    assert suite.scenarios[1].deltas == (256 << 20,)


def test_cells_are_interleaved_deterministically():
    suite = load_suite_text(GOOD, "t.toml")
    one = [c.id for c in cells_in_order(suite, 7)]
    assert one == [c.id for c in cells_in_order(suite, 7)]
    assert sorted(one) == ["a-r1", "a-r2", "b-r1", "b-r2"]
    orders = {tuple(c.id for c in cells_in_order(suite, seed)) for seed in range(20)}
    assert len(orders) > 1


def test_the_shipped_suites_load_and_estimate():
    for name in ("quick", "study"):
        suite = load_suite(name)
        assert all(estimate_cell_s(s) > 0 for s in suite.scenarios)
    quick = load_suite("quick")
    assert {s.mechanism for s in quick.scenarios} == {"balloon", "dimm", "virtio-mem"}
    assert {s.workload for s in quick.scenarios} == {"idle", "stress"}
    assert all(s.repeats == 5 for s in quick.scenarios)


def test_unknown_suite_lists_the_built_in_ones():
    with pytest.raises(UserError, match=r"built in: ([\w-]+, )*quick, study"):
        load_suite("nosuch")


def test_parse_step():
    assert parse_step("grow 1G", "x").delta == 1 << 30
    assert parse_step("settle 2.5s", "x").seconds == 2.5
    assert parse_step("free 10s", "x").kind == "free"
    assert parse_step("oom 2500M", "x").size == 2500 << 20
    assert str(parse_step("reboot", "x")) == "reboot"
    with pytest.raises(UserError, match="bad step 'reboot now'"):
        parse_step("reboot now", "x")


def test_free_needs_a_workload():
    text = GOOD.replace(
        'steps = ["shrink 256M", "settle 1s", "grow 256M"]', 'steps = ["shrink 256M", "free 2s"]'
    )
    with pytest.raises(UserError, match="'free' step needs a workload"):
        load_suite_text(text, "t.toml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "a"', 'name = "../../etc/cron.d/x"'), "name '../../etc/cron.d/x' must be"),
        (('name = "a"', 'name = "$(touch /tmp/pwned)"'), "must be 1-64 letters"),
        (('name = "a"', 'name = "a; reboot"'), "must be 1-64 letters"),
        (('name = "a"', 'name = ".hidden"'), "must be 1-64 letters"),
        (('name = "t"', 'name = "../t"'), "suite name '../t' must be"),
        (
            ('mechanism = "virtio-mem"', 'mechanism = "virtio-mem"\nkernel_args = ["a b"]'),
            "kernel argument 'a b' must be one word",
        ),
        (
            (
                'mechanism = "virtio-mem"',
                'mechanism = "virtio-mem"\nkernel_args = ["x\\ninit=/bin/sh"]',
            ),
            "must be one word",
        ),
        (
            ('mechanism = "virtio-mem"', 'mechanism = "virtio-mem"\nkernel_args = ["$(reboot)"]'),
            "must be one word",
        ),
        (('workload = "stress"', 'workload = "stress; reboot"'), "unknown workload"),
        (('"settle 1s"', '"settle 1s; reboot"'), "bad step"),
        (('"shrink 256M"', '"shrink $(reboot)"'), "malformed"),
        (('mechanism = "virtio-mem"', 'mechanism = "virtio-mem"\nvariant = "`id`"'), "variant"),
        (('memory = "1G"', 'memory = "1G\\nreboot"'), "malformed"),
    ],
)
def test_hostile_values_are_refused_before_they_reach_a_file_name_or_the_guest(change, message):
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("$", r"\$")):
        load_suite_text(text, "t.toml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[defaults]", "[defaults]\ndeadline = 0"), "deadline must be a positive number"),
        (("[defaults]", "[defaults]\ndeadline = nan"), "deadline must be a positive number"),
        (("[defaults]", "[defaults]\ndeadline = inf"), "deadline must be a positive number"),
        (("[defaults]", "[defaults]\ncpus = 0"), "cpus must be at least 1"),
        (('"shrink 256M"', '"shrink 0"'), "must be greater than zero"),
        (('memory = "1G"', 'memory = "0"'), "must be greater than zero"),
        (('memory = "1G"', 'memory = "-5G"'), "malformed"),
        (('memory = "1G"', 'memory = ""'), "malformed"),
        (('workload_size = "50%"', 'workload_size = "1G"'), "not below the guest's memory"),
        (('workload_size = "50%"', 'workload_size = "0%"'), "between 0 and 100"),
        (("[defaults]", '[defaults]\nmaxmem = "900M"'), "steps need 1G but maxmem is 900M"),
        (("[defaults]", '[defaults]\ndimm_size = "100M"'), ""),  # unused by these mechanisms
        (("seed = 7", "seed = true"), "seed must be an integer"),
    ],
)
def test_zero_and_out_of_range_values(change, message):
    text = GOOD.replace(*change)
    assert text != GOOD
    if not message:
        load_suite_text(text, "t.toml")
        return
    with pytest.raises(UserError, match=message):
        load_suite_text(text, "t.toml")


def test_more_dimms_than_slots_and_a_grow_past_the_plan_are_refused_before_qemu():
    from dynamem.mechanisms import Dimm

    mech = Dimm()
    mech = mech.with_plan(mech.plan(GiB, 256 << 20, None, None))  # room for 2 DIMMs

    class NoQemu:
        def qmp(self, *a, **k):
            raise AssertionError("QEMU must not be asked")

        qmp_args = qmp

    with pytest.raises(UserError, match="no free DIMM slot: 0 of 2 in use, 3 more asked for"):
        mech.request(NoQemu(), 384 << 20, 0)
    with pytest.raises(UserError, match="only 0 DIMMs are plugged; cannot unplug 1"):
        mech.request(NoQemu(), -(128 << 20), 0)


def test_inject_is_only_read_with_the_switch(monkeypatch):
    text = GOOD.replace(
        'mechanism = "virtio-mem"', 'mechanism = "virtio-mem"\ninject = "panic@step0"'
    )
    monkeypatch.delenv("DYNAMEM_FAULT_INJECTION", raising=False)
    with pytest.raises(UserError, match="unknown key 'inject'"):
        load_suite_text(text, "t.toml")
    monkeypatch.setenv("DYNAMEM_FAULT_INJECTION", "1")
    assert str(load_suite_text(text, "t.toml").scenarios[0].inject) == "panic@step0"
    for bad, message in [
        ("panic@step3", "the scenario has 3 steps"),
        ("meteor@step0", "bad inject 'meteor@step0'"),
        ("panic@workload", "only workload-stuck goes @workload"),
        ("no-converge@step0", "implemented for the balloon"),
    ]:
        with pytest.raises(UserError, match=message):
            load_suite_text(text.replace("panic@step0", bad), "t.toml")


def test_new_scenario_keys_touch_no_progress_cpu_model_and_reproduces():
    text = GOOD.replace(
        'mechanism = "virtio-mem"',
        'mechanism = "virtio-mem"\ntouch = "50%"\nno_progress = 200\ncpu_model = "qemu64"\n'
        'reproduces = "hyperalloc"',
    )
    s = load_suite_text(text, "t.toml").scenarios[0]
    assert s.touch == s.memory // 2 and s.no_progress == 200 and s.cpu_model == "qemu64"
    assert s.mechanism_object().no_progress_s == 200 and s.reproduces == "hyperalloc"
    cond = s.condition("tcg")
    assert cond.cpu_model == "qemu64" and cond.touch == s.touch
    assert s.mechanism_config().no_progress_s == 200
    for bad, message in [
        ("no_progress = -1", "no_progress must be a positive number"),
        ('cpu_model = "max;reboot"', "cpu_model 'max;reboot' must be one word"),
        ('reproduces = "squeezy"', "reproduces 'squeezy' is not one of hyperalloc"),
        ('touch = "2G"', "touch 2G is not below the guest's memory"),
    ]:
        with pytest.raises(UserError, match=message):
            load_suite_text(
                GOOD.replace('mechanism = "virtio-mem"', f'mechanism = "virtio-mem"\n{bad}'),
                "t.toml",
            )


def test_the_condition_defaults_the_cpu_model_by_accelerator():
    s = load_suite_text(GOOD, "t.toml").scenarios[0]
    assert s.condition("tcg").cpu_model == "qemu64" and s.condition("kvm").cpu_model == "host"


def test_the_deterministic_mode_is_its_own_condition_with_one_vcpu():
    s = load_suite_text(GOOD, "t.toml").scenarios[0]
    icount, tcg = s.condition("tcg-icount"), s.condition("tcg")
    assert (icount.cpus, icount.accel, icount.cpu_model) == (1, "tcg-icount", "qemu64")
    assert tcg.cpus == 2 and icount.describe() != tcg.describe()
    assert "tcg-icount" in icount.describe() and "1 vCPU;" in icount.describe()


def test_the_control_arm_twins_every_scenario_and_survives_a_resume():
    from dynamem.runner import suite_of
    from dynamem.scenario import with_control_arm

    suite = with_control_arm(load_suite_text(GOOD, "t.toml"))
    names = {s.name: s.observer for s in suite.scenarios}
    assert names == {"a": "adaptive", "a-minimal": "minimal", "b": "adaptive",
                     "b-minimal": "minimal"}  # fmt: skip
    twin = next(s for s in suite.scenarios if s.name == "b-minimal")
    plain = next(s for s in suite.scenarios if s.name == "b")
    assert twin.condition("tcg").describe().replace("observer minimal", "observer adaptive") == (
        plain.condition("tcg").describe()
    )
    order = [c.id for c in cells_in_order(suite, 7)]
    assert len(order) == 8
    # The arm and its control are shuffled together, not run as two blocks.
    first_half = {i.rsplit("-r", 1)[0].endswith("-minimal") for i in order[:4]}
    assert first_half == {True, False}

    from dataclasses import replace

    from .records import run_record

    stored = replace(run_record(order, toml=suite.source), seed=7)
    assert [s.name for s in suite_of(stored).scenarios] == [s.name for s in suite.scenarios]
    with pytest.raises(UserError, match="control_arm must be true or false"):
        load_suite_text('control_arm = "yes"\n' + GOOD, "t.toml")


def test_a_repeats_override_survives_a_resume():
    from dataclasses import replace

    from dynamem.runner import suite_of
    from dynamem.scenario import with_repeats

    from .records import run_record

    suite = with_repeats(with_repeats(load_suite_text(GOOD, "t.toml"), 5), 3)
    assert suite.repeats == 3 and {s.repeats for s in suite.scenarios} == {3}
    order = [c.id for c in cells_in_order(suite, 7)]
    assert len(order) == 6
    stored = replace(run_record(order, toml=suite.source), seed=7)
    assert sorted(c.id for c in cells_in_order(suite_of(stored), 7)) == sorted(order)
