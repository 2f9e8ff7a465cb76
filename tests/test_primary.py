"""--primary and --mirror-policy: the first DEST is the source's session, its replies go back to the
source; the other DESTs are mirrors whose replies are discarded.

The primary here is an echo server of the test (a thread per connection, every byte sent back with a
fixed byte mapping, so a reply can never be mistaken for the request it answers) or `fakes.destination
--echo` in a subprocess where it must be killed -9.
"""
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from support import (AS_NOBODY, ROOT, blackhole, by_role, connect_source, free_port, nobody_can_run_the_proxy,
                     scaled, sees_close, stays_true, syn_sent_to, wait_for_log, wait_until)

REPLY_MAP = bytes((b ^ 0x5A) for b in range(256))  # what the echo server does to every byte


def reply_to(request):
    return request.translate(REPLY_MAP)


class EchoServer:
    """A primary on 127.0.0.1: a thread per accepted connection sends every byte back (REPLY_MAP).

    Controls: accept_gate (an Event: nothing is accepted before it is set; the kernel completes
    handshakes and takes data meanwhile), close_after / reset_after N request bytes (a close, or a
    reset with SO_LINGER 0, once N bytes have arrived; the reply to them is sent first for a close,
    never for a reset), on_eof (bytes sent after the peer's FIN, before our close), reading (cleared:
    stop reading).
    Per connection it records the request bytes, whether it saw EOF, and how it ended.
    """

    def __init__(self, listener=None, close_after=None, reset_after=None, on_eof=b"", accept_gate=None):
        if listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.accept_gate = accept_gate
        self.close_after = close_after
        self.reset_after = reset_after
        self.on_eof = on_eof
        self.reading = threading.Event()
        self.reading.set()
        self.lock = threading.Lock()
        self.connections = []  # dicts: data, eof, ended ("closed", "reset", "eof", error text), accepted_at
        self.stopping = False
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        if self.accept_gate is not None:
            self.accept_gate.wait()
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"data": bytearray(), "eof": False, "ended": None, "accepted_at": time.monotonic(),
                      "sock": conn}
            with self.lock:
                self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn, record):
        limit = self.close_after or self.reset_after
        try:
            while not self.stopping:
                self.reading.wait()
                size = 65536 if limit is None else min(65536, limit - len(record["data"]))
                chunk = conn.recv(size)
                if not chunk:
                    record["eof"] = True
                    if self.on_eof:
                        conn.sendall(self.on_eof)
                    record["ended"] = "eof"
                    break
                with self.lock:
                    record["data"] += chunk
                if self.reset_after is not None and len(record["data"]) >= self.reset_after:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    record["ended"] = "reset"
                    break
                conn.sendall(reply_to(chunk))
                if self.close_after is not None and len(record["data"]) >= self.close_after:
                    record["ended"] = "closed"
                    break
        except OSError as exc:
            record["ended"] = "error: %s" % exc
        conn.close()

    def streams(self):
        with self.lock:
            return [bytes(c["data"]) for c in self.connections]

    def ended(self):
        with self.lock:
            return [c["ended"] for c in self.connections]

    def stop(self):
        self.stopping = True
        self.reading.set()
        self.listener.close()
        with self.lock:
            for record in self.connections:
                try:
                    record["sock"].close()
                except OSError:
                    pass


