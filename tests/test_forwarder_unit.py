"""The forwarder in-process: a resolver that hangs must not stall the source; a mirror in batches reads its replies."""
import os
import socket
import threading
import time

from socketproxy_core import forwarding as forwarder
from socketproxy_core import primary
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
    return forwarder.Forwarder(read_fd, SLOW_NAME, config), read_fd, write_fd


def test_hanging_resolver_keeps_the_pipe_drained(monkeypatch):
    """When getaddrinfo hangs, an attempt gives up at --connect-timeout and the pipe never stalls."""
    fwd, read_fd, write_fd = make_forwarder(monkeypatch)
    done = []
    thread = threading.Thread(target=writer, args=(write_fd, 4 << 20, done), daemon=True)
    thread.start()
    start = time.monotonic()
    assert fwd.connect(hold_pipe=False) is False
    assert time.monotonic() - start < 2.5  # the 3 s lookup did not hold the attempt
    thread.join(5)
    assert done and done[0] - start < 2.5, "the writer stalled behind the resolver"
    assert fwd.dropped == 4 << 20
    # The next attempt waits for the same lookup rather than starting another one.
    first_lookup, threads = fwd.lookup, threading.active_count()
    assert first_lookup is not None
    assert fwd.connect(hold_pipe=False) is False
    assert fwd.lookup is first_lookup and threading.active_count() <= threads
    os.close(read_fd)
    os.close(write_fd)


def test_first_attempt_holds_the_pipe_while_resolving(monkeypatch):
    """On the first attempt data waits in the pipe (it is delivered if the attempt succeeds)."""
    fwd, read_fd, write_fd = make_forwarder(monkeypatch)
    os.write(write_fd, b"early bytes")
    assert fwd.connect(hold_pipe=True) is False
    assert fwd.dropped == 0
    assert os.read(read_fd, 100) == b"early bytes"
    os.close(read_fd)
    os.close(write_fd)


def test_a_mirror_in_batches_reads_all_its_shadow_sent_and_naps_only_when_quiet(monkeypatch):
    """A mirror of --primary naps between batches, so it wakes seldom: one wake reads everything its
    shadow has sent (up to 1 MiB), not one 16 KiB buffer, and a wake that moved much (sent or read) is
    not followed by a nap; a quiet one is."""
    dest = Dest("127.0.0.1", 9, "127.0.0.1:9", socket.AF_INET)
    config = Config(listen_host="127.0.0.1", listen_port=1, dests=(dest, dest), primary=True)
    read_fd, write_fd = os.pipe()
    poke_fd = os.eventfd(0, os.EFD_NONBLOCK)
    ours, shadow = socket.socketpair()
    try:
        fwd = forwarder.Forwarder(read_fd, dest, config, poke_fd=poke_fd)
        ours.setblocking(False)
        fwd.sock = ours
        shadow.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        replies = 160 * 1024
        shadow.sendall(b"r" * replies)
        naps = []
        monkeypatch.setattr(primary.select, "select", lambda r, w, x, timeout: naps.append(timeout) or ([], [], []))
        fwd.read_replies()
        assert fwd.replies_read == replies
        primary.gather(fwd)
        assert naps == []  # it read 160 KiB this wake: more may be coming at once
        primary.gather(fwd)
        assert naps == [primary.MIRROR_BATCH_S]  # nothing moved since: a nap
    finally:
        for fd in (read_fd, write_fd, poke_fd):
            os.close(fd)
        ours.close()
        shadow.close()
