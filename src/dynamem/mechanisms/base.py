"""One interface for the three ways to resize a guest, so scenarios say "shrink by 512 MiB".

A mechanism knows what QEMU needs at boot (devices, maxmem/slots), checks a request before
QEMU is asked, sends it, and reports progress from QEMU's authoritative state. Timing,
guest observation and the result record live in `dynamem.resize`, shared by all three.
"""

import abc
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from dynamem.errors import UserError
from dynamem.units import format_size

if TYPE_CHECKING:
    from dynamem.qemu.machine import VM


class CapabilityLimit(UserError):
    """The mechanism cannot do this by design (e.g. a balloon growing past boot RAM).

    Inside a suite it becomes the outcome `unsupported`; `dynamem resize` exits 2.
    """


@dataclass(frozen=True)
class MemoryPlan:
    """Guest memory around a sequence of measured steps.

    `before` is the guest's size when the first measured step starts and `deltas` the
    steps (negative shrinks). Hotplug mechanisms boot at the lowest point of the path and
    plug the difference in an unmeasured preparation step; the balloon boots with its
    maximum and inflates down. The plan holds everything the devices need later (slots,
    backend size), so planning never changes the mechanism object.
    """

    boot: int
    before: int
    deltas: tuple[int, ...]
    capacity: int  # hot(un)pluggable bytes the devices are sized for (0 for the balloon)
    slots: int = 0  # DIMM slots

    @property
    def delta(self) -> int:
        """The first step (the only one for `dynamem resize`)."""
        return self.deltas[0]

    @property
    def path(self) -> list[int]:
        """Guest size before the first step and after each step."""
        sizes = [self.before]
        for d in self.deltas:
            sizes.append(sizes[-1] + d)
        return sizes

    @property
    def after(self) -> int:
        return self.path[-1]

    @property
    def prepare(self) -> int:
        """Unmeasured change from boot to `before` (positive: plug; negative: inflate)."""
        return self.before - self.boot

    @property
    def direction(self) -> str:
        return "grow" if self.delta > 0 else "shrink"


@dataclass
class Request:
    """What was asked of QEMU and what completion looks like on the host side."""

    target: int  # host-reported bytes that mean "done"
    start: int  # host-reported bytes before the request
    pending: list[str] = field(default_factory=list)  # e.g. DIMM ids awaiting deletion
    refused: list[str] = field(default_factory=list)  # reasons the guest or QEMU said no
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    host_bytes: int
    done: bool
    refused: tuple[str, ...] = ()


AfterRequest = Callable[["VM", Request], None]


