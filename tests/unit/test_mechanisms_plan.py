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
    assert plan.boot == 2 * GiB and plan.capacity == 256 * MiB
    args = mech.qemu_args(plan)
    assert f"memory-backend-ram,id=vmem0,size={256 * MiB}" in args
    assert any(a.startswith("virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2097152") for a in args)
    assert mech.memory_options(plan) == (2 * GiB + 256 * MiB, 0)


@pytest.mark.parametrize(
    ("delta", "region"),
    [(64 * MiB, 128 * MiB), (192 * MiB, 256 * MiB), (2 * MiB, 128 * MiB), (256 * MiB, 256 * MiB)],
)
def test_virtio_mem_region_holds_whole_memory_blocks(delta, region):
    """The guest plugs only inside whole 128 MiB memory blocks of the region: a 64 MiB
    region would plug nothing, a 192 MiB one at most 128 MiB. Regions are rounded up."""
    plan = VirtioMem("sbm").plan(GiB, delta, None, None)
    assert plan.capacity == region and plan.capacity % (128 * MiB) == 0


def test_virtio_mem_maxmem_without_room_for_whole_blocks_is_refused_before_boot():
    with pytest.raises(UserError, match="holds 0 whole 128M memory blocks .* the steps need 64M"):
        VirtioMem("sbm").plan(GiB, 64 * MiB, None, GiB + 100 * MiB)


def test_planning_never_changes_the_mechanism_and_binding_copies():
    mech = VirtioMem("sbm")
    before = dict(vars(mech))
    plan = mech.plan(2 * GiB, 256 * MiB, None, None)
    assert vars(mech) == before and mech.mplan is None
    bound = mech.with_plan(plan)
    assert bound is not mech and bound.mplan == plan and mech.mplan is None
    with pytest.raises(RuntimeError, match="has no memory plan"):
        mech.request(NoQemu(), 128 * MiB, 0)


class NoQemu:
    def qmp(self, *a, **k):
        raise AssertionError("QEMU must not be asked")

    qmp_args = qmp


def test_virtio_mem_request_above_the_backend_is_refused_before_qemu():
    mech = VirtioMem("sbm")
    mech = mech.with_plan(mech.plan(2 * GiB, 256 * MiB, None, None))
    with pytest.raises(UserError, match="outside 0..256M"):
        mech.request(NoQemu(), 512 * MiB, 0)


def test_no_progress_limit_per_mechanism_outlasts_virtio_mems_retry_timer():
    """Linux virtio-mem retries a busy unplug after 50 s, then 100 s later."""
    assert VirtioMem("sbm").no_progress_s > 150
    assert Balloon().no_progress_s == Dimm().no_progress_s == 30


def test_make_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown mechanism 'ballon'"):
        make("ballon")
    with pytest.raises(UserError, match="no variant"):
        make("dimm", "bbm")


# -- DIMM outcomes: what the guest said, and only about this request ---------------------------

from dynamem.mechanisms.dimm import event_refusal, ost_refusals  # noqa: E402
from dynamem.qemu.monitor import QMPCommandError  # noqa: E402


def ospm(device, status, source=3):
    return {"device": device, "slot": "0", "slot-type": "DIMM", "source": source,
            "status": status}  # fmt: skip


def test_an_ost_status_left_by_an_earlier_eject_is_not_a_refusal_of_this_one():
    before = {"dimm1": (3, 0x82)}  # the previous eject of dimm1 was refused
    statuses = [ospm("dimm1", 0x82), ospm("dimm0", 0x82)]
    # dimm1's status is unchanged since the request: not (yet) an answer to it.
    assert ost_refusals(statuses, ["dimm1", "dimm0"], before) == [("dimm0", 0x82)]
    assert ost_refusals([ospm("dimm1", 0x84)], ["dimm1"], {}) == []  # in progress: not a no


