"""Suite files: a valid plan or a one-line error naming the problem, nothing else."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamem.errors import UserError
from dynamem.runner import cells_in_order, estimate_cell_s
from dynamem.scenario import load_suite, load_suite_text, parse_step

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
    with pytest.raises(UserError, match=r"built in: (\w+, )*quick, study"):
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


values = st.one_of(
    st.text(max_size=8),
    st.integers(-5, 1 << 33),
    st.booleans(),
    st.lists(st.text(max_size=6), max_size=3),
)
keys = st.sampled_from(
    [
        "name",
        "mechanism",
        "variant",
        "memory",
        "steps",
        "workload",
        "workload_size",
        "cpus",
        "swap",
        "repeats",
        "dimm_size",
        "bogus",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_random_scenarios_give_a_plan_or_a_clean_error(entry):
    import tomllib

    import tomli_w

    text = tomli_w.dumps({"scenario": [entry]})
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    try:
        load_suite_text(text, "random.toml")
    except UserError as exc:
        assert "\n" not in str(exc)
