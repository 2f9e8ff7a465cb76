"""Records and backlog: a restarted destination misses nothing and never sees a torn record."""
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fakes.lines import make_line
from support import ROOT, by_role, connect_source, free_port, tcp_queues, tree, wait_for_log, wait_until

RETRY = "0.5"


class Lines:
    """A source sending numbered 9-byte records, written in pieces cut at random offsets."""

    def __init__(self, port, interval=0.004):
        self.sock = connect_source(port)
        self.interval = interval
        self.count = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pending = b""
        while not self.stopping:
            pending += b"%08d\n" % self.count
            self.count += 1
            cut = len(pending) - (self.count % 5)  # leave part of the record for the next write
            try:
                self.sock.sendall(pending[:cut])
            except OSError:
                return
            pending = pending[cut:]
            time.sleep(self.interval)
        self.sock.sendall(pending)

    def stop(self):
        self.stopping = True
        self.thread.join(10)
        self.sock.close()


def records(stream):
    """The record numbers of a stream, failing on a torn record anywhere but at its very end."""
    lines = stream.split(b"\n")
    tail = lines.pop()  # after the last newline: a record the connection's end cut (allowed)
    for line in lines:
        assert re.fullmatch(rb"\d{8}", line), "torn record %r" % line
    assert len(tail) < 9
    return [int(line) for line in lines]


@pytest.mark.parametrize("buffer", ["4M", "0"])
def test_restarted_destination_continues_at_a_record_boundary(proxy, recorder, buffer):
    """--framing line: after a restart the new connection starts with a whole record; with the
    backlog (4M) it resumes right after the last record the old one took, with --buffer 0 the outage's
    records are gone (and counted); the steady destination gets everything in order."""
    steady = recorder()
    flaky = recorder()
    port = flaky.port
    px = proxy(["127.0.0.1:%d" % steady.port, "127.0.0.1:%d" % port], "--framing", "line", "--buffer", buffer,
               "--retry-interval", RETRY)
    source = Lines(px.port)
    try:
        wait_until(lambda: len(flaky.streams()) == 1 and len(flaky.streams()[0]) > 9000)
        flaky.stop()
        wait_for_log(px.log_path, r"disconnected from 127.0.0.1:%d|cannot connect to 127.0.0.1:%d" % (port, port))
        sent_during_outage = source.count
        wait_until(lambda: source.count > sent_during_outage + 200)
        back = recorder(port=port)
        wait_until(lambda: len(back.streams()) == 1 and len(back.streams()[0]) > 9000)
    finally:
        source.stop()
    wait_until(lambda: back.closed_count() == 1 and steady.closed_count() == 1)
    assert records(steady.streams()[0]) == list(range(source.count))
    old = records(flaky.streams()[0])
    new = records(back.streams()[0])
    assert old == list(range(len(old)))
    assert new == list(range(new[0], source.count)), "gap or reorder after the restart"
    wait_for_log(px.log_path, r"forwarder done: sent \d+ bytes, dropped \d+ bytes \(\d+ records\)", count=2)
    done = [m.groups() for m in re.finditer(r"dst=127.0.0.1:%d forwarder done: sent (\d+) bytes, dropped (\d+) "
                                            r"bytes \((\d+) records\)" % port, px.log())]
    assert len(done) == 1
    if buffer == "0":
        assert new[0] > old[-1] + 100  # the outage's records were dropped ...
        assert int(done[0][2]) >= new[0] - old[-1] - 1 - 2  # ... and counted (the cut one and the unread few)
    else:
        # Resumed after the last record the destination program read (its kernel may have taken a few
        # more that it never read before it was stopped: at most one read's worth).
        assert old[-1] - 300 < new[0] <= old[-1] + 30
        assert int(done[0][2]) == 0


def tree_uss(pid):
    """Unique memory (USS) of pid and its descendants, in bytes."""
    total = 0
    for proc in tree(pid):
        try:
            total += proc.memory_full_info().uss
        except psutil.NoSuchProcess:
            pass
    return total