class Mechanism(abc.ABC):
    """A mechanism's configuration, and once `with_plan` gave it a plan, its devices in one
    VM (DIMM ids plugged so far live here: one object per VM)."""

    name: ClassVar[str]
    # A resize whose host-side progress stalls this long ends (partial or timeout).
    no_progress_default_s: ClassVar[float] = 30.0

    def __init__(self) -> None:
        self.mplan: MemoryPlan | None = None
        self.no_progress_s = self.no_progress_default_s
        # Called with each request once QEMU has it: the seam fault injection uses.
        self.after_request: list[AfterRequest] = []

    def with_plan(self, plan: MemoryPlan) -> "Mechanism":
        """A copy of this mechanism bound to `plan`, with no devices plugged yet."""
        bound = copy.copy(self)
        bound.mplan = plan
        bound.after_request = []
        bound._fresh()
        return bound

    def _fresh(self) -> None:  # noqa: B027 - optional hook
        """Reset per-VM state in a newly bound copy."""

    def planned(self) -> MemoryPlan:
        if self.mplan is None:
            raise RuntimeError(f"{self.label} has no memory plan (use with_plan first)")
        return self.mplan

    @property
    def guest_signal(self) -> str:
        """What shows the resize inside the guest, sampled fast: "totalram" (MemTotal, from
        sysinfo, cheap) or "balloon" (pages in the balloon, from /proc/vmstat, costly)."""
        return "totalram"

    # The guest kernel function that first sees this mechanism's request: the guest's
    # function tracer stamps it on the guest's clock (the minimal guest's boot script
    # traces these), so a guest-side duration can start where the guest's work starts.
    # "" for none.
    driver_entry: ClassVar[str] = ""
    # ... and the function whose last call in a resize ends the guest's work (hotplug:
    # memory_notify(MEM_ONLINE or MEM_OFFLINE), sent once a block's pages are in or out of
    # MemTotal and the zone watermarks are recomputed; a look on another vCPU can see the
    # final MemTotal a little before it), so the duration ends where the guest's work
    # ended, not at the sampler's next look; "" where no such function exists.
    driver_done: ClassVar[str] = ""

    def host_first(self, delta: int) -> bool:
        """Whether QEMU reaches the target before the guest does anything (a synchronous
        request, e.g. device_add): the guest then has nothing to show until the host-side
        outcome, so the in-guest sampler starts looking there (`resize`)."""
        return False

    @property
    def variant(self) -> str:
        return "default"

    @property
    def label(self) -> str:
        return self.name if self.variant == "default" else f"{self.name}/{self.variant}"

    @property
    @abc.abstractmethod
    def granularity(self) -> int:
        """The unit a request must be a multiple of, in bytes."""

    def plan(self, before: int, delta: int, boot: int | None, maxmem: int | None) -> MemoryPlan:
        """Boot size and capacity for one step, or a UserError/CapabilityLimit."""
        return self.plan_path(before, (delta,), boot, maxmem)

    @abc.abstractmethod
    def plan_path(
        self,
        before: int,
        deltas: tuple[int, ...],
        boot: int | None,
        maxmem: int | None,
        *,
        strict: bool = True,
    ) -> MemoryPlan:
        """Boot size and capacity for a sequence of steps. With `strict=False` a step the
        mechanism cannot do by design is left to fail at run time (outcome `unsupported`).
        Pure: the mechanism object is not changed."""

    @abc.abstractmethod
    def qemu_args(self, plan: MemoryPlan) -> tuple[str, ...]:
        """Devices and objects to add to the command line."""

    def memory_options(self, plan: MemoryPlan) -> tuple[int | None, int]:
        """(maxmem, slots) for `-m`."""
        return None, 0

    def kernel_args(self) -> tuple[str, ...]:
        return ()

    def vmstat_keys(self) -> tuple[str, ...]:
        """/proc/vmstat fields the guest sampler must carry for `guest_signal`."""
        return ()

    @abc.abstractmethod
    def host_bytes(self, vm: "VM") -> int:
        """Bytes QEMU says this mechanism currently provides (balloon: the logical size)."""

    def host_bytes_at(self, size: int) -> int:
        """What `host_bytes` reads when the guest is at `size` on its plan (hotplug: the
        bytes plugged above boot RAM)."""
        return size - self.planned().boot

    def before_request(self, vm: "VM") -> None:  # noqa: B027 - optional hook
        """Read what the request will be judged against, outside the timed window."""

    def request(self, vm: "VM", delta: int, start: int) -> Request:
        """Send the resize to QEMU; returns at once (the guest completes asynchronously).

        `start` is `host_bytes()` read just before, outside the timed window.
        """
        req = self._send(vm, delta, start)
        for hook in list(self.after_request):
            hook(vm, req)
        return req

    @abc.abstractmethod
    def _send(self, vm: "VM", delta: int, start: int) -> Request:
        """The mechanism's own request to QEMU."""

    def poll(self, vm: "VM", req: Request) -> Progress:
        """QEMU's authoritative view of the request's progress: done at the target."""
        now = self.host_bytes(vm)
        return Progress(now, now == req.target)

    def finish(self, vm: "VM", req: Request) -> None:  # noqa: B027 - optional hook
        """Clean-up after the request ended (e.g. delete unplugged DIMMs' backends)."""

    def describe(self) -> dict[str, Any]:
        return {"mechanism": self.name, "variant": self.variant}

    # -- shared checks ---------------------------------------------------------------------------

    def hotplug_range(
        self, before: int, deltas: tuple[int, ...], boot: int | None, maxmem: int | None
    ) -> tuple[int, int]:
        """(boot, capacity) for a mechanism that can only remove what it plugged: boot at the
        lowest point of the path, room for the highest (or up to `maxmem`)."""
        check_sizes(before, deltas, boot, maxmem)
        path = MemoryPlan(boot=0, before=before, deltas=deltas, capacity=0).path
        low, high = min(path), max(path)
        boot = low if boot is None else boot
        for delta in deltas:
            self.check_aligned(delta, "resize")
        self.check_aligned(before - boot, "plugged memory before the step")
        if low < boot:
            raise UserError(
                f"{self.label} cannot go below boot RAM {format_size(boot)} "
                f"(asked for {format_size(low)}): only hotplugged memory can be removed"
            )
        capacity = high - boot
        if maxmem is not None:
            if maxmem < boot + capacity:
                raise UserError(
                    f"the steps need {format_size(boot + capacity)} but maxmem is "
                    f"{format_size(maxmem)}"
                )
            capacity = (maxmem - boot) // self.granularity * self.granularity
        return boot, capacity

    def check_aligned(self, size: int, what: str) -> None:
        if size % self.granularity:
            raise UserError(
                f"{what} {format_size(abs(size))} is not a multiple of the {self.label} "
                f"granularity {format_size(self.granularity)}"
            )


def check_sizes(before: int, deltas: tuple[int, ...], boot: int | None, maxmem: int | None) -> None:
    """What every plan needs: a guest to start from, steps that change something, and
    positive bounds (the CLI and suites refuse these earlier; this holds for any caller)."""
    if before <= 0:
        raise UserError(f"the guest's memory must be greater than zero, got {before}")
    if not deltas or 0 in deltas:
        raise UserError("every resize step must change the size (a zero step is not a step)")
    for what, value in (("boot memory", boot), ("maxmem", maxmem)):
        if value is not None and value <= 0:
            raise UserError(f"{what} must be greater than zero, got {value}")
