"""The observer on real guests: what it records, what the control arm leaves out, and equal
starting points across mechanisms."""

import pytest

from dynamem import mechanisms
from dynamem.cell import plan_for
from dynamem.observer import ADAPTIVE, MINIMAL
from dynamem.parsers import parse_meminfo
from dynamem.qemu.machine import VM
from dynamem.resize import kernel_log, resize
from dynamem.units import GiB, MiB

pytestmark = pytest.mark.slow


def test_every_mechanism_starts_from_the_same_memtotal(image, run_base):
    """A "1G" guest is the same guest whichever mechanism resizes it: hotplug-capable guests
    used to lose 64 MiB to the SWIOTLB bounce buffer (QEMU's hotplug area is above 4 GiB)."""
    memtotal = {}
    for name in ("balloon", "dimm", "virtio-mem"):
        mech = mechanisms.make(name)
        mplan = mech.plan(GiB, -256 * MiB, None, None)
        mech = mech.with_plan(mplan)
        with VM(plan_for(mech, mplan).config) as vm:
            vm.start()
            if mplan.prepare:
                assert resize(vm, mech, mplan.prepare).outcome == "ok"
            meminfo = vm.sampler.snapshot(["/proc/meminfo"])["/proc/meminfo"]
            memtotal[name] = parse_meminfo(meminfo)["MemTotal"]
            assert not [line for line in kernel_log(vm) if "software IO TLB: mapped" in line]
    assert max(memtotal.values()) / min(memtotal.values()) - 1 < 0.01, memtotal


def test_the_adaptive_observer_records_its_schedule_bounds_and_cost(image, run_base):
    mech = mechanisms.make("virtio-mem")
    mplan = mech.plan(GiB, 256 * MiB, None, None)
    mech = mech.with_plan(mplan)
    with VM(plan_for(mech, mplan).config) as vm:
        vm.start()
        grow = resize(vm, mech, 256 * MiB)
        shrink = resize(vm, mech, -256 * MiB)
    for r in (grow, shrink):
        assert r.outcome == "ok", r.message
        assert r.observer == "adaptive" and r.observer_config == ADAPTIVE.describe()
        assert r.cpu_model == vm.config.cpu_model
        # late, never early: the bound covers the gap between the two looks around the change
        assert r.guest_bound_s is not None and r.guest_look_gap_s is not None
        assert r.guest_bound_s >= r.guest_look_gap_s > 0
        assert r.host_bound_s is not None and 0 < r.host_bound_s <= r.host_latency_s
        assert r.channel_rtt_n == 20 and r.channel_rtt_p95_s is not None
        # looks that changed nothing are not sent
        assert r.sampler_checks is not None and 0 < r.samples <= r.sampler_checks
        assert r.sampler_request_cpu_s is not None and r.sampler_request_cpu_s > 0
        assert r.guest_reaction_s is not None and r.guest_reaction_s <= r.guest_latency_s
    # plugging and unplugging whole memory blocks announces them: the sampler woke for them
    # (a uevent's look is sent only if a timer look just before it did not see the change)
    assert grow.sampler_uevent_looks and shrink.sampler_uevent_looks
    for r in (grow, shrink):
        assert r.sampler_uevent_checks is not None
        assert r.sampler_uevent_checks <= r.sampler_uevent_looks <= r.sampler_checks
    # the guest's tracer stamped where the driver's work started and the last block changed
    for r in (grow, shrink):
        assert r.guest_looks_from == "request" and r.guest_driver_end == "kernel"
        assert "virtio_mem_config_changed" in r.guest_driver_trace[0]
        assert "memory_notify" in r.guest_driver_trace[1]
        # on the guest's clock, from the driver's entry after the request; it may end a
        # little after the look that saw the final MemTotal (watermarks are recomputed first)
        assert r.guest_driver_s is not None and r.guest_driver_s > 0


def test_a_dimm_grow_is_watched_in_the_guest_from_the_host_side_outcome_on(image, run_base):
    mech = mechanisms.make("dimm")
    mplan = mech.plan(GiB - 256 * MiB, 256 * MiB, None, None)
    mech = mech.with_plan(mplan)
    with VM(plan_for(mech, mplan).config) as vm:
        vm.start()
        mark = vm.sampler.mark()
        r = resize(vm, mech, 256 * MiB)
        arrivals = [s.arrival_ns for s in vm.sampler.samples[mark:]]
    assert r.outcome == "ok", r.message
    assert r.guest_looks_from == "outcome"
    assert r.t_request_ns is not None and r.t_host_done_ns is not None
    assert not [t for t in arrivals if r.t_request_ns < t < r.t_host_done_ns]
    # the guest's work came after: still timed, bounded from the last look before the request
    assert r.guest_latency_s is not None and r.guest_latency_s > r.host_latency_s
    assert r.guest_look_gap_s is not None and r.guest_bound_s >= r.guest_look_gap_s > 0
    assert r.guest_driver_end == "kernel" and r.guest_driver_s is not None
    assert "acpi_hotplug_schedule" in r.guest_driver_trace[0]


def test_the_control_arm_leaves_the_guest_alone_until_the_host_side_outcome(image, run_base):
    mech = mechanisms.make("balloon")
    mplan = mech.plan(GiB, -256 * MiB, None, None)
    mech = mech.with_plan(mplan)
    with VM(plan_for(mech, mplan).config) as vm:
        vm.start()
        mark = vm.sampler.mark()
        r = resize(vm, mech, -256 * MiB, observer="minimal")
        arrivals = [s.arrival_ns for s in vm.sampler.samples[mark:]]
    assert r.outcome == "ok", r.message
    assert r.observer == "minimal" and r.observer_config == MINIMAL.describe()
    assert r.host_latency_s is not None and r.guest_latency_s is None
    assert r.guest_memtotal_delta_bytes is not None and r.guest_memtotal_delta_bytes < 0
    assert r.t_request_ns is not None and r.t_host_done_ns is not None
    assert not [t for t in arrivals if r.t_request_ns < t < r.t_host_done_ns]