def test_memory_stays_bounded_while_every_destination_is_down(proxy):
    """10 sources x 2 destinations, both destinations down while the sources stream 3 MB each: the
    tree grows by at most sources x destinations x (--buffer + one read), and keeps streaming."""
    buffer = 256 * 1024
    ports = [free_port(), free_port()]
    px = proxy(["127.0.0.1:%d" % port for port in ports], "--buffer", "256K", "--framing", "line",
               "--retry-interval", "0.5")
    sources = [connect_source(px.port) for _ in range(10)]
    wait_until(lambda: len(by_role(px.pid, "forwarder")) == 20)
    wait_for_log(px.log_path, r"cannot connect", count=20)
    line = b"x" * 99 + b"\n"
    for sock in sources:  # a first record each: the code that keeps it has run (and copied its pages)
        sock.sendall(line)
    wait_until(lambda: all(tcp_queues(s.getsockname()[1], px.port) == (0, 0) for s in sources))
    idle = tree_uss(px.pid)
    for _ in range(30):
        for sock in sources:
            sock.sendall(line * 1000)  # 100 kB
    wait_until(lambda: all(tcp_queues(s.getsockname()[1], px.port) == (0, 0) for s in sources))
    bound = 10 * 2 * (buffer + 1024 * 1024)
    grown = 0
    deadline = time.monotonic() + 2.0  # the forwarders may still be draining their pipes: watch a while
    while time.monotonic() < deadline:
        grown = max(grown, tree_uss(px.pid) - idle)
        time.sleep(0.1)
    assert grown <= bound, "grew %d KiB, bound %d KiB" % (grown // 1024, bound // 1024)
    for sock in sources:
        sock.close()
    done = wait_for_log(px.log_path, r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes \((\d+) records\)",
                        count=20)
    for match in done:
        assert (int(match.group(1)), int(match.group(2)), int(match.group(3))) == (0, 3_000_100, 30_001)


def test_strict_consumer_killed_and_restarted_never_sees_a_torn_record(proxy, tmp_path):
    """A consumer that closes the connection at a malformed record (fake destination --strict-lines),
    killed -9 and restarted five times while a source writes records cut at random offsets: with
    --framing line it never sees a torn record, and its sequence numbers never skip or go back."""
    port = free_port()
    out_path = tmp_path / "dst.out"

    def start_destination():
        out = open(out_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "fakes.destination", "--port", str(port), "--strict-lines"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait_until(lambda: "listening" in out_path.read_text() or proc.poll() is not None)
        return proc

    dest = start_destination()
    px = proxy(["127.0.0.1:%d" % port], "--framing", "line", "--retry-interval", RETRY)
    sock = connect_source(px.port)
    stop = threading.Event()
    rng = random.Random(11)

    def send():
        pending, seq = b"", 0
        while not stop.is_set():
            seq += 1
            pending += make_line("src-t", seq).encode()
            cut = rng.randint(0, len(pending))
            sock.sendall(pending[:cut])
            pending = pending[cut:]
            time.sleep(0.002)
        sock.sendall(pending)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for _ in range(6):
            seen = out_path.read_text().count("src-t #")
            wait_until(lambda: out_path.read_text().count("src-t #") > seen + 60)
            if _ == 5:
                break
            dest.kill()
            dest.wait()
            dest = start_destination()
    finally:
        stop.set()
        sender.join(10)
        sock.close()
        dest.terminate()
        dest.wait(10)
    text = out_path.read_text()
    assert "malformed" not in text.replace("malformed records: 0", ""), text[-2000:]
    # (not the tail a SIGTERM'd destination prints as " [partial]": the stop may cut the last record)
    seqs = [int(m.group(1)) for m in re.finditer(r"src-t #(\d+) (?!\[partial\])", text)]
    assert len(seqs) > 300
    # Each restart resumes right after what the killed one printed, give or take what its kernel
    # had acknowledged but it never read (a skip forward), and at most the cut record again.
    skips = [(a, b) for a, b in zip(seqs, seqs[1:]) if not a - 1 <= b - 1 <= a]
    assert all(b > a for a, b in skips), skips
    assert len(skips) <= 5


class ReadAllThenReset:
    """A destination that reads `size` bytes of each connection, then closes it with a reset at once."""

    def __init__(self, size, connections):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.size = size
        self.read = []
        self.thread = threading.Thread(target=self._run, args=(connections,), daemon=True)
        self.thread.start()

    def _run(self, connections):
        for _ in range(connections):
            conn, _ = self.listener.accept()
            got = 0
            while got < self.size:
                data = conn.recv(65536)
                if not data:
                    break
                got += len(data)
            self.read.append(got)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        self.listener.close()


@pytest.mark.parametrize("buffer", ["4M", "0"])
def test_a_destination_that_reads_everything_then_resets_lost_nothing(proxy, buffer):
    """The forwarder sends its FIN only once every byte is acknowledged: a FIN makes the destination
    delay its last ACK, and one that read everything and reset at once would leave the last bytes
    unacknowledged, counted as dropped though read (a chaos run's 53,013 logged for 52,013 missed)."""
    size, runs = 50_000, 8
    dest = ReadAllThenReset(size, runs)
    px = proxy(["127.0.0.1:%d" % dest.port], "--framing", "line", "--buffer", buffer)
    for _ in range(runs):
        source = connect_source(px.port)
        source.sendall(b"%09d\n" % 7 * (size // 10))
        source.close()
        wait_until(lambda: px.log().count("forwarder done") == _ + 1, 30)
    done = re.findall(r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes", px.log())
    assert dest.read == [size] * runs
    assert done == [(str(size), "0")] * runs, px.log()


def test_backlog_keeps_the_newest_record_that_exactly_fills_the_buffer(proxy, recorder):
    """--framing line --buffer 10, destination down: "aaaa\\n" then "bbbbbbbbb\\n" (10 bytes, the buffer
    exactly) are kept apart; when the destination comes up it gets the newest record, whole."""
    port = free_port()
    px = proxy(["127.0.0.1:%d" % port], "--framing", "line", "--buffer", "10", "--retry-interval", RETRY)
    source = connect_source(px.port)
    wait_for_log(px.log_path, r"cannot connect to 127.0.0.1:%d" % port)

    def forwarder_says(text):
        titles = [" ".join(p.cmdline()) for p in by_role(px.pid, "forwarder")]
        return any("down since" in t and text in t for t in titles)

    source.sendall(b"aaaa\n")  # read into the backlog on its own: the second record starts a new chunk
    wait_until(lambda: forwarder_says("kept 5 B"), 30, message="the first record never reached the backlog")
    source.sendall(b"bbbbbbbbb\n")
    wait_until(lambda: not forwarder_says("dropped 0 B"), 30, message="the backlog never dropped anything")
    back = recorder(port=port)
    wait_until(lambda: back.streams() == [b"bbbbbbbbb\n"], 30,
               message=lambda: "the destination got %r, not the newest record" % back.streams())
    source.close()
    wait_for_log(px.log_path, r"forwarder done: sent 10 bytes, dropped 5 bytes \(1 records\)")
