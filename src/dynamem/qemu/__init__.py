"""QEMU processes: command lines, the process owner, QMP, the accelerator probe."""