class NeverReads:
    """A mirror that accepts and never reads, until start_reading(); then it reads and keeps everything."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.reading = threading.Event()
        self.lock = threading.Lock()
        self.connections = []  # dicts: data, open
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"data": bytearray(), "open": True}
            with self.lock:
                self.connections.append(record)
            threading.Thread(target=self._read, args=(conn, record), daemon=True).start()

    def _read(self, conn, record):
        self.reading.wait()
        with conn:
            while True:
                try:
                    chunk = conn.recv(1 << 20)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                with self.lock:
                    record["data"] += chunk
        record["open"] = False

    def start_reading(self):
        self.reading.set()

    def streams(self):
        with self.lock:
            return [bytes(c["data"]) for c in self.connections]

    def closed_count(self):
        with self.lock:
            return sum(1 for c in self.connections if not c["open"])

    def stop(self):
        self.reading.set()
        self.listener.close()


@pytest.fixture
def servers():
    """Factory of in-test servers (EchoServer, NeverReads, ...): stopped at teardown."""
    made = []

    def make(cls, *args, **kwargs):
        server = cls(*args, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def accepts(port):
    """Whether something accepts connections on 127.0.0.1:port now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def fake_destination():
    """Factory: fake_destination(port, *flags) runs `python -m fakes.destination` (its output, which
    prints every byte it gets, to /dev/null) until it accepts; every one is killed at teardown (SIGKILL
    ends a stopped one too)."""
    started = []

    def start(port, *flags):
        proc = subprocess.Popen([sys.executable, "-m", "fakes.destination", "--port", str(port), *flags],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        wait_until(lambda: proc.poll() is not None or accepts(port))
        assert proc.poll() is None, "fake-destination exited %s" % proc.returncode
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# -- helpers ----------------------------------------------------------------------------------------


def recv_exactly(sock, size, deadline_s=30.0):
    """size bytes from sock, or fail (a close, a reset or the deadline before they all came)."""
    sock.settimeout(scaled(deadline_s))
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the connection closed after %d of %d bytes" % (len(data), size)
        data += chunk
    return bytes(data)


def recv_until_end(sock, deadline_s=30.0):
    """(every byte until the end, how it ended: "eof" or "reset"); fails at the deadline."""
    deadline = time.monotonic() + scaled(deadline_s)
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no end within %.1f s (%d bytes so far)" % (scaled(deadline_s), len(data))
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(data), "reset"
        except socket.timeout:
            continue
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def round_trip(sock, request):
    sock.sendall(request)
    return recv_exactly(sock, len(request))


def random_rounds(source, count, largest, seed):
    """count request/response rounds of 1..largest random bytes, each reply checked; the requests."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        request = rng.randbytes(rng.randint(1, largest))
        assert round_trip(source, request) == reply_to(request)
        requests.append(request)
    return requests


def group_gone(px):
    return not by_role(px.pid, "receiver") and not by_role(px.pid, "forwarder")


def wait_group_gone(px, timeout=10.0):
    wait_until(lambda: group_gone(px), timeout,
               message=lambda: "group still alive: %s\n%s" % (
                   [" ".join(p.cmdline()) for p in by_role(px.pid, "")], px.log()[-3000:]))


def done_line(px, dest_port):
    """(sent, dropped) of the forwarder to 127.0.0.1:dest_port, once its done line is logged."""
    match = wait_for_log(px.log_path, r"dst=127\.0\.0\.1:%d forwarder done: sent (\d+) bytes, dropped (\d+) bytes"
                         % dest_port, 60)[0]
    return int(match.group(1)), int(match.group(2))


def received_line(px):
    """Bytes the receiver got from the source, from its group-ended line."""
    match = wait_for_log(px.log_path, r"group ended: .*; received (\d+) bytes from source", 60)[0]
    return int(match.group(1))


def assert_clean_log(px):
    assert "Traceback" not in px.log(), px.log()[-4000:]


def new_source_works(px, size=100):
    """A new source gets a fresh group and its replies: main still accepts."""
    sock = connect_source(px.port)
    try:
        request = os.urandom(size)
        assert round_trip(sock, request) == reply_to(request)
    finally:
        sock.close()


# -- replies, ordering, mirrors ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_replies_come_back_byte_for_byte_and_the_mirror_gets_every_request(proxy, recorder, servers, policy):
    """200 request/response rounds of 1..5000 random bytes: every reply is the primary's, byte for byte
    and in order; each mirror (they keep up) gets every request byte in order; the replies of a mirror
    that answers too (an echo server) never reach the source."""
    echo = servers(EchoServer)
    mirror = recorder()
    answering = servers(EchoServer)
    px = proxy(["127.0.0.1:%d" % d.port for d in (echo, mirror, answering)], "--primary", "--mirror-policy", policy)
    source = connect_source(px.port)
    requests = random_rounds(source, 200, 5000, 7)
    source.shutdown(socket.SHUT_WR)
    tail, how = recv_until_end(source)
    assert (tail, how) == (b"", "eof")
    source.close()
    everything = b"".join(requests)
    wait_until(lambda: mirror.closed_count() == 1, 30, message=lambda: "mirror has %d bytes" % mirror.total())
    assert mirror.streams() == [everything]
    assert echo.streams() == [everything]
    wait_until(lambda: answering.ended() == ["eof"])
    assert answering.streams() == [everything]
    assert done_line(px, mirror.port) == (len(everything), 0)
    assert done_line(px, answering.port) == (len(everything), 0)
    assert received_line(px) == len(everything)
    wait_group_gone(px)
    assert_clean_log(px)


@pytest.mark.parametrize("max_connections, pipe_kib", [(256, 64), (32, 512)])
def test_as_nobody_replies_come_back_and_the_mirror_gets_every_request(proxy, recorder, servers, max_connections,
                                                                       pipe_kib):
    """As an unprivileged user, whose pipe budget makes pipes small: 64 KiB at the default
    --max-connections, 512 KiB at 32 (three pipes a source: without framing nothing is retained). The
    socket handed over (SCM_RIGHTS) works unprivileged, every reply comes back and the mirror
    (--mirror-policy wait: nothing may be dropped) gets every request."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    echo = servers(EchoServer)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary", "--mirror-policy", "wait",
               "--max-connections", str(max_connections), "--log-level", "debug", prefix=AS_NOBODY)
    wait_for_log(px.log_path, r"pipes of %d KiB: %d sources" % (pipe_kib, max_connections))
    source = connect_source(px.port)
    requests = random_rounds(source, 300, 5000, 11)
    wait_for_log(px.log_path, r"requests go straight into the primary's socket from now on")
    source.close()
    everything = b"".join(requests)
    wait_until(lambda: mirror.closed_count() == 1, 30)
    assert mirror.streams() == [everything]
    assert echo.streams() == [everything]
    assert done_line(px, echo.port) == (len(everything), 0)
    assert done_line(px, mirror.port) == (len(everything), 0)
    wait_group_gone(px)
    assert_clean_log(px)


