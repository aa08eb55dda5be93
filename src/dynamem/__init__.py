"""dynamem: compare virtio-balloon, ACPI pc-dimm hotplug and virtio-mem on real QEMU guests."""

__version__ = "0.1.0"
