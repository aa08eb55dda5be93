import numpy as np

from dynamem.parsers import parse_kmsg
from dynamem.probes.cost import vmstat_delta, watermarks
from dynamem.probes.host import settle_time_ns


def test_vmstat_deltas():
    before = "pswpout 10\npgmigrate_success 5\noom_kill 0\n"
    after = "pswpout 25\npgmigrate_success 5\noom_kill 1\n"
    delta = vmstat_delta(before, after)
    assert delta["pswpout"] == 15 and delta["pgmigrate_success"] == 0 and delta["oom_kill"] == 1
    assert delta["balloon_inflate"] == 0  # absent counters count as zero


def test_watermarks_before_after_and_empty_zones_dropped(fixture_text):
    text = fixture_text("guest-zoneinfo.txt")
    marks = watermarks(text, text)
    assert "Node0/Normal" not in marks  # never populated in this guest
    assert marks["Node0/DMA32"].min[0] == marks["Node0/DMA32"].min[1]


def test_rss_settles_at_the_last_change_beyond_tolerance():
    t = np.arange(10) * 10
    rss = np.array([100, 100, 90, 80, 70, 61, 60, 60, 60, 60])
    assert settle_time_ns(t, rss, start_ns=15, tolerance=2) == 50
    assert settle_time_ns(t, np.full(10, 5), start_ns=15, tolerance=2) == 20


def test_kmsg_records():
    text = "6,339,5176000,-;virtio_mem virtio3: plugged size: 0x0\n SUBSYSTEM=virtio\n4,1,12,-;x\n"
    assert parse_kmsg(text) == [
        "[    5.176000] virtio_mem virtio3: plugged size: 0x0",
        "[    0.000012] x",
    ]
