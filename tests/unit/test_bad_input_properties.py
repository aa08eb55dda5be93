"""Property-based bad input: random sizes, memory plans and whole suite files (TOML) give
either a valid result or a clean one-line UserError, never any other exception."""

import math
import tomllib

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamem import mechanisms
from dynamem.errors import UserError
from dynamem.runner import cells_in_order, estimate_cell_s
from dynamem.scenario import SCENARIO_KEYS, load_suite_text
from dynamem.units import MAX_SIZE, parse_size

HOSTILE = [
    "$(touch /tmp/pwned)",
    "`reboot`",
    "; reboot",
    "a'b\"c",
    "x\ny",
    "../../etc/passwd",
    "--",
    "*",
    " ",
    "",
    "\x00",
    "é",
]

size_like = st.from_regex(
    r"\A\s?[-+]?\d{0,25}(\.\d{0,6})?\s?[KMGTPXkmgt]?(i?[Bb])?\s?\Z", fullmatch=True
)
texts = st.one_of(size_like, st.text(max_size=12), st.sampled_from(HOSTILE))


def one_line(exc: UserError) -> None:
    assert "\n" not in str(exc) and str(exc)


@settings(max_examples=500, deadline=None)
@given(texts)
def test_a_size_is_a_positive_whole_number_of_bytes_or_a_clean_error(text):
    try:
        size = parse_size(text)
    except UserError as exc:
        one_line(exc)
        return
    assert isinstance(size, int) and 0 < size <= MAX_SIZE


sizes = st.one_of(
    st.integers(-(1 << 31), 1 << 41),
    st.integers(1, 64).map(lambda n: n << 27),  # whole 128 MiB blocks: the plans that work
    st.integers(1, 2048).map(lambda n: n << 21),
)


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from([*mechanisms.NAMES, "ballon"]),
    variant=st.sampled_from([None, "sbm", "bbm", "default", "xbm"]),
    before=sizes,
    deltas=st.lists(sizes, min_size=1, max_size=4),
    boot=st.one_of(st.none(), sizes),
    maxmem=st.one_of(st.none(), sizes),
    dimm_size=st.sampled_from([128 << 20, 256 << 20, 64 << 20, 0]),
)
def test_a_memory_plan_is_consistent_or_a_clean_error(
    name, variant, before, deltas, boot, maxmem, dimm_size
):
    try:
        mech = mechanisms.make(name, variant, dimm_size=dimm_size)
        plan = mech.plan_path(before, tuple(deltas), boot, maxmem, strict=True)
    except UserError as exc:
        one_line(exc)
        return
    # A plan that is accepted can be run: every size on the path is positive, aligned and
    # within what the devices are sized for.
    assert plan.boot > 0 and min(plan.path) > 0
    assert all(d % mech.granularity == 0 for d in plan.deltas)
    if name == "balloon":
        assert max(plan.path) <= plan.boot
    else:
        assert plan.boot <= min(plan.path) and max(plan.path) <= plan.boot + plan.capacity
        max_mem, slots = mech.memory_options(plan)
        assert max_mem is not None and max_mem >= max(plan.path) and 0 <= slots <= 256


step_text = st.one_of(
    st.builds(
        "{} {}".format,
        st.sampled_from(["shrink", "grow", "settle", "free", "oom", "reboot", "wait"]),
        st.one_of(size_like, st.sampled_from(["1s", "2.5s", "0s", "-1s"]), texts),
    ),
    st.sampled_from(["reboot", "shrink 128M", "grow 256M", "settle 1s"]),
    texts,
)
values = st.one_of(
    texts,
    st.integers(-5, 1 << 33),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(step_text, max_size=4),
    st.lists(texts, max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
plausible = {
    "mechanism": st.sampled_from([*mechanisms.NAMES, "hotplug"]),
    "variant": st.sampled_from(["sbm", "bbm", "default", "$(reboot)"]),
    "memory": st.sampled_from(["1G", "2G", "512M", "0", "1X", "-5G", ""]),
    "steps": st.lists(step_text, max_size=4),
    "workload": st.sampled_from(["idle", "stress", "pagecache", "impact", "fio", "; reboot"]),
    "workload_size": st.sampled_from(["50%", "256M", "150%", "0%", "4G", "x%"]),
    "name": st.one_of(st.sampled_from(["a", "b-1", "x.y"]), texts),
    "kernel_args": st.lists(st.one_of(st.sampled_from(["quiet", "a=b"]), texts), max_size=3),
}
scenario_keys = st.sampled_from([*SCENARIO_KEYS, "bogus", "inject"])


@st.composite
def scenarios(draw):
    entry = draw(st.dictionaries(scenario_keys, values, max_size=6))
    for key, strategy in plausible.items():  # mostly well-formed, so deep checks are reached
        if draw(st.booleans()):
            entry[key] = draw(strategy)
    return entry


suites = st.fixed_dictionaries(
    {"scenario": st.lists(scenarios(), min_size=0, max_size=3)},
    optional={
        "name": st.one_of(st.sampled_from(["s", "quick"]), texts),
        "repeats": st.one_of(st.integers(-2, 4), texts),
        "seed": st.one_of(st.integers(), texts, st.booleans()),
        "defaults": st.one_of(scenarios(), st.integers()),
        "colour": texts,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suites)
def test_random_suite_files_give_a_plan_or_a_clean_error(data):
    try:
        text = tomli_w.dumps(data)
        tomllib.loads(text)
    except (ValueError, TypeError, tomllib.TOMLDecodeError):
        return  # not expressible as TOML (e.g. a NUL in a key): no suite file can say it
    try:
        suite = load_suite_text(text, "random.toml")
    except UserError as exc:
        one_line(exc)
        return
    # A valid plan: every scenario can be planned, estimated and named safely.
    cells = cells_in_order(suite, suite.seed)
    assert len(cells) == sum(s.repeats for s in suite.scenarios)
    for s in suite.scenarios:
        mech = s.mechanism_object()
        s.memory_plan(mech)
        assert math.isfinite(estimate_cell_s(s)) and 0 < s.deadline < math.inf
        assert "/" not in s.name and not s.name.startswith(".")
        assert all(" " not in a and "\n" not in a and "$" not in a for a in s.kernel_args)
        assert s.inject is None  # only with DYNAMEM_FAULT_INJECTION=1
