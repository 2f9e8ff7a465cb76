"""The forwarder in-process: a resolver that hangs must not stall the source."""
import os
import socket
import threading
import time

import forwarder
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
    monkeypatch.setattr(forwarder.socket, "getaddrinfo", slow_getaddrinfo)
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
