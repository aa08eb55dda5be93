"""Each mechanism grows and shrinks a real guest; the guest's own view is checked."""

import pytest

from dynamem import mechanisms
from dynamem.cell import plan_for
from dynamem.qemu.machine import VM
from dynamem.resize import resize
from dynamem.units import GiB, MiB

pytestmark = pytest.mark.slow

STEP = 256 * MiB


def booted(mech, before=2 * GiB, delta=-STEP, **vm_options):
    """(a started VM, the mechanism bound to its memory plan)."""
    mplan = mech.plan(before, delta, None, None)
    mech = mech.with_plan(mplan)
    vm = VM(plan_for(mech, mplan, **vm_options).config)
    vm.start()
    if mplan.prepare:
        prep = resize(vm, mech, mplan.prepare)
        assert prep.outcome == "ok", prep
    return vm, mech


def check_exact(result, requested):
    assert result.outcome == "ok", result.message
    assert result.requested_bytes == requested
    assert result.host_done_bytes == requested
    # Hotplug mechanisms and the balloon (without deflate-on-oom) move MemTotal exactly.
    assert result.guest_memtotal_delta_bytes == requested
    assert result.host_latency_s is not None and result.host_latency_s > 0
    assert result.guest_latency_s is not None and result.guest_bound_s is not None
    assert result.guest_bound_s > 0 and result.samples > 0


@pytest.mark.parametrize(
    "mech",
    [
        mechanisms.Balloon(),
        mechanisms.Dimm(),
        mechanisms.VirtioMem("sbm"),
        mechanisms.VirtioMem("bbm"),
    ],
    ids=["balloon", "dimm", "virtio-mem-sbm", "virtio-mem-bbm"],
)
def test_shrink_then_grow_is_exact_in_the_guest(image, run_base, mech):
    vm, mech = booted(mech)
    with vm:
        shrink = resize(vm, mech, -STEP)
        check_exact(shrink, -STEP)
        grow = resize(vm, mech, STEP)
        check_exact(grow, STEP)
        if mech.name == "balloon":
            assert shrink.guest_balloon_delta_bytes == STEP
            assert grow.guest_balloon_delta_bytes == -STEP
        else:
            # Hotplugged memory appears as whole movable memory blocks.
            assert grow.memory_blocks_after.get("online:Movable", 0) == (
                shrink.memory_blocks_before.get("online:Movable", 0)
            )
            assert shrink.memory_blocks_after.get("online:Movable", 0) < (
                shrink.memory_blocks_before.get("online:Movable", 0)
            )
        if mech.name == "virtio-mem":
            boot_log = "\n".join(vm.run(["dmesg"]).stdout.splitlines())
            expected = "0x200000" if mech.variant == "sbm" else "0x8000000"
            assert f"device block size: {expected}" in boot_log


def test_deflate_on_oom_balloon_leaves_memtotal_alone(image, run_base):
    mech = mechanisms.Balloon(deflate_on_oom=True)
    vm, mech = booted(mech)
    with vm:
        r = resize(vm, mech, -STEP)
        assert r.outcome == "ok", r.message
        assert r.guest_memtotal_delta_bytes == 0
        assert r.guest_balloon_delta_bytes == STEP
        assert r.guest_latency_s is not None


def test_balloon_grow_past_boot_ram_is_recorded_as_unsupported(image, run_base):
    mech = mechanisms.Balloon()
    vm, mech = booted(mech)
    with vm:
        r = resize(vm, mech, STEP)
        assert r.outcome == "unsupported"
        assert "above its boot RAM" in r.message
        assert r.host_done_bytes == 0 and r.guest_memtotal_delta_bytes == 0
        assert vm.run(["true"]).ok


def test_dimm_unplug_refused_by_a_guest_that_onlined_it_as_kernel_memory(image, run_base):
    mech = mechanisms.Dimm()
    vm, mech = booted(mech, memhp_default_state="online_kernel")
    with vm:
        r = resize(vm, mech, -STEP, stall_s=10)
        assert r.outcome in ("refused", "partial"), r
        assert "refused the ACPI eject" in r.message
        assert r.host_done_bytes == r.guest_memtotal_delta_bytes  # what went, went in both
        assert abs(r.host_done_bytes) < STEP
        assert vm.run(["cat", "/proc/meminfo"]).ok  # the guest stays usable