def test_acpi_device_ost_and_guest_error_events_are_refusals_only_for_pending_dimms():
    refused = {"event": "ACPI_DEVICE_OST", "data": {"info": ospm("dimm1", 0x82)}}
    assert event_refusal(refused, ["dimm1"]) == (
        "dimm1",
        "the guest refused the ACPI eject (_OST status 0x82)",
    )
    assert event_refusal(refused, ["dimm0"]) is None
    assert event_refusal({"event": "ACPI_DEVICE_OST", "data": {"info": ospm("dimm1", 0)}},
                         ["dimm1"]) is None  # fmt: skip
    err = {"event": "DEVICE_UNPLUG_GUEST_ERROR", "data": {"path": "/machine/peripheral/dimm2"}}
    assert event_refusal(err, ["dimm2"]) == ("dimm2", "the guest refused the ACPI eject")


class FakeDimmQemu:
    """QEMU's side of DIMM hotplug: device_add works `room` times, then fails."""

    def __init__(self, room: int) -> None:
        self.room, self.devices, self.objects = room, {}, set()

    def qmp_args(self, command, args):
        assert command == "object-add"
        self.objects.add(args["id"])

    def qmp(self, command, **args):
        if command == "device_add":
            if self.room == 0:
                raise QMPCommandError(command, "GenericError", "not enough space")
            self.room -= 1
            self.devices[args["id"]] = 128 * MiB
        elif command == "object-del":
            self.objects.discard(args["id"])
        elif command == "query-memory-devices":
            return [{"type": "dimm", "data": {"id": k, "size": v}} for k, v in self.devices.items()]
        return None


def test_a_multi_dimm_grow_that_stops_early_is_partial_not_refused():
    mech = Dimm()
    mech = mech.with_plan(mech.plan(GiB, 512 * MiB, None, None))
    qemu = FakeDimmQemu(room=2)
    req = mech.request(qemu, 512 * MiB, 0)
    progress = mech.poll(qemu, req)
    assert progress.done and progress.host_bytes == 256 * MiB != req.target
    assert progress.refused == ("DIMM 3 of 4: not enough space",)
    assert qemu.objects == {"dimm0-mem", "dimm1-mem"}  # the failed DIMM's backend is gone
    # The first device_add failing is a refusal of the whole request.
    mech = Dimm().with_plan(Dimm().plan(GiB, 256 * MiB, None, None))
    with pytest.raises(QMPCommandError):
        mech.request(FakeDimmQemu(room=0), 256 * MiB, 0)


def test_fault_injection_uses_the_after_request_hook_once():
    from dynamem.faults import Fault, Injector

    mech = Balloon()
    mech = mech.with_plan(mech.plan(GiB, -128 * MiB, None, None))
    injector = Injector(Fault("panic", 0))

    class Guest:
        def __init__(self):
            self.ran = []

        def qmp(self, *a, **k):
            return None

        def run(self, argv, timeout=60.0, check=True):
            self.ran.append(argv)

    vm = Guest()
    injector.before_step(0, vm, mech)
    assert len(mech.after_request) == 1 and not injector.fired
    mech.request(vm, -128 * MiB, GiB)
    assert injector.fired and mech.after_request == []
    assert len(vm.ran) == 1 and "sysrq-trigger" in " ".join(vm.ran[0])
    mech.request(vm, -128 * MiB, GiB)  # one shot: the next request is left alone
    assert len(vm.ran) == 1


def test_a_dimm_removed_after_its_eject_ended_is_forgotten_before_the_next_request():
    """An eject that completes after its request gave up (a slow guest) leaves the DIMM in
    the mechanism's list; the next request starts from what QEMU really has."""
    mech = Dimm().with_plan(Dimm().plan(GiB, -256 * MiB, None, None))
    qemu = FakeDimmQemu(room=2)
    mech.request(qemu, 256 * MiB, 0)
    assert set(qemu.devices) == {"dimm0", "dimm1"}
    qemu.devices.pop("dimm1")  # the guest finished ejecting it late
    qemu.room = 1
    mech._reconcile(qemu)
    assert mech._plugged == ["dimm0"] and "dimm1-mem" not in qemu.objects
    req = mech.request(qemu, 128 * MiB, 128 * MiB)  # one free slot again: not refused
    assert req.refused == [] and set(qemu.devices) == {"dimm0", "dimm2"}
