"""The pure parts of dynamem's own benchmarks: arm order, paired ratios, the bare poll."""

import pytest

from dynamem.bareqmp import poll_until
from dynamem.observer import Backoff
from dynamem.selfbench import (
    ARMS_BARE,
    ResizeBench,
    _arm_order,
    mechanism_ratio_lines,
    median_ratio,
    resize_lines,
)


def test_two_arms_alternate_abba():
    orders = [_arm_order(["bare", "adaptive"], i) for i in range(4)]
    assert orders == [
        ["bare", "adaptive"],
        ["adaptive", "bare"],
        ["adaptive", "bare"],
        ["bare", "adaptive"],
    ]


def test_every_arm_goes_first_equally_often():
    arms = ["bare", "adaptive", "minimal"]
    firsts = [_arm_order(arms, i)[0] for i in range(6)]
    assert sorted(firsts) == sorted(arms * 2)


def test_median_ratio_states_the_real_level_of_its_interval():
    five = median_ratio([1.2, 0.9, 1.0, 1.1, 1.05])
    assert five.median == 1.05 and (five.low, five.high) == (0.9, 1.2)
    assert five.level == pytest.approx(1 - 2 / 2**5)  # min..max of 5 is a 93.75% interval
    ten = median_ratio([1.0 + k / 100 for k in range(10)])
    assert (ten.low, ten.high) == (1.01, 1.08) and ten.level > 0.95


def bench(mechanism, bare_shrinks, dyn_shrinks, guest=None):
    n = len(bare_shrinks)
    return ResizeBench(
        mechanism, "stress", 512 << 20, "qemu64",
        host={
            ARMS_BARE: {"shrink": bare_shrinks, "grow": [0.1] * n},
            "adaptive": {"shrink": dyn_shrinks, "grow": [0.1] * n},
        },
        guest={"adaptive": {"shrink": guest or dyn_shrinks, "grow": [0.1] * n}},
        bounds={"adaptive": [0.03] * (2 * n)},
        targets={"adaptive": [0.02] * (2 * n)},
        sampler_share={"adaptive": [0.04] * (2 * n)},
        loads=[1.0] * n,
    )  # fmt: skip


def test_paired_ratios_pair_each_repeat():
    b = bench("balloon", [1.0, 2.0, 4.0], [1.1, 2.2, 4.4])
    assert b.paired_ratios("adaptive", "shrink") == pytest.approx([1.1, 1.1, 1.1])
    assert b.ratio("adaptive", "shrink").median == pytest.approx(1.1)
    text = "\n".join(resize_lines(b))
    assert "dynamem / bare = 1.100" in text and "ABOVE 1.05" in text
    assert "within max(5 ms, 1% of latency) in 0/6" in text


def test_the_mechanism_ratio_is_compared_with_the_bare_scripts():
    vm = bench("virtio-mem", [2.0, 2.2, 2.4], [2.1, 2.3, 2.5])
    bal = bench("balloon", [3.0, 3.2, 3.4], [3.0, 3.3, 3.5])
    lines = mechanism_ratio_lines([vm, bal])
    assert lines[0] == "virtio-mem / balloon shrink: bare QMP script 0.688"
    assert "dynamem (adaptive, host-side): 0.697 against the bare script's 0.688: 1.014" in lines[1]
    assert lines[1].endswith("within 10%")
    assert not any("guest's clock" in line for line in lines)  # no windows in this run
    for b in (vm, bal):
        b.window = {ARMS_BARE: {"shrink": [1.0, 1.0, 1.0]}, "adaptive": {"shrink": [1.0, 1.0, 1.0]}}
    vm.window["adaptive"]["shrink"] = [1.3, 1.3, 1.3]
    last = mechanism_ratio_lines([vm, bal])[-1]
    assert "guest's clock): 1.300 against the bare script's 1.000: 1.300" in last
    assert last.endswith("NOT within 10%")
    assert mechanism_ratio_lines([vm]) == []


def test_the_bare_poll_returns_when_true_and_gives_up_at_its_deadline():
    answers = iter([False, False, True])
    assert poll_until(lambda: next(answers), Backoff(0.001, 0.001)) > 0
    with pytest.raises(TimeoutError, match="deadline"):
        poll_until(lambda: False, Backoff(0.001, 0.001), deadline=0.0)


def test_guest_clock_windows_are_compared_pairwise_when_every_arm_has_them():
    b = bench("virtio-mem", [2.0, 2.2, 2.4], [2.1, 2.3, 2.5])
    assert b.window_ratio("adaptive", "shrink") is None  # not read in this run
    b.window = {
        ARMS_BARE: {"shrink": [1.0, 2.0, 3.0]},
        "adaptive": {"shrink": [1.02, 2.02, 3.06]},
    }
    r = b.window_ratio("adaptive", "shrink")
    assert r is not None and r.median == pytest.approx(1.02) and r.n == 3
    assert "on the guest's clock = 1.020" in "\n".join(resize_lines(b))


def test_an_idle_guest_clock_in_icount_mode_is_not_compared():
    b = bench("virtio-mem", [2.0, 2.2, 2.4], [2.1, 2.3, 2.5])
    b.window = {ARMS_BARE: {"shrink": [1.0, 2.0, 3.0]}, "adaptive": {"shrink": [1.0, 2.0, 3.0]}}
    b.icount, b.workload = True, "idle"
    assert b.window_ratio("adaptive", "shrink") is None
    b.workload = "stress"
    assert b.window_ratio("adaptive", "shrink") is not None


def test_determinism_lines_give_both_spreads_and_the_perturbation_ratio():
    from dynamem.determinism import DeterminismBench, cv, determinism_lines

    b = DeterminismBench("virtio-mem", 256 << 20, (), "tcg-icount", ("adaptive", "sparse"))
    for k in range(5):  # five fresh boots
        for arm, scale in (("adaptive", 1.02), ("sparse", 1.0)):
            for d in ("shrink", "grow"):
                b.add(b.guest_clock, arm, d, 0.2 * scale * (1 + 0.001 * k))
                b.add(b.wall, arm, d, 1.0 + 0.1 * k)
                b.add(b.sampler_cpu, arm, d, 0.0005)
                b.add(b.sampler_window, arm, d, 0.1)
    merged = b
    assert len(merged.guest_clock["adaptive"]["shrink"]) == 5
    assert cv([1.0]) != cv([1.0])  # nan for one value
    text = "\n".join(determinism_lines(merged))
    assert "CV  0.16% (n=5)" in text and "CV 13.18%" in text
    assert "adaptive/sparse shrink guest-clock ratio 1.0200 [1.0200, 1.0200] 94% (n=5): " in text
    assert "within 5%" in text and "0.50 M instr), 0.50% of the window: x1.0050" in text
