"""The Debian cloud image for real: built from Debian packages (cached between runs), booted
with systemd and cloud-init, which reads the seed; then each mechanism resizes it in a run.

The build takes about 3 minutes the first time (debootstrap) and is a cache hit after;
each boot about 100 s under TCG (cloud-init's Python is most of it).
"""

import pytest

from dynamem.guest import cloud
from dynamem.guest.debootstrap import build
from dynamem.guest.recipe import load_cloud_recipe
from dynamem.launch import plan_vm
from dynamem.qemu.machine import VM
from dynamem.store import RunStore
from dynamem.units import GiB

from .conftest import cli

pytestmark = pytest.mark.slow

SUITE = """
name = "cloud-tiny"
repeats = 1
seed = 5
[defaults]
memory = "1G"
swap = "disk"
swap_size = "256M"
warmup = false
steps = ["shrink 256M", "grow 256M"]
[[scenario]]
name = "balloon"
mechanism = "balloon"
[[scenario]]
name = "dimm"
mechanism = "dimm"
[[scenario]]
name = "virtio-mem"
mechanism = "virtio-mem"
"""


@pytest.fixture(scope="module")
def debian_cloud():
    disk, _ = build(load_cloud_recipe("debian-cloud"))
    return cloud.load(disk, name="debian-cloud")


def test_cloud_init_applies_the_seed_and_the_base_is_never_written(image, debian_cloud, run_base):
    before = cloud.sha256_of(debian_cloud.path)
    plan = plan_vm(memory=GiB, guest="debian-cloud", swap="disk", swap_size=GiB // 4)
    assert plan.config.disk == debian_cloud.path
    with VM(plan.config) as vm:
        vm.start()
        # cloud-init read this VM's seed: its instance id, root's key (we are logged in),
        # and the host key the host pinned (SSH refuses any other)
        query = vm.run(["cloud-init", "query", "instance_id"]).stdout.strip()
        assert query == vm.run_dir.name
        host_key = vm.run(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).stdout.split()[:2]
        assert host_key == (vm.run_dir / "keys" / "hostkey.pub").read_text().split()[:2]
        assert vm.run(["cloud-init", "status"]).stdout.split()[-1] == "done"
        # what prepare did, as in the minimal guest: swap on the tagged disk, the sampler,
        # the driver-entry tracing
        swaps = vm.run(["cat", "/proc/swaps"]).stdout
        assert len(swaps.strip().splitlines()) == 2, swaps
        assert vm.run(["pidof", "dynamem-sampler"]).ok
        traced = vm.run(["cat", "/sys/kernel/tracing/set_ftrace_filter"]).stdout
        assert "virtio_mem_config_changed" in traced and "virtballoon_changed" in traced
        assert "memhp_default_state=online_movable" in vm.run(["cat", "/proc/cmdline"]).stdout
        assert vm.kernel_release == debian_cloud.kernel_release
        assert vm.timings["ready"] < vm.timings["ssh"]  # final message, then SSH and sampler
        # written through the overlay only
        vm.run(["sh", "-c", "dd if=/dev/urandom of=/root/junk bs=1M count=8 && sync"])
    assert cloud.sha256_of(debian_cloud.path) == before


def test_each_mechanism_resizes_the_cloud_image_in_a_run(debian_cloud, run_base, tmp_path):
    suite = tmp_path / "cloud-tiny.toml"
    suite.write_text(SUITE)
    out = tmp_path / "run"
    res = cli("run", "--suite", str(suite), "--guest", "debian-cloud", "--out", str(out),
              timeout=1500)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    store = RunStore.open(out)
    meta = store.run.metadata
    assert meta.guest == "debian-cloud"
    assert meta.cloud_image is not None
    assert meta.cloud_image.sha256 == meta.cloud_image.sha256_after == debian_cloud.sha256
    assert meta.cloud_image.onlining == "none"  # Debian's udev rules do not online memory
    assert meta.guest_packages and "cloud-init" in meta.guest_packages
    cells, problems = store.load_cells()
    assert problems == [] and len(cells) == 3
    for cell in cells:
        assert cell.ok, (cell.cell, cell.error)
        assert cell.condition.guest == debian_cloud.label
        assert [s.outcome for _, s in cell.resizes()] == ["ok", "ok"], cell.cell
        assert cell.context is not None and cell.context.guest_image == debian_cloud.sha256
    report = cli("report", str(out))
    assert report.returncode == 0, report.stderr
