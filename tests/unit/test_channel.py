"""The host half of the sampler channel against a fake guest on a real socket."""

import socket
import threading
import time

import pytest

from dynamem.channel import SamplerChannel
from dynamem.errors import DeadlineExceeded


@pytest.fixture
def pair(tmp_path):
    channel = SamplerChannel(tmp_path / "s.sock")
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.connect(str(tmp_path / "s.sock"))
    channel.accept(5, alive=lambda: True)
    yield channel, guest
    guest.close()
    channel.close()


def answer_pings(guest, extra=b""):
    """A minimal fake sampler: answers ping and snap, sends `extra` first."""

    def run():
        guest.sendall(b"hello 1\n" + extra)
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
                if words[0] == "ping":
                    guest.sendall(f"pong {words[1]} 123\n".encode())
                elif words[0] == "snap":
                    for path in words[2:]:
                        data = b"line1\nline2 with f 9 9\n"
                        guest.sendall(f"f {words[1]} {path} {len(data)}\n".encode() + data + b"\n")
                    guest.sendall(f"end {words[1]}\n".encode())

    threading.Thread(target=run, daemon=True).start()


def test_samples_are_stamped_on_arrival(pair):
    channel, guest = pair
    answer_pings(guest, b"s 0 1000 2000 100 0\ns 1 2000 2000 99 0\n")
    channel.wait_hello(5)
    before = time.monotonic_ns()
    channel.ping()
    assert [s.seq for s in channel.samples] == [0, 1]
    assert channel.samples[1].values == (2000, 99, 0)
    assert channel.samples[0].arrival_ns <= before


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