def test_primary_forwarder_title_says_primary(proxy, recorder, servers):
    """The primary's forwarder (the first DEST) has "(primary)" in its title; the mirror's does not."""
    echo = servers(EchoServer)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary")
    source = connect_source(px.port)
    assert round_trip(source, b"hello") == reply_to(b"hello")
    def forwarder_titles():
        titles = [" ".join(p.cmdline()).strip() for p in by_role(px.pid, "forwarder")]
        return titles if len(titles) == 2 else None

    titles = wait_until(forwarder_titles)
    primary = [t for t in titles if "(primary)" in t]
    assert len(primary) == 1, titles
    assert "-> 127.0.0.1:%d (primary)" % echo.port in primary[0]
    assert [t for t in titles if "(primary)" not in t][0].split(" | ")[0].strip().endswith("-> 127.0.0.1:%d" % mirror.port)
    source.close()


# -- half-closes ------------------------------------------------------------------------------------


def test_source_half_close_still_gets_every_reply_then_eof(proxy, recorder, servers):
    """A source that shuts down its write side still gets all the primary's replies, and what the
    primary sends after it saw our FIN, then EOF; the primary saw its FIN right after the requests."""
    echo = servers(EchoServer, on_eof=b"<after your FIN>")
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary")
    rng = random.Random(3)
    requests = b"".join(rng.randbytes(rng.randint(1, 20000)) for _ in range(50))
    source = connect_source(px.port)

    def send_then_shut():
        source.sendall(requests)
        source.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send_then_shut, daemon=True)
    sender.start()
    replies, how = recv_until_end(source, 60)
    sender.join(10)
    assert how == "eof"
    assert len(replies) == len(requests) + len(b"<after your FIN>")
    assert replies == reply_to(requests) + b"<after your FIN>"
    assert echo.streams() == [requests]
    assert [c["eof"] for c in echo.connections] == [True]  # the FIN reached the primary after every request
    source.close()
    wait_for_log(px.log_path, r"closed connection to 127\.0\.0\.1:%d: source finished, and the primary's %d bytes "
                 r"of replies reached it" % (echo.port, len(replies)))
    wait_group_gone(px)
    assert mirror.streams() == [requests]
    assert "its group ends" not in px.log()  # an orderly end, not the primary ending the session
    assert_clean_log(px)


def test_primary_closes_after_replying_source_gets_replies_then_eof(proxy, recorder, servers):
    """A primary that closes once it has replied: the source gets every reply, then EOF (not a reset);
    the group ends; main serves the next source with a fresh group."""
    rng = random.Random(5)
    requests = [rng.randbytes(rng.randint(1, 5000)) for _ in range(20)]
    total = sum(len(r) for r in requests)
    echo = servers(EchoServer, close_after=total)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary")
    source = connect_source(px.port)
    for request in requests[:-1]:
        assert round_trip(source, request) == reply_to(request)
    source.sendall(requests[-1])  # the primary replies to it, then closes
    tail, how = recv_until_end(source, 15)
    assert (tail, how) == (reply_to(requests[-1]), "eof")
    assert echo.ended() == ["closed"]
    wait_for_log(px.log_path, r"the primary 127\.0\.0\.1:%d closed the connection: closing the source; its group "
                 r"ends" % echo.port)
    wait_for_log(px.log_path, r"stopping: the primary closed the session")
    wait_group_gone(px)
    source.close()
    assert mirror.streams()[0] == b"".join(requests)
    # Main still accepts: a new source, a new group, a new connection to the primary.
    second = connect_source(px.port)
    request = os.urandom(total)
    assert round_trip(second, request) == reply_to(request)
    assert recv_until_end(second, 15) == (b"", "eof")
    assert echo.ended() == ["closed", "closed"]
    second.close()
    wait_until(lambda: len(re.findall(r"the primary .* closed the connection", px.log())) == 2)
    wait_group_gone(px)
    assert px.proc.poll() is None
    assert_clean_log(px)


