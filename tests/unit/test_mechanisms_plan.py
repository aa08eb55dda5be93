"""Memory plans and request checks: everything refused before QEMU is asked."""

import pytest

from dynamem.errors import UserError
from dynamem.mechanisms import Balloon, CapabilityLimit, Dimm, VirtioMem, make
from dynamem.units import GiB, MiB


def test_balloon_shrink_inflates_from_boot_ram():
    plan = Balloon().plan(2 * GiB, -512 * MiB, None, None)
    assert (plan.boot, plan.before, plan.after, plan.prepare) == (2 * GiB, 2 * GiB, 1536 * MiB, 0)


def test_balloon_grow_above_boot_ram_is_a_capability_limit():
    with pytest.raises(CapabilityLimit, match="above its boot RAM 2G"):
        Balloon().plan(2 * GiB, 256 * MiB, None, None)


def test_balloon_grow_back_to_boot_ram_needs_a_prior_inflate():
    plan = Balloon().plan(1536 * MiB, 512 * MiB, 2 * GiB, None)
    assert plan.prepare == -512 * MiB and plan.after == 2 * GiB


def test_balloon_works_in_pages():
    with pytest.raises(UserError, match="granularity 4K"):
        Balloon().plan(2 * GiB, -1000, None, None)


def test_balloon_device_options():
    (flag, dev) = Balloon(deflate_on_oom=True).qemu_args(Balloon().plan(GiB, -MiB, None, None))
    assert flag == "-device" and "deflate-on-oom=on" in dev and "free-page-reporting=off" in dev
    assert Balloon(deflate_on_oom=True).guest_signal == "balloon"
    assert Balloon().guest_signal == "totalram"  # MemTotal moves without deflate-on-oom


def test_dimm_shrink_boots_small_and_plugs_first():
    mech = Dimm()
    plan = mech.plan(2 * GiB, -512 * MiB, None, None)
    assert plan.boot == 1536 * MiB and plan.prepare == 512 * MiB
    assert mech.memory_options(plan) == (2 * GiB, 4)


@pytest.mark.parametrize(
    ("before", "delta", "boot", "maxmem", "message"),
    [
        (2 * GiB, -100 * MiB, None, None, "not a multiple of the dimm granularity 128M"),
        (2 * GiB, -512 * MiB, 2 * GiB, None, "cannot go below boot RAM"),
        (2 * GiB, 512 * MiB, None, 2 * GiB, "maxmem is 2G"),
        (GiB, 40 * GiB, None, None, "at most 256"),
    ],
)
def test_dimm_bad_requests(before, delta, boot, maxmem, message):
    with pytest.raises(UserError, match=message):
        Dimm().plan(before, delta, boot, maxmem)


def test_dimm_size_must_be_whole_memory_blocks():
    with pytest.raises(UserError, match="memory block size 128M"):
        Dimm(dimm_size=64 * MiB)


def test_virtio_mem_variants_and_granularity():
    assert VirtioMem("sbm").granularity == 2 * MiB
    assert VirtioMem("bbm").granularity == 128 * MiB
    with pytest.raises(UserError, match="not a multiple of the virtio-mem/bbm granularity 128M"):
        VirtioMem("bbm").plan(2 * GiB, -64 * MiB, None, None)
    with pytest.raises(UserError, match="unknown virtio-mem variant"):
        VirtioMem("xbm")


def test_virtio_mem_backend_and_command_line():
    mech = VirtioMem("sbm")
    plan = mech.plan(2 * GiB, 256 * MiB, None, None)
    assert plan.boot == 2 * GiB and mech.backend_size == 256 * MiB
    args = mech.qemu_args(plan)
    assert f"memory-backend-ram,id=vmem0,size={256 * MiB}" in args
    assert any(a.startswith("virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2097152") for a in args)
    assert mech.memory_options(plan) == (2 * GiB + 256 * MiB, 0)


def test_virtio_mem_request_above_the_backend_is_refused_before_qemu():
    mech = VirtioMem("sbm")
    mech.plan(2 * GiB, 256 * MiB, None, None)

    class NoQemu:
        def qmp(self, *a, **k):
            raise AssertionError("QEMU must not be asked")

    with pytest.raises(UserError, match="outside 0..256M"):
        mech.request(NoQemu(), 512 * MiB, 0)


def test_make_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown mechanism 'ballon'"):
        make("ballon")
    with pytest.raises(UserError, match="no variant"):
        make("dimm", "bbm")
