"""Fragmentation indices exactly as mm/vmstat.c computes them, and the zoneinfo parser."""

import numpy as np
import pytest

from dynamem.probes.guestmem import (
    ORDERS,
    contig_info,
    fragmentation_index_milli,
    parse_buddyinfo,
    parse_extfrag,
    parse_vmstat,
    parse_zoneinfo,
    unusable_index_milli,
)


def one_zone(**orders):
    counts = np.zeros((1, ORDERS), dtype=np.int64)
    for k, v in orders.items():
        counts[0, int(k[1:])] = v
    return counts


def test_contig_info_by_hand():
    # 3 free order-0 pages and 1 free order-2 block: 7 pages in 4 blocks.
    free, blocks, suitable = contig_info(one_zone(o0=3, o2=1))
    assert free[0] == 7 and blocks[0] == 4
    assert suitable[0, 0] == 7  # order-0 requests: every page
    assert suitable[0, 1] == 2  # order-1: the order-2 block holds two
    assert suitable[0, 2] == 1 and suitable[0, 3] == 0


def test_unusable_index_by_hand():
    u = unusable_index_milli(one_zone(o0=3, o2=1))[0]
    assert u[0] == 0  # everything usable for order 0
    assert u[1] == (7 - 2 * 2) * 1000 // 7  # 428: three pages unusable
    assert u[3] == 1000  # no order-3 block at all
    assert unusable_index_milli(one_zone())[0, 5] == 1000  # no free memory: 1 by definition


def test_fragmentation_index_by_hand():
    f = fragmentation_index_milli(one_zone(o0=3, o2=1))[0]
    assert f[2] == -1000  # a suitable block exists: allocation would not fail
    # order 3: 1000 - (1000 + 7000 // 8) // 4 = 1000 - 1875 // 4 = 532
    assert f[3] == 532
    assert fragmentation_index_milli(one_zone())[0, 3] == 0  # no free blocks


def test_real_guest_buddyinfo(fixture_text):
    buddy = parse_buddyinfo(fixture_text("guest-buddyinfo.txt"))
    assert buddy.zones[:2] == ("Node0/DMA", "Node0/DMA32")
    assert buddy.counts.shape == (len(buddy.zones), ORDERS)
    u = unusable_index_milli(buddy.counts)
    assert ((u >= 0) & (u <= 1000)).all()
    assert (np.diff(u, axis=1) >= 0).all()  # never easier to find a bigger block


def test_extfrag_debugfs_format():
    text = "Node 0, zone      DMA 0.000 0.000 0.016 1.000\nNode 0, zone    DMA32 -1.000 0.532\n"
    assert parse_extfrag(text) == {"Node0/DMA": [0, 0, 16, 1000], "Node0/DMA32": [-1000, 532]}


def test_zoneinfo_watermarks_of_a_real_guest(fixture_text):
    zones = parse_zoneinfo(fixture_text("guest-zoneinfo.txt"))
    dma32 = zones["Node0/DMA32"]
    assert dma32["min"] < dma32["low"] < dma32["high"]
    assert dma32["managed"] <= dma32["present"] <= dma32["spanned"]
    assert zones["Node0/Movable"]["managed"] == 65536  # 256 MiB plugged by virtio-mem
    # per-node stats printed under the first zone do not leak into the zone fields
    assert set(dma32) == {"free", "min", "low", "high", "spanned", "present", "managed"}


def test_vmstat(fixture_text):
    vm = parse_vmstat(fixture_text("guest-vmstat.txt"))
    assert {"pswpin", "pgmigrate_success", "balloon_inflate", "compact_stall"} <= set(vm)


@pytest.mark.parametrize("orders", [{"o0": 5}, {"o10": 2, "o3": 1}, {"o1": 1, "o9": 7}])
def test_indices_stay_in_range(orders):
    counts = one_zone(**orders)
    assert (
        (fragmentation_index_milli(counts) >= -1000) & (fragmentation_index_milli(counts) <= 1000)
    ).all()