# -- the primary ending the session -----------------------------------------------------------------


def test_primary_resets_source_is_reset(proxy, recorder, servers):
    """A primary that resets the connection: the source sees a reset (ConnectionResetError); the group ends."""
    echo = servers(EchoServer, reset_after=2000)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary")
    source = connect_source(px.port)
    first = os.urandom(1000)
    assert round_trip(source, first) == reply_to(first)
    source.sendall(os.urandom(1000))  # the primary resets on it, unanswered
    started = time.monotonic()
    tail, how = recv_until_end(source, 10)
    assert (tail, how) == (b"", "reset")
    assert time.monotonic() - started < scaled(2.0)
    assert echo.ended() == ["reset"]
    wait_for_log(px.log_path, r"the primary 127\.0\.0\.1:%d failed \(.*\): resetting the source; its group ends"
                 % echo.port)
    wait_for_log(px.log_path, r"stopping: the primary reset the session")
    wait_group_gone(px)
    source.close()
    echo.reset_after = None
    new_source_works(px)
    assert_clean_log(px)


def test_primary_refusing_resets_the_source(proxy, recorder):
    """A primary that refuses the connection (nothing listens): the source is reset, the group ends,
    nothing is retried, and main goes on accepting."""
    port = free_port()
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % port, "127.0.0.1:%d" % mirror.port], "--primary", "--retry-interval", "0.5")
    for _ in range(2):
        source = connect_source(px.port)
        tail, how = recv_until_end(source, 10)
        assert (tail, how) == (b"", "reset")
        source.close()
        wait_group_gone(px)
    found = wait_for_log(px.log_path, r"cannot reach the primary 127\.0\.0\.1:%d within --connect-timeout: "
                         r"resetting the source; its group ends" % port, count=2)
    assert len(found) == 2
    assert len(re.findall(r"stopping: the primary reset the session", px.log())) == 2
    assert "cannot connect to 127.0.0.1:%d" % port not in px.log()  # never retried (only a debug line)
    assert_clean_log(px)


def test_primary_blackholed_resets_the_source_after_connect_timeout(proxy, recorder):
    """A primary that never answers the SYN: the source is reset once --connect-timeout (1 s) is over.

    What the source sent meanwhile waited in the primary's pipe and is dropped with it (counted in the
    primary forwarder's done line). The mirrors are independent of the primary's connect: the receiver
    fans every chunk out to them as it reads it, and when the session ends the receiver stops with its
    usual flush, so the mirror gets a full copy of what the source sent before the reset.
    """
    listener, fillers = blackhole()
    port = listener.getsockname()[1]
    mirror = recorder()
    try:
        px = proxy(["127.0.0.1:%d" % port, "127.0.0.1:%d" % mirror.port], "--primary", "--connect-timeout", "1")
        source = connect_source(px.port)
        connected = time.monotonic()
        data = os.urandom(10000)
        source.sendall(data)
        tail, how = recv_until_end(source, 10)
        elapsed = time.monotonic() - connected
        assert (tail, how) == (b"", "reset")
        assert 0.9 <= elapsed <= scaled(3.0), elapsed
        wait_for_log(px.log_path, r"cannot reach the primary 127\.0\.0\.1:%d within --connect-timeout: "
                     r"resetting the source; its group ends" % port)
        assert done_line(px, port) == (0, len(data))
        wait_until(lambda: mirror.closed_count() == 1)
        assert mirror.streams() == [data]
        assert done_line(px, mirror.port) == (len(data), 0)
        wait_group_gone(px)
        source.close()
        assert_clean_log(px)
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def test_primary_killed_every_source_sees_its_close_within_a_second(proxy, recorder, fake_destination):
    """kill -9 of the primary (fake-destination --echo) with 4 sources: each sees its connection end
    within 1 s of the kill, every group ends, and main serves new sources once the primary is back."""
    port = free_port()
    dest = fake_destination(port, "--echo")
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % port, "127.0.0.1:%d" % mirror.port], "--primary")
    sources = [connect_source(px.port) for _ in range(4)]
    for index, source in enumerate(sources):
        line = b"source %d says hello\n" % index
        assert round_trip(source, line) == line  # fake-destination --echo sends each line back as it is
    for source in sources:
        source.setblocking(False)
    dest.kill()
    killed = time.monotonic()
    ends = {}
    deadline = killed + scaled(5.0)
    while len(ends) < len(sources) and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in sources if s not in ends], [], [], 0.05)
        for source in ready:
            try:
                chunk = source.recv(4096)
            except ConnectionResetError:
                chunk = b""
            assert chunk == b"", chunk
            ends[source] = time.monotonic() - killed
    assert len(ends) == len(sources), "%d of %d sources saw their connection end" % (len(ends), len(sources))
    assert max(ends.values()) <= scaled(1.0), sorted(ends.values())
    dest.wait(10)
    wait_until(lambda: len(re.findall(r"the primary 127\.0\.0\.1:%d (closed the connection|failed)" % port,
                                      px.log())) == 4, message=px.log)
    wait_group_gone(px)
    for source in sources:
        source.close()
    fake_destination(port, "--echo")
    again = connect_source(px.port)
    assert round_trip(again, b"back again\n") == b"back again\n"
    again.close()
    assert_clean_log(px)


