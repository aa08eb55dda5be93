"""What a resize costs, measured on real guests: migration, host RSS, watermarks, indices."""

import pytest

from dynamem import mechanisms
from dynamem.cell import plan_for
from dynamem.probes.guestmem import (
    fragmentation_index_milli,
    parse_buddyinfo,
    parse_extfrag,
    unusable_index_milli,
)
from dynamem.qemu.machine import VM
from dynamem.resize import resize
from dynamem.units import GiB, MiB
from dynamem.workloads import Stress, touch_and_free

pytestmark = pytest.mark.slow


def boot(mech, before, delta, **vm_options):
    """(a started VM, the mechanism bound to its memory plan)."""
    mplan = mech.plan(before, delta, None, None)
    mech = mech.with_plan(mplan)
    vm = VM(plan_for(mech, mplan, **vm_options).config)
    vm.start()
    if mplan.prepare:
        assert resize(vm, mech, mplan.prepare).outcome == "ok"
    return vm, mech


def test_fragmentation_indices_match_the_kernels_own(image, run_base):
    with VM(
        plan_for(mechanisms.Balloon(), mechanisms.Balloon().plan(GiB, -MiB, None, None)).config
    ) as vm:
        vm.start()
        files = [
            "/proc/buddyinfo",
            "/sys/kernel/debug/extfrag/unusable_index",
            "/sys/kernel/debug/extfrag/extfrag_index",
            "/proc/buddyinfo",
        ]
        for _ in range(5):  # buddyinfo must not move between the reads
            snap = vm.sampler.snapshot(files)
            if (
                snap["/proc/buddyinfo"]
                == vm.sampler.snapshot(["/proc/buddyinfo"])["/proc/buddyinfo"]
            ):
                break
        buddy = parse_buddyinfo(snap["/proc/buddyinfo"])
        unusable = parse_extfrag(snap["/sys/kernel/debug/extfrag/unusable_index"])
        extfrag = parse_extfrag(snap["/sys/kernel/debug/extfrag/extfrag_index"])
        ours_u, ours_f = unusable_index_milli(buddy.counts), fragmentation_index_milli(buddy.counts)
        assert set(unusable) == set(buddy.zones)
        for i, zone in enumerate(buddy.zones):
            assert ours_u[i].tolist() == unusable[zone], zone
            assert ours_f[i].tolist() == extfrag[zone], zone


def test_virtio_mem_shrink_migrates_under_stress_and_not_when_idle(image, run_base):
    mech = mechanisms.VirtioMem("sbm")
    step = 256 * MiB
    vm, mech = boot(mech, 2 * GiB, -step)
    with vm:
        for delta in (-step, step):  # warm-up: the first plug's housekeeping is not the resize
            assert resize(vm, mech, delta).outcome == "ok"
        idle = resize(vm, mech, -step)
        assert idle.outcome == "ok"
        assert idle.cost.guest is not None and idle.cost.guest.pages_migrated == 0
        assert resize(vm, mech, step).outcome == "ok"
        stress = Stress(int(0.6 * 2 * GiB))
        stress.start(vm)
        busy = resize(vm, mech, -step)
        stress.stop(vm)
        assert busy.outcome == "ok", busy.message
        g = busy.cost.guest
        assert g is not None and g.pages_migrated > 0
        assert g.oom_kills == 0
        # the migration shows in the time series too (sampled inside the figure's window)
        series = busy.series["full_pgmigrate_success"]
        assert 0 < series[-1] - series[0] <= g.pages_migrated


@pytest.mark.parametrize(
    "mech",
    [mechanisms.Balloon(), mechanisms.VirtioMem("sbm"), mechanisms.Dimm()],
    ids=["balloon", "virtio-mem", "dimm"],
)
def test_host_gets_touched_memory_back_and_watermarks_are_measured(image, run_base, mech):
    step = 512 * MiB
    vm, mech = boot(mech, 2 * GiB, -step)
    with vm:
        for delta in (-step, step):
            assert resize(vm, mech, delta).outcome == "ok"
        touch_and_free(vm, int(0.75 * 2 * GiB))
        r = resize(vm, mech, -step)
        assert r.outcome == "ok", r.message
        host, guest = r.cost.host, r.cost.guest
        assert host is not None and guest is not None
        assert host.rss_reclaimed_bytes >= 0.9 * step, host
        assert host.rss_settle_s is not None
        marks = guest.watermarks
        dma32 = marks["Node0/DMA32"]
        if mech.name == "balloon":
            # Inflating adjusts managed pages only; min/low/high are not recomputed.
            assert dma32.managed[1] < dma32.managed[0]
            assert not any(guest.watermarks_moved.values())
        else:
            # Offlining whole blocks recomputes every zone's watermarks.
            assert list(marks["Node0/Movable"].managed) == [step // 4096, 0]
            assert dma32.min[1] != dma32.min[0]
            assert guest.watermarks_moved["Node0/DMA32"]
        assert len(r.series["host_rss_kb"]) > 10
        # full records back off with time: the figures get the state before the request,
        # during the change and after it settled
        full = r.series["full_t_ns"]
        assert len(full) >= 3 and full[0] <= r.t_request_ns
        assert r.t_guest_done_ns is not None and full[-1] >= r.t_guest_done_ns


@pytest.mark.parametrize("swap", ["disk", "zram"])
def test_guest_swap(image, run_base, swap):
    mech = mechanisms.Balloon()
    with VM(
        plan_for(mech, mech.plan(GiB, -MiB, None, None), swap=swap, swap_size=256 * MiB).config
    ) as vm:
        vm.start()
        swaps = vm.run(["cat", "/proc/swaps"]).stdout
        device = "/dev/vda" if swap == "disk" else "/dev/zram0"
        assert device in swaps
        total = int(vm.run(["grep", "SwapTotal", "/proc/meminfo"]).stdout.split()[1])
        assert 250 * 1024 <= total <= 256 * 1024
