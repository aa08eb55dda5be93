"""The host half of the sampler channel against a fake guest on a real socket."""

import socket
import threading
import time

import pytest

from dynamem.channel import CAUSES, SamplerChannel
from dynamem.errors import DeadlineExceeded, VMError
from dynamem.observer import Backoff


@pytest.fixture
def pair(tmp_path):
    channel = SamplerChannel(tmp_path / "s.sock")
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.connect(str(tmp_path / "s.sock"))
    channel.accept(5, alive=lambda: True)
    yield channel, guest
    guest.close()
    channel.close()


def answer_pings(guest, extra=b"", hello=b"hello 3\n", sent=None):
    """A minimal fake sampler: answers ping and snap, sends `extra` first; every command
    line it gets is appended to `sent`."""

    def run():
        guest.sendall(hello + extra)
        buf = b""
        while True:
            try:
                chunk = guest.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if sent is not None:
                    sent.append(line.decode())
                if words[0] == "ping":
                    guest.sendall(f"pong {words[1]} 123 120 7 2\n".encode())
                elif words[0] == "snap":
                    for path in words[2:]:
                        data = b"line1\nline2 with f 9 9\n"
                        guest.sendall(f"f {words[1]} {path} {len(data)}\n".encode() + data + b"\n")
                    guest.sendall(f"end {words[1]}\n".encode())

    threading.Thread(target=run, daemon=True).start()


def test_samples_are_stamped_on_arrival(pair):
    channel, guest = pair
    answer_pings(guest, b"s 1 1000 1000 2 2000 100 0\ns 5 9000 7000 1 2000 99 0\n")
    channel.wait_hello(5)
    before = time.monotonic_ns()
    channel.ping()
    assert [s.seq for s in channel.samples] == [1, 5]
    assert channel.samples[1].values == (2000, 99, 0)
    assert channel.samples[1].prev_guest_ns == 7000 and channel.samples[1].guest_ns == 9000
    assert [CAUSES[s.cause] for s in channel.samples] == ["first", "uevent"]
    assert channel.samples[0].arrival_ns <= before


def test_a_pong_says_how_far_the_sampler_looked(pair):
    channel, guest = pair
    answer_pings(guest)
    channel.wait_hello(5)
    pong = channel.barrier()
    assert (pong.guest_ns, pong.last_check_ns, pong.checks, pong.uevent_checks) == (123, 120, 7, 2)
    assert pong.rtt_s > 0


def test_an_old_guest_sampler_is_refused_with_what_to_do(pair):
    channel, guest = pair
    answer_pings(guest, hello=b"hello 1\n")
    with pytest.raises(VMError, match="rebuild the guest"):
        channel.wait_hello(5)


def test_schedules_reach_the_sampler_as_floor_cap_ppm(pair):
    channel, guest = pair
    sent = []
    answer_pings(guest, sent=sent)
    channel.wait_hello(5)
    channel.configure(vmstat=("balloon_inflate",), onchange=True, uevents=True, cpu_budget=0.04)
    channel.start(Backoff(0.002, 0.05, 0.01), Backoff(0.02, 0.5, 0.05))
    assert channel.schedule == Backoff(0.002, 0.05, 0.01)
    channel.stop()
    commands = [c for c in sent if not c.startswith("ping")]
    assert commands == [
        "schedule 0 0 0",
        "meminfo ",
        "vmstat balloon_inflate",
        "fmeminfo ",
        "fvmstat ",
        "onchange 1",
        "uevent 1",
        "budget 40000",
        "full 20000000 500000000 50000",
        "schedule 2000000 50000000 10000",
        "schedule 0 0 0",
    ]
    assert channel.columns[-1] == "balloon_inflate" and channel.schedule is None


def test_framed_snapshots_survive_newlines_and_split_reads(pair):
    channel, guest = pair
    answer_pings(guest)
    channel.wait_hello(5)
    snap = channel.snapshot(["/proc/a", "memblocks"])
    assert snap == {
        "/proc/a": "line1\nline2 with f 9 9\n",
        "memblocks": "line1\nline2 with f 9 9\n",
    }


def test_calibration_reports_round_trips(pair):
    channel, guest = pair
    answer_pings(guest)
    channel.wait_hello(5)
    cal = channel.calibrate(10)
    assert 0 < cal.rtt_median <= cal.rtt_p95 <= cal.rtt_max


def test_a_silent_guest_hits_the_deadline(pair):
    channel, _guest = pair
    with pytest.raises(DeadlineExceeded, match="hello"):
        channel.wait_hello(0.2)