def test_primary_forwarder_killed_the_source_and_the_primary_both_see_the_end(proxy, recorder, servers):
    """kill -9 of the primary's forwarder, once it has handed the primary's socket to the receiver: the
    group ends (fate sharing), so the source sees its connection end, and so does the primary: no
    process of the group keeps a copy of its socket open. Main serves the next source."""
    echo = servers(EchoServer)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary", "--log-level", "debug")
    source = connect_source(px.port)
    random_rounds(source, 5, 100, 1)
    wait_for_log(px.log_path, r"requests go straight into the primary's socket from now on")
    primary_fwd = [p for p in by_role(px.pid, "forwarder") if "(primary)" in " ".join(p.cmdline())]
    assert len(primary_fwd) == 1
    primary_fwd[0].kill()
    wait_until(lambda: sees_close(source), message=px.log)
    wait_until(lambda: echo.ended()[0] is not None, message=px.log)  # EOF or reset: no copy kept it open
    wait_group_gone(px)
    source.close()
    assert re.search(r"group ended: forwarder %d to 127\.0\.0\.1:%d died \(killed by SIGKILL\)" % (
        primary_fwd[0].pid, echo.port), px.log()), px.log()[-2000:]
    new_source_works(px)


# -- data sent before the primary answers -----------------------------------------------------------


def test_requests_sent_before_the_primary_reads_get_their_replies(proxy, recorder, servers):
    """A primary whose kernel completes the handshake (listen backlog) but which accepts and reads only
    after 1 s: requests the source sent at once are delivered and answered, in order."""
    gate = threading.Event()
    echo = servers(EchoServer, accept_gate=gate)
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary")
    source = connect_source(px.port)
    requests = [os.urandom(size) for size in (1, 500, 3000, 70000)]
    for request in requests:
        source.sendall(request)
    everything = b"".join(requests)
    wait_for_log(px.log_path, r"connected to 127\.0\.0\.1:%d" % echo.port)  # the kernel's handshake, at once
    # For 1 s the primary neither accepts nor reads: no reply can come.
    assert stays_true(lambda: not echo.connections and not select.select([source], [], [], 0)[0], 1.0)
    gate.set()
    assert recv_exactly(source, len(everything), 15) == reply_to(everything)
    source.close()
    wait_group_gone(px)
    assert echo.streams() == [everything]
    assert_clean_log(px)


class LatePrimary:
    """An echo primary whose accept queue is full: the first SYN to it goes unanswered, and the one
    retransmitted 1 s later connects once admit() has made room."""

    def __init__(self, servers):
        listener, self.fillers = blackhole()
        self.port = listener.getsockname()[1]
        self.gate = threading.Event()
        self.echo = servers(EchoServer, listener=listener, accept_gate=self.gate)

    def admit(self):
        """Once a SYN went unanswered (the connect is in flight): room for the retransmitted one."""
        wait_until(lambda: syn_sent_to(self.port))
        self.gate.set()  # accept the fillers
        wait_until(lambda: len(self.echo.connections) >= len(self.fillers))
        for filler in self.fillers:
            filler.close()

    def close(self):
        for sock in self.fillers:
            sock.close()


