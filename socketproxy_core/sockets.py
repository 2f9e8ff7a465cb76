"""Sockets to destinations: resolving a name without blocking, the reasons for a failure, the bytes
a connection still holds, closing it with a reset, its options, and the send-timeout rule."""
import errno
import fcntl
import os
import socket
import ssl
import struct
import termios
import threading
import time

USER_TIMEOUT_FACTOR = 3
PROGRESS_POLL_S = 0.1  # while data waits for a full socket: how often its progress is checked
ERR_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "reset by peer",
    errno.EPIPE: "broken pipe",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


class Disconnected(Exception):
    """The destination connection ended; the message is the reason for the log."""


def describe(exc):
    """Short text for a socket error."""
    if isinstance(exc, socket.gaierror):
        return "name not resolved (%s)" % exc.strerror
    if isinstance(exc, OSError) and exc.errno in ERR_REASONS:
        return ERR_REASONS[exc.errno]
    return str(exc) or type(exc).__name__


# What a would-block looks like on a plain socket and on a TLS one (tls:// destinations).
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def format_address(address):
    """(host, port) as a log names it: HOST:PORT, [IPv6]:PORT."""
    host, port = address[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def unsent_bytes(sock):
    """sock: a socket or its descriptor. Bytes still in the socket's send queue (SIOCOUTQ): lost with the connection."""
    try:
        fd = sock if isinstance(sock, int) else sock.fileno()
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def reset(sock):
    """Close with a reset: queued bytes would otherwise still go out later (to a destination that
    was only stopped), and the drop counts would be wrong. Returns the bytes the reset discarded:
    the send queue measured at the last moment, since a destination that was stopped may take
    bytes until then (a measure taken earlier would count them as dropped, though delivered)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    lost = unsent_bytes(sock)
    sock.close()
    return lost


class Lookup:
    """One getaddrinfo for a destination, in a thread; done_fd turns readable when it is over.

    getaddrinfo cannot be interrupted, and a resolver that hangs must not stall the source: it runs
    in a thread (a forwarder never forks) while the forwarder's loop goes on. A lookup that outlives
    its attempt is waited for by the next attempt, never started twice."""

    def __init__(self, dest):
        self.done_fd, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.info = self.error = None
        threading.Thread(target=self.run, args=(dest,), daemon=True).start()

    def run(self, dest):
        info = error = None
        try:
            info = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            error = exc
        self.error, self.info = error, info
        os.write(self.done_w, b"x")  # result() is called only once this is readable: then it closes it

    def result(self):
        """[(family, address), ...] in the resolver's order, or its error raised; closes the pipe."""
        os.close(self.done_fd)
        os.close(self.done_w)
        if self.error is not None:
            raise self.error
        addresses = []
        for family, _, _, _, address in self.info:
            if (family, address) not in addresses:
                addresses.append((family, address))
        return addresses


def configure(sock, send_timeout):
    """Keepalive, no Nagle, and a kernel deadline for unacknowledged data (a backstop at 3x
    --send-timeout).

    The backstop is for a destination that vanished while its bytes were unacknowledged but the
    socket was not full (the progress rule covers a full one, at exactly --send-timeout). Not
    --send-timeout itself: the kernel counts zero-window probes against it and aborts slow readers
    that are acknowledging, only rarely (a small window on loopback's 64 KiB segments).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * USER_TIMEOUT_FACTOR * 1000))


SOURCE_KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))


def keep_sources_alive(listener):
    """TCP keepalive for every source: set on the listening socket, whose options an accepted socket
    inherits (Linux), so that a source costs its receiver no setsockopt. A source gone silent (its
    host lost) is found within 2 minutes."""
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in SOURCE_KEEPALIVE:
        listener.setsockopt(socket.IPPROTO_TCP, option, value)


class Progress:
    """The send-timeout rule, in one place: while data waits, a destination that acknowledges no
    byte for --send-timeout is stalled. A full socket is not a stalled destination: a slow reader
    acknowledges, however slowly."""

    def __init__(self, send_timeout):
        self.send_timeout = send_timeout
        self.since = None  # while data waits: when the destination last acknowledged a byte
        self.acknowledged = 0

    def stalled(self, acknowledged):
        """Data waits and acknowledged bytes are acknowledged so far: whether the rule is broken."""
        now = time.monotonic()
        if self.since is None or acknowledged > self.acknowledged:
            self.since, self.acknowledged = now, acknowledged
            return False
        return now - self.since >= self.send_timeout

    def check_in(self, poll_s):
        """When to look again: poll_s, or sooner at the deadline."""
        return max(0.0, min(poll_s, self.since + self.send_timeout - time.monotonic()))

    def stop(self):
        self.since = None
