"""The resize mechanisms, one module each, behind `base.Mechanism`."""

from dynamem.errors import UserError
from dynamem.mechanisms.balloon import Balloon
from dynamem.mechanisms.base import CapabilityLimit, Mechanism, MemoryPlan
from dynamem.mechanisms.dimm import Dimm
from dynamem.mechanisms.virtio_mem import VirtioMem
from dynamem.units import MiB

NAMES = ("balloon", "dimm", "virtio-mem")

__all__ = [
    "NAMES",
    "Balloon",
    "CapabilityLimit",
    "Dimm",
    "Mechanism",
    "MemoryPlan",
    "VirtioMem",
    "make",
]


def make(
    name: str,
    variant: str | None = None,
    *,
    dimm_size: int = 128 * MiB,
    deflate_on_oom: bool = False,
    free_page_reporting: bool = False,
) -> Mechanism:
    if name == "balloon":
        if variant not in (None, "default"):
            raise UserError(f"the balloon has no variant {variant!r}; use its options instead")
        return Balloon(deflate_on_oom=deflate_on_oom, free_page_reporting=free_page_reporting)
    if name == "dimm":
        if variant not in (None, "default"):
            raise UserError(f"dimm has no variant {variant!r}")
        return Dimm(dimm_size=dimm_size)
    if name == "virtio-mem":
        return VirtioMem(variant or "sbm")
    raise UserError(f"unknown mechanism {name!r} (choose from {', '.join(NAMES)})")