def test_requests_sent_while_the_primary_connect_is_in_flight_wait_for_it(proxy, recorder, servers):
    """A primary that drops the first SYN (its accept queue full), then makes room: the SYN retransmitted
    1 s later connects, within --connect-timeout 3; what the source sent at once waited in the primary's
    pipe (the mirror got its copy meanwhile) and gets its replies.

    Then the forwarder hands the connected socket to the receiver, which (once the pipe is empty)
    writes the later requests straight into it: order holds across the switch, and the primary's
    done line counts what went either way."""
    late = LatePrimary(servers)
    port, echo = late.port, late.echo
    mirror = recorder()
    try:
        px = proxy(["127.0.0.1:%d" % port, "127.0.0.1:%d" % mirror.port], "--primary", "--connect-timeout", "3",
                   "--log-level", "debug")
        source = connect_source(px.port)
        started = time.monotonic()
        request = os.urandom(20000)
        source.sendall(request)
        wait_until(lambda: mirror.total() == len(request))  # the mirror is not held by the primary's connect
        wait_until(lambda: syn_sent_to(port))  # the forwarder's SYN went unanswered: the connect is in flight
        assert not select.select([source], [], [], 0)[0]
        late.admit()
        assert recv_exactly(source, len(request), 15) == reply_to(request)
        assert time.monotonic() - started >= 0.9  # not before the SYN's retransmission
        later = random_rounds(source, 50, 3000, 3)
        wait_for_log(px.log_path, r"requests go straight into the primary's socket from now on")
        source.close()
        everything = request + b"".join(later)
        assert done_line(px, port) == (len(everything), 0)
        assert everything in echo.streams()
        wait_until(lambda: mirror.closed_count() == 1)
        assert mirror.streams() == [everything]
        wait_group_gone(px)
        assert "cannot reach the primary" not in px.log()
        assert_clean_log(px)
    finally:
        late.close()


def test_a_source_that_finishes_while_the_primary_connect_is_in_flight_gets_its_replies(proxy, recorder, servers):
    """The source sends a request and shuts down its write side while the primary's SYN goes
    unanswered: the receiver has read everything and closed its pipes (the mirror is done) by the time
    the primary's forwarder connects and hands the socket over, which the receiver then just closes.
    The request reaches the primary through its pipe, the reply and then EOF reach the source, and
    the group ends cleanly (no member taken for dead)."""
    late = LatePrimary(servers)
    port, echo = late.port, late.echo
    mirror = recorder()
    try:
        px = proxy(["127.0.0.1:%d" % port, "127.0.0.1:%d" % mirror.port], "--primary", "--connect-timeout", "3")
        source = connect_source(px.port)
        request = os.urandom(20000)
        source.sendall(request)
        source.shutdown(socket.SHUT_WR)
        wait_until(lambda: mirror.closed_count() == 1)  # the receiver has closed every pipe
        assert mirror.streams() == [request]
        late.admit()
        assert recv_until_end(source, 15) == (reply_to(request), "eof")
        source.close()
        assert request in echo.streams()
        assert done_line(px, port) == (len(request), 0)
        wait_group_gone(px)
        assert " ERROR " not in px.log() and "SIGKILL" not in px.log(), px.log()
        assert_clean_log(px)
    finally:
        late.close()


# -- mirror policies --------------------------------------------------------------------------------


def test_a_burst_after_a_pause_reaches_a_napping_mirror_whole(proxy, recorder, servers):
    """Mirrors of --primary with framing send in batches (without framing they send turn by turn, and
    do not nap): after a quiet wake a mirror naps (20 ms) before it reads
    its pipe again. A burst must not be dropped for that nap: the receiver pokes the mirror as soon as
    a quarter of its pipe is used. 4 MiB after a pause, in 32 KiB pieces 0.5 ms apart (up to 60 MB/s,
    so a nap would let the 1 MiB pipe overflow, yet the mirror has over 10 ms to answer a poke on a
    busy machine), to a primary that never replies, reach the mirror whole, with no drop."""
    sink = recorder()  # the primary: reads everything at once, replies nothing
    mirror = recorder()
    px = proxy(["127.0.0.1:%d" % sink.port, "127.0.0.1:%d" % mirror.port], "--primary", "--framing", "line",
               "--log-level", "debug")
    source = connect_source(px.port)
    first = b"hello\n"
    source.sendall(first)
    wait_until(lambda: mirror.total() == len(first))
    burst = os.urandom(3 << 19).hex().encode().replace(b"0", b"\n")[:4 << 20]
    burst = burst[:burst.rfind(b"\n") + 1]
    for offset in range(0, len(burst), 32 << 10):
        source.sendall(burst[offset:offset + (32 << 10)])
        time.sleep(0.0005)  # pacing only: a mirror that is awake keeps up
    source.shutdown(socket.SHUT_WR)
    assert recv_until_end(source, 60) == (b"", "eof")
    source.close()
    everything = first + burst
    wait_until(lambda: mirror.closed_count() == 1, 30)
    assert "dst=127.0.0.1:%d woken before the batch's end" % mirror.port in px.log()
    assert done_line(px, mirror.port) == (len(everything), 0)
    assert mirror.streams() == [everything]
    assert sink.streams() == [everything]
    wait_group_gone(px)
    assert_clean_log(px)

ROUNDS = 2000
WAIT_ROUNDS = 500  # 32 MiB: several times what the mirror's socket buffers and pipe hold (about 5 MiB here)
BIG = 64 * 1024


