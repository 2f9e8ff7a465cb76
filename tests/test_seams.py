"""Bugs that lived in the seams between the processes' parts: a spinning --primary forwarder, a
counter that went down, a stop that crashed a receiver, an unbounded half-closed session."""
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

from support import (AS_NOBODY, ROOT, by_role, connect_source, free_port, nobody_can_run_the_proxy, scaled, scrape,
                     sees_close, wait_for_log, wait_until)

BIG_REPLY = 5 * 1000 * 1000


class Listener:
    """A server on 127.0.0.1 whose connections are served by serve(conn) in a thread each."""

    def __init__(self, serve, rcvbuf=None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:  # inherited by accepted connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.serve = serve
        self.conns = []
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.serve(conn)
        except OSError:
            pass

    def stop(self):
        self.stopping = True
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def listener():
    made = []

    def make(serve, **kwargs):
        server = Listener(serve, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def cpu_seconds(proc):
    times = proc.cpu_times()
    return times.user + times.system


def test_primary_forwarder_does_not_spin_while_a_half_closed_client_reads_slowly(proxy, listener):
    """The primary replies 5 MB and closes; the client half-closed after its request and does not read
    for a while: the primary's forwarder waits for the client without using the CPU, then every reply
    byte reaches it, then its EOF."""
    done = threading.Event()
    reply = bytes(range(256)) * (BIG_REPLY // 256)

    def big_reply_then_close(conn):
        request = b""
        while not request.endswith(b"\n"):
            chunk = conn.recv(100)
            if not chunk:
                break
            request += chunk
        conn.sendall(reply)
        conn.close()
        done.set()

    primary = listener(big_reply_then_close)
    px = proxy(["127.0.0.1:%d" % primary.port], "--primary")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", px.port))
    client.sendall(b"GET /big\n")
    client.shutdown(socket.SHUT_WR)
    wait_until(done.is_set, 30, message="the primary could not hand over its reply and close")
    forwarders = wait_until(lambda: by_role(px.pid, "forwarder"))
    fwd = forwarders[0]
    before = cpu_seconds(fwd)
    time.sleep(2.0)  # a window to measure over, not a wait for a condition
    used = cpu_seconds(fwd) - before
    assert used < 0.5, "the primary's forwarder used %.2f s of CPU in 2 s while the client did not read" % used
    client.settimeout(scaled(30))
    got = bytearray()
    while True:
        chunk = client.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    assert len(got) == len(reply) and got == reply
    client.close()


class ResetsEverySecond:
    """A destination that reads slowly for about a second (so the proxy's send queue is full), then
    resets the connection; again and again."""

    def __call__(self, conn):
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            if not conn.recv(4096):
                break
            time.sleep(0.005)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def stream_until(sock, stop):
    block = b"0123456789abcdef" * 4096
    while not stop.is_set():
        try:
            sock.sendall(block)
        except OSError:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("buffer", ["4M", "0"])
def test_destination_counters_never_go_down_while_a_destination_resets_again_and_again(proxy, listener, buffer):
    """Every _total a scrape shows is monotonic through destination resets (Prometheus takes a
    decrease for a counter reset); once the group ends, received = sent + dropped exactly."""
    flaky = listener(ResetsEverySecond(), rcvbuf=16384)
    metrics_port = free_port()
    dest = "127.0.0.1:%d" % flaky.port
    # The backoff doubles at every reset (a connection never stays up for --retry-interval): the
    # later outages outlast a publish period, so a scrape sees the counters after a disconnect.
    px = proxy([dest], "--metrics", "127.0.0.1:%d" % metrics_port, "--buffer", buffer, "--retry-interval", "2")
    wait_until(lambda: "serving metrics" in px.log())
    source = connect_source(px.port)
    stop = threading.Event()
    thread = threading.Thread(target=stream_until, args=(source, stop), daemon=True)
    thread.start()
    names = ["socketproxy_destination_sent_bytes_total", "socketproxy_destination_dropped_bytes_total",
             "socketproxy_destination_reconnects_total", "socketproxy_destination_connect_failures_total",
             "socketproxy_destination_resent_bytes_total"]
    last = {name: 0.0 for name in names}
    decreases = []
    deadline = time.monotonic() + 12.0
    while time.monotonic() < deadline:
        values = scrape(metrics_port)
        for name in names:
            value = values.get((name, (("destination", dest),)), 0.0)
            if value < last[name]:
                decreases.append("%s: %d -> %d" % (name, last[name], value))
            last[name] = value
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    source.close()
    wait_until(lambda: scrape(metrics_port)[("socketproxy_sources_active", ())] == 0, 30)
    assert last["socketproxy_destination_reconnects_total"] >= 3, "the destination did not reset often enough"
    assert not decreases, "counters went down: %s" % decreases
    values = scrape(metrics_port)
    received = values[("socketproxy_received_bytes_total", ())]
    sent = values[("socketproxy_destination_sent_bytes_total", (("destination", dest),))]
    dropped = values[("socketproxy_destination_dropped_bytes_total", (("destination", dest),))]
    assert received > 0 and received == sent + dropped, (received, sent, dropped)


RECEIVER_SCRIPT = r"""
import os, select, signal, socket, sys, threading, time
sys.path.insert(0, %(root)r)
from socketproxy_core import receiver
from socketproxy_core.endpoints import Config, Dest

dest = Dest("127.0.0.1", %(port)d, "127.0.0.1:%(port)d", socket.AF_INET)
config = Config(listen_host="127.0.0.1", listen_port=1, dests=(dest, dest), buffer=0, pipe_size=1 << 20)
listener = socket.create_server(("127.0.0.1", 0))
source_peer = socket.create_connection(listener.getsockname())
source, peer = listener.accept()
lifeline_r, lifeline_w = os.pipe()
recv = receiver.Receiver(source, "%%s:%%d" %% peer, config, lifeline_r)
recv.start()


class StopWithSourceData:
    # Once the source has streamed a while and no pipe is pending (the source is watched), SIGTERM
    # arrives, and the poll reports the wake-up pipe first and the source's data after it, as it
    # does after any backpressure episode (events come in the order of registration).
    def __init__(self, poll_set):
        self.poll_set, self.started, self.signalled = poll_set, time.monotonic(), False

    def __getattr__(self, name):
        return getattr(self.poll_set, name)

    def poll(self, *args):
        if not self.signalled and time.monotonic() - self.started > 0.5 and not recv.pending:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
            events = [event for event in self.poll_set.poll(*args) if event[0] != recv.source_fd]
            events.sort(key=lambda event: event[0] != recv.wake_fd)
            print("batch", events, file=sys.stderr, flush=True)
            return events + [(recv.source_fd, select.POLLIN)]
        return self.poll_set.poll(*args)


if hasattr(recv, "loop"):
    recv.loop.poller.poll_set = StopWithSourceData(recv.loop.poller.poll_set)
elif hasattr(recv.poller, "poll_set"):
    recv.poller.poll_set = StopWithSourceData(recv.poller.poll_set)
else:
    recv.poller = StopWithSourceData(recv.poller)
sent = []


def stream():
    block = b"s" * 65536
    total = 0
    try:
        while total < (64 << 20):
            total += source_peer.send(block)
    except OSError:
        pass
    sent.append(total)


threading.Thread(target=stream, daemon=True).start()
code = recv.run()
print("receiver returned", code, flush=True)
sys.exit(code)
"""


def test_a_stop_in_the_same_poll_batch_as_source_data_ends_the_receiver_in_order(listener):
    """In-process: SIGTERM arrives while the source has data, and the poll reports the wake-up pipe
    before the source: the receiver stops reading, flushes and returns 0 (no EBADF on the closed
    source, no ValueError unregistering it)."""
    def reader(conn):
        while conn.recv(1 << 20):
            pass

    dest = listener(reader)
    result = subprocess.run([sys.executable, "-c", RECEIVER_SCRIPT % {"root": ROOT, "port": dest.port}],
                            capture_output=True, text=True, timeout=scaled(60), cwd=ROOT)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "receiver died" not in output, output
    assert result.returncode == 0, output
    assert "receiver returned 0" in output, output
    assert "batch [(" in output, output  # the stop came with the wake-up pipe first in its batch


class SlowReader:
    """A destination that reads `size` bytes every `every` seconds per connection, counting them."""

    def __init__(self, size, every):
        self.size, self.every = size, every
        self.read = 0

    def __call__(self, conn):
        while True:
            chunk = conn.recv(self.size)
            if not chunk:
                return
            self.read += len(chunk)
            time.sleep(self.every)


@pytest.mark.parametrize("user, size, every", [("root", 8192, 0.005), ("nobody", 8192, 0.005),
                                               ("root", 1024, 0.1)], ids=["root", "nobody", "10kBps"])
def test_every_process_signalled_at_once_while_sources_stream_into_slow_readers(proxy, listener, user, size,
                                                                                 every):
    """systemd's stop: SIGTERM to every process of the tree at once while 8 sources stream into slow
    readers (about 1.6 MB/s, or 10 kB/s, per connection), as root and as nobody: main exits 0, no
    receiver dies, no traceback, no error line."""
    prefix = ()
    if user == "nobody":
        why = nobody_can_run_the_proxy()
        if why:
            pytest.skip(why)
        prefix = AS_NOBODY
    reader = SlowReader(size, every)
    slow = listener(reader, rcvbuf=8192)
    px = proxy(["127.0.0.1:%d" % slow.port, "127.0.0.1:%d" % slow.port], prefix=prefix)
    sources = [connect_source(px.port) for _ in range(8)]
    stop = threading.Event()
    threads = [threading.Thread(target=stream_until, args=(s, stop), daemon=True) for s in sources]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(by_role(px.pid, "forwarder")) == 16, 30)
    # The readers are reading; the sources send far faster than they read, so every pipe is full by then.
    wait_until(lambda: reader.read > 16 * 20 * size, 60, message=lambda: "read %d bytes" % reader.read)
    procs = [psutil.Process(px.pid)] + psutil.Process(px.pid).children(recursive=True)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    assert px.proc.wait(scaled(10)) == 0, px.log()[-3000:]
    stop.set()
    for source in sources:
        source.close()
    log = px.log()
    assert "Traceback" not in log, log[-5000:]
    assert "died" not in log, log[-5000:]
    assert not re.search(r" (ERROR|CRITICAL) ", log), log[-5000:]


def test_a_half_closed_primary_session_ends_after_fin_timeout(proxy, listener):
    """The source sends and half-closes; the primary never answers nor closes: --fin-timeout after
    the source's FIN the session is closed, its slot freed, and the log says why."""
    held = []

    def never_answers(conn):
        held.append(conn)
        while conn.recv(4096):
            pass
        while True:  # the proxy's FIN came: keep the connection open, answer nothing
            time.sleep(0.2)

    primary = listener(never_answers)
    px = proxy(["127.0.0.1:%d" % primary.port], "--primary", "--fin-timeout", "1")
    source = connect_source(px.port)
    source.sendall(b"request\n")
    source.shutdown(socket.SHUT_WR)
    wait_until(lambda: sees_close(source), 20, message=lambda: px.log()[-2000:])
    wait_for_log(px.log_path, r"fin timeout|--fin-timeout")
    wait_until(lambda: not by_role(px.pid, "receiver"), 20)
    source.close()


def test_a_primary_that_stops_reading_ends_the_session_after_send_timeout(proxy, listener):
    """After the handover the receiver writes requests straight into the primary's socket: the
    send-timeout rule holds there too. A primary that answers, then reads nothing more (nor closes)
    while requests wait: after --send-timeout without progress the source sees its connection end
    and the log says why, instead of the source being held for ever."""
    stop_reading = threading.Event()

    def reads_then_stalls(conn):
        while not stop_reading.is_set():
            chunk = conn.recv(65536)
            if not chunk:
                return
            conn.sendall(b"+OK\r\n")
            stop_reading.set()
        while True:
            time.sleep(0.2)

    primary = listener(reads_then_stalls, rcvbuf=16384)
    px = proxy(["127.0.0.1:%d" % primary.port], "--primary", "--send-timeout", "1")
    source = connect_source(px.port)
    source.sendall(b"first\n")
    source.settimeout(scaled(20))
    assert source.recv(16) == b"+OK\r\n"
    wait_for_log(px.log_path, r"requests go straight into the primary's socket|accepted", 20)
    stop = threading.Event()
    thread = threading.Thread(target=stream_until, args=(source, stop), daemon=True)
    thread.start()
    wait_until(lambda: sees_close(source), 30, message=lambda: px.log()[-2000:])
    stop.set()
    wait_for_log(px.log_path, r"took no data for 1\.0 s while requests waited \(send timeout\)")
    wait_until(lambda: not by_role(px.pid, "receiver"), 20)
    assert "Traceback" not in px.log()
    source.close()


PRODUCT = ["socketproxy.py", "forwarder.py"] + sorted(
    os.path.join("socketproxy_core", name) for name in os.listdir(os.path.join(ROOT, "socketproxy_core"))
    if name.endswith(".py"))


def test_no_process_waits_outside_its_loop():
    """Every wait is the loop's: no sleep, no select, no poll of its own in the product's code (a
    poll is loop.py's, and main's accept loop and its stop); psutil never waits with a timeout."""
    found = []
    for path in PRODUCT:
        for number, line in enumerate(open(os.path.join(ROOT, path)), 1):
            code = line.split("#")[0]
            if re.search(r"time\.sleep\(|select\.select\(|wait_procs\([^)]*timeout=[1-9]", code):
                found.append("%s:%d: %s" % (path, number, line.strip()))
            if re.search(r"\.poll\(", code) and path not in ("socketproxy.py", "socketproxy_core/loop.py",
                                                              "socketproxy_core/zerocopy.py"):
                found.append("%s:%d: %s" % (path, number, line.strip()))
    assert not found, "waits outside a loop:\n" + "\n".join(found)
