"""The forwarder in-process: a resolver that hangs must not stall the source; a mirror in batches
reads its replies; the loop's states."""
import os
import socket
import threading
import time

from socketproxy_core import forwarding
from socketproxy_core import sockets
from socketproxy_core.endpoints import Config, Dest

SLOW_NAME = Dest("slow.invalid", 9, "slow.invalid:9", 0)


def slow_getaddrinfo(*_args, **_kwargs):
    time.sleep(3)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def writer(fd, total, done):
    """Write total bytes into a pipe (blocking), then note when it finished."""
    block = b"z" * 65536
    left = total
    while left:
        left -= os.write(fd, block[:left])
    done.append(time.monotonic())


def make_forwarder(monkeypatch):
    monkeypatch.setattr(sockets.socket, "getaddrinfo", slow_getaddrinfo)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    config = Config(listen_host="127.0.0.1", listen_port=1, dests=(SLOW_NAME,), connect_timeout=1.0)
    return forwarding.Forwarder(read_fd, SLOW_NAME, config), read_fd, write_fd


def run_until(fwd, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the forwarder's loop did not get there"
        fwd.loop.run_once()


def attempt_failed(fwd):
    return fwd.state == forwarding.DOWN and not fwd.connector.active


def test_hanging_resolver_keeps_the_pipe_drained(monkeypatch):
    """When getaddrinfo hangs, an attempt gives up at --connect-timeout and the pipe never stalls."""
    fwd, read_fd, write_fd = make_forwarder(monkeypatch)
    done = []
    thread = threading.Thread(target=writer, args=(write_fd, 4 << 20, done), daemon=True)
    thread.start()
    start = time.monotonic()
    fwd.enter(forwarding.DOWN)
    fwd.start_attempt()
    run_until(fwd, lambda: attempt_failed(fwd))
    assert time.monotonic() - start < 2.5  # the 3 s lookup did not hold the attempt
    run_until(fwd, lambda: done)
    assert done[0] - start < 2.5, "the writer stalled behind the resolver"
    run_until(fwd, lambda: fwd.dropped == 4 << 20)
    # The next attempt waits for the same lookup rather than starting another one.
    first_lookup, threads = fwd.connector.lookup, threading.active_count()
    assert first_lookup is not None
    fwd.loop.cancel("backoff")
    fwd.start_attempt()
    assert fwd.connector.lookup is first_lookup and threading.active_count() <= threads
    run_until(fwd, lambda: attempt_failed(fwd))
    os.close(read_fd)
    os.close(write_fd)


def test_first_attempt_holds_the_pipe_while_resolving(monkeypatch):
    """On the first attempt data waits in the pipe (it is delivered if the attempt succeeds)."""
    fwd, read_fd, write_fd = make_forwarder(monkeypatch)
    os.write(write_fd, b"early bytes")
    fwd.start_attempt(first=True)
    assert fwd.state == forwarding.CONNECTING
    run_until(fwd, lambda: fwd.state == forwarding.DOWN)
    assert fwd.dropped == 0
    assert os.read(read_fd, 100) == b"early bytes"
    os.close(read_fd)
    os.close(write_fd)


def test_a_mirror_in_batches_reads_all_its_shadow_sent_and_naps_only_when_quiet():
    """A mirror of --primary naps between batches, so it wakes seldom: one wake reads everything its
    shadow has sent (up to 1 MiB), not one 16 KiB buffer, and a wake that moved much (sent or read) is
    not followed by a nap; a quiet one is."""
    dest = Dest("127.0.0.1", 9, "127.0.0.1:9", socket.AF_INET)
    config = Config(listen_host="127.0.0.1", listen_port=1, dests=(dest, dest), primary=True)
    read_fd, write_fd = os.pipe()
    poke_fd = os.eventfd(0, os.EFD_NONBLOCK)
    ours, shadow = socket.socketpair()
    try:
        fwd = forwarding.Forwarder(read_fd, dest, config, poke_fd=poke_fd)
        ours.setblocking(False)
        fwd.sock = ours
        shadow.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        replies = 160 * 1024
        shadow.sendall(b"r" * replies)
        fwd.read_replies()
        assert fwd.replies_read == replies
        fwd.wait_for_pipe()  # it read 160 KiB this wake: more may be coming at once, no nap
        assert fwd.loop.watching(read_fd) and not fwd.loop.has_timer("batch")
        fwd.wait_for_pipe()  # nothing moved since: a nap, the pipe unwatched, the poke watched
        assert not fwd.loop.watching(read_fd) and fwd.loop.watching(poke_fd)
        assert fwd.loop.has_timer("batch")
        os.eventfd_write(poke_fd, 1)  # the receiver pokes: the nap ends at once
        fwd.loop.run_once()
        assert fwd.loop.watching(read_fd) and not fwd.loop.watching(poke_fd)
        assert not fwd.loop.has_timer("batch")
    finally:
        for fd in (read_fd, write_fd, poke_fd):
            os.close(fd)
        ours.close()
        shadow.close()