class Rounds:
    """A source doing request/response rounds of BIG bytes in a thread; counts rounds and their latency."""

    def __init__(self, port, count=ROUNDS):
        self.sock = connect_source(port)
        self.count = count
        self.done = 0
        self.slowest = 0.0
        self.error = None
        self.request = os.urandom(BIG).replace(b"\n", b"-")  # one partial line for a fake destination
        self.reply = reply_to(self.request)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for _ in range(self.count):
                started = time.monotonic()
                got = round_trip(self.sock, self.request)
                if got != self.reply:
                    raise AssertionError("round %d: a wrong reply" % self.done)
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.done += 1
        except (OSError, AssertionError) as exc:
            self.error = exc

    def finished(self):
        return self.done == self.count or self.error is not None

    def finish(self):
        """Half-close and read to the end (the primary's FIN); close."""
        assert self.error is None, self.error
        self.sock.shutdown(socket.SHUT_WR)
        assert recv_until_end(self.sock, 30) == (b"", "eof")
        self.sock.close()


@pytest.mark.parametrize("mirror_kind", ["never-reads", "sigstopped"])
def test_mirror_policy_drop_a_stuck_mirror_never_slows_the_primary(proxy, servers, fake_destination, mirror_kind):
    """--mirror-policy drop: a mirror that takes nothing (never reads, or SIGSTOPped) loses data instead
    of holding the source: 2000 rounds of 64 KiB complete, none slower than 2 s (a held source would wait
    --send-timeout 60), and the mirror's forwarder counts the drop: sent + dropped = received."""
    echo = servers(EchoServer)
    if mirror_kind == "never-reads":
        mirror = servers(NeverReads)
        mirror_port = mirror.port
    else:
        mirror_port = free_port()
        mirror = fake_destination(mirror_port)
        mirror.send_signal(signal.SIGSTOP)
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror_port], "--primary",
               "--mirror-policy", "drop", "--send-timeout", "60")
    source = Rounds(px.port)
    wait_until(source.finished, 60, interval=0.2, message=lambda: "%d rounds of %d, the slowest %.1f s"
               % (source.done, ROUNDS, source.slowest))
    assert source.error is None, source.error
    assert source.slowest < scaled(2.0), source.slowest
    # The mirror takes data again: what its forwarder still holds goes out, and it finishes.
    if mirror_kind == "never-reads":
        mirror.start_reading()
    else:
        mirror.send_signal(signal.SIGCONT)
    source.finish()
    sent, dropped = done_line(px, mirror_port)
    received = received_line(px)
    assert received == ROUNDS * BIG
    assert dropped > 0
    assert sent + dropped == received
    assert done_line(px, echo.port) == (received, 0)
    if mirror_kind == "never-reads":
        wait_until(lambda: mirror.closed_count() == 1, 30)
        assert len(mirror.streams()[0]) == sent
        assert mirror.streams()[0][:BIG] == source.request  # the start, before it filled up, came whole
    wait_group_gone(px)
    assert_clean_log(px)


SMALL_ROUNDS = 600  # more than a pipe has buffers (a 1 MiB pipe has 256)


# A pipe's capacity is pipe_size/PAGE buffers, and every small chunk takes a whole one: judged by its
# free bytes alone, a mirror's pipe of small writes looked to have room while it was full, and the
# receiver held the source until --send-timeout cut the mirror (fixed: a tee or write the mirror's
# pipe does not take is a drop, or, for part of a record, finished from memory).
@pytest.mark.parametrize("framing", ["none", "line"])
def test_mirror_policy_drop_small_requests_never_wait_for_a_stuck_mirror(proxy, servers, framing):
    """--mirror-policy drop with small requests (then mixed with some of 500 and 60000 bytes): a mirror
    that never reads (its socket filled first by 100 rounds of 64 KiB) loses them, and no round waits
    for it (--send-timeout 60: a held source would wait that long); with --framing line it loses whole
    lines only."""
    echo = servers(EchoServer)
    mirror = servers(NeverReads)
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary", "--mirror-policy", "drop",
               "--send-timeout", "60", "--framing", framing)
    rng = random.Random(11)
    requests = [b"%06d " % i + rng.randbytes(BIG).replace(b"\n", b"-")[:BIG - 8] + b"\n" for i in range(100)]
    # Small requests take a pipe buffer each with the byte stream's tee; mixed sizes leave partly filled
    # buffers behind the whole records --framing line writes.
    sizes = [rng.randint(0, 90) for _ in range(SMALL_ROUNDS)]
    sizes += [rng.choice([rng.randint(0, 90), 500, 60000]) for _ in range(3 * SMALL_ROUNDS)]
    requests += [b"%06d " % (100 + i) + b"x" * size + b"\n" for i, size in enumerate(sizes)]
    source = connect_source(px.port)
    slowest = 0.0
    for request in requests:
        started = time.monotonic()
        source.sendall(request)
        assert recv_exactly(source, len(request), 5) == reply_to(request)
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < scaled(2.0), slowest
    mirror.start_reading()
    source.shutdown(socket.SHUT_WR)
    assert recv_until_end(source, 30) == (b"", "eof")
    source.close()
    sent, dropped = done_line(px, mirror.port)
    everything = b"".join(requests)
    assert received_line(px) == len(everything)
    assert dropped > 0 and sent + dropped == len(everything)
    wait_until(lambda: mirror.closed_count() == 1, 30)
    got = mirror.streams()[0]
    assert len(got) == sent
    if framing == "line":  # whole lines, in order, some missing
        lines = got.split(b"\n")
        assert lines.pop() == b""
        numbers = [int(line[:6]) for line in lines]
        assert numbers == sorted(set(numbers))
        assert all(line + b"\n" == requests[number] for line, number in zip(lines, numbers))
    wait_group_gone(px)
    assert_clean_log(px)


