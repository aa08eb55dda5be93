from dynamem.parsers import (
    hotplug_log_lines,
    parse_memblocks,
    parse_meminfo,
    summarize_memblocks,
)


def test_meminfo_from_a_real_guest(fixture_text):
    info = parse_meminfo(fixture_text("guest-meminfo.txt"))
    assert info["MemTotal"] > info["MemFree"] > 0
    assert "HugePages_Total" in info and "SwapFree" in info


def test_memblocks_of_a_guest_with_virtio_mem_plugged(fixture_text):
    blocks = parse_memblocks(fixture_text("guest-memblocks-virtio-mem-plugged.txt"))
    assert blocks[0][:2] == (0, "online")
    summary = summarize_memblocks(blocks)
    # 256 MiB plugged by virtio-mem were onlined movable: two 128 MiB blocks.
    assert summary["online:Movable"] == 2
    assert summary["online"] == len(blocks)


def test_virtio_mem_probe_lines_are_kept(fixture_text):
    lines = hotplug_log_lines(fixture_text("guest-dmesg-virtio-mem.txt"))
    text = "\n".join(lines)
    assert "device block size: 0x200000" in text
    assert "memory block size: 0x8000000" in text
    assert "subblock size" in text
    assert all("virtio_net" not in line for line in lines)
