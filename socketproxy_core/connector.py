"""One connection attempt to a destination, driven by the forwarder's loop: the name resolved afresh
(in a thread: sockets.Lookup), then every address it resolves to tried in order, each given at least
its share of the time left within --connect-timeout, as socket.create_connection tries them.

Nothing here waits: the attempt watches a descriptor or sets the "attempt" timer, and ends by
calling on_connected(sock, host) or on_failed(reason).
"""
import errno
import os
import select
import socket
import time

from socketproxy_core.sockets import Lookup, describe

BACKOFF_START_S = 0.1


class Backoff:
    """The wait between attempts: from BACKOFF_START_S, doubling up to --retry-interval, and from the
    start again once a connection has stayed up for --retry-interval."""

    def __init__(self, retry_interval):
        self.retry_interval = retry_interval
        self.delay_s = BACKOFF_START_S

    def next(self):
        """The wait before the next attempt (the one after waits twice as long)."""
        delay = self.delay_s
        self.delay_s = min(self.delay_s * 2, self.retry_interval)
        return delay

    def connection_lasted(self, seconds):
        if seconds >= self.retry_interval:
            self.delay_s = BACKOFF_START_S


class Connector:
    """Attempts to connect to dest, one at a time."""

    def __init__(self, loop, dest, on_connected, on_failed):
        self.loop = loop
        self.dest = dest
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.lookup = None  # a name lookup still running from an earlier attempt
        self.sock = None  # the address being tried
        self.addresses = []
        self.failures = []
        self.deadline = 0.0
        self.active = False

    def start(self, deadline):
        self.active = True
        self.deadline = deadline
        self.failures = []
        if self.dest.family:  # an address: nothing to resolve
            self.addresses = [(self.dest.family, (self.dest.host, self.dest.port))]
            self.try_next()
            return
        if self.lookup is None:
            self.lookup = Lookup(self.dest)
        self.loop.watch(self.lookup.done_fd, select.POLLIN, self.resolved)
        self.loop.set_deadline("attempt", deadline, self.lookup_timed_out)

    def cancel(self):
        """The source finished meanwhile: nothing is left to connect for (a lookup goes on, unwatched)."""
        if self.lookup is not None:
            self.loop.unwatch(self.lookup.done_fd)
        self.drop_socket()
        self.loop.cancel("attempt")
        self.active = False

    def resolved(self, _event):
        self.loop.unwatch(self.lookup.done_fd)
        self.loop.cancel("attempt")
        lookup, self.lookup = self.lookup, None
        try:
            self.addresses = lookup.result()
        except (OSError, UnicodeError) as exc:
            self.fail(describe(exc))
            return
        self.try_next()

    def lookup_timed_out(self):
        self.loop.unwatch(self.lookup.done_fd)  # the lookup is kept for the next attempt
        self.fail(describe(OSError(errno.ETIMEDOUT, "name resolution timed out")))

    def try_next(self):
        """Connect to the next address, or fail with every address's reason."""
        while self.addresses:
            family, address = self.addresses.pop(0)
            share = (self.deadline - time.monotonic()) / (len(self.addresses) + 1)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(address)
            if err == errno.EINPROGRESS:
                self.sock, self.host = sock, address[0]
                self.loop.watch(sock, select.POLLOUT, self.writable)
                self.loop.set_timer("attempt", max(share, 0.0), self.address_timed_out)
                return
            if not err:
                self.succeed(sock, address[0])
                return
            sock.close()
            self.failures.append((address[0], describe(OSError(err, os.strerror(err)))))
        self.fail(self.failure_text())

    def writable(self, _event):
        self.loop.cancel("attempt")
        sock, host = self.sock, self.host
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            self.loop.unwatch(sock)
            self.sock = None
            self.succeed(sock, host)
            return
        self.drop_socket()
        self.failures.append((host, describe(OSError(err, os.strerror(err)))))
        self.try_next()

    def address_timed_out(self):
        self.drop_socket()
        self.failures.append((self.host, describe(OSError(errno.ETIMEDOUT, "timed out"))))
        self.try_next()

    def drop_socket(self):
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None

    def succeed(self, sock, host):
        self.active = False
        self.on_connected(sock, host)

    def fail(self, reason):
        self.active = False
        self.on_failed(reason)

    def failure_text(self):
        """Why every address failed: the reason alone for an address, per address for a name."""
        failures = self.failures
        if self.dest.family or not failures:
            return failures[0][1] if failures else "no address"
        reasons = {reason for _, reason in failures}
        if len(reasons) == 1:
            return "%s (tried %s)" % (reasons.pop(), ", ".join(host for host, _ in failures))
        return ", ".join("%s: %s" % failure for failure in failures)