def test_mirror_policy_wait_a_stopped_mirror_holds_the_source(proxy, servers, fake_destination):
    """--mirror-policy wait: a SIGSTOPped mirror holds the source (backpressure: the rounds stop); on
    SIGCONT they all complete and the mirror lost nothing."""
    echo = servers(EchoServer)
    mirror_port = free_port()
    mirror = fake_destination(mirror_port)
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror_port], "--primary",
               "--mirror-policy", "wait", "--send-timeout", "60")
    mirror.send_signal(signal.SIGSTOP)
    source = Rounds(px.port, WAIT_ROUNDS)
    try:
        # The mirror's socket buffers and pipe fill up, then the rounds stop.
        def stalled():
            done = source.done
            return stays_true(lambda: source.done == done, 2.0)

        wait_until(stalled, 60, interval=0.1, message=lambda: "%d rounds done, still going" % source.done)
        held_at = source.done
        assert 0 < held_at < WAIT_ROUNDS and source.error is None
        assert stays_true(lambda: source.done == held_at, scaled(3.0))  # bounded: held, not just slow
    finally:
        mirror.send_signal(signal.SIGCONT)
    wait_until(source.finished, 60, interval=0.2, message=lambda: "%d rounds of %d" % (source.done, WAIT_ROUNDS))
    source.finish()
    sent, dropped = done_line(px, mirror_port)
    assert (sent, dropped) == (WAIT_ROUNDS * BIG, 0)
    assert received_line(px) == WAIT_ROUNDS * BIG
    wait_group_gone(px)
    assert_clean_log(px)


def test_a_mirror_that_cannot_keep_up_drops_whole_turns_never_part_of_one(proxy, recorder, servers):
    """--mirror-policy drop without framing: a mirror whose shadow stops reading loses whole turns (each
    request the source sent before seeing the previous reply), never part of one. What the shadow gets
    is a run of whole requests in order, some missing; a turn that could only be cut (its pipe filled
    in its middle) ends the mirror's session there (abandoned, counted): a cut request is the last
    thing it gets, never followed by another request's bytes."""
    echo = servers(EchoServer)
    mirror = recorder(rcvbuf=4096)
    mirror.paused.set()  # it neither accepts nor reads: the mirror's socket, then its pipe fill up
    px = proxy(["127.0.0.1:%d" % echo.port, "127.0.0.1:%d" % mirror.port], "--primary", "--mirror-policy", "drop")
    source = connect_source(px.port)
    rng = random.Random(5)
    requests = [(b"R%06d:" % i) + rng.randbytes(rng.randint(1000, 200_000)) for i in range(150)]
    for request in requests:
        assert round_trip(source, request) == reply_to(request)
    mirror.paused.clear()
    source.close()
    wait_group_gone(px, 60)
    sent, dropped = done_line(px, mirror.port)
    assert dropped > 0, (sent, dropped)
    stream = b"".join(mirror.streams())
    assert len(stream) == sent, (len(stream), sent)
    pos, seen = 0, []
    while pos < len(stream):
        index = int(stream[pos + 1:pos + 7])
        request = requests[index]
        piece = stream[pos:pos + len(request)]
        assert stream[pos:pos + 1] == b"R" and not seen or index > seen[-1], (pos, seen[-3:])
        if piece != request:  # cut: it must be the end of what the shadow got
            assert request.startswith(piece) and pos + len(piece) == len(stream), (
                "request %d cut at %d of %d bytes and followed by other bytes" % (index, len(piece), len(request)))
            assert "abandoned mirroring this session" in px.log()
        seen.append(index)
        pos += len(piece)
    assert len(seen) < len(requests)
