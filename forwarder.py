"""One forwarder process per destination: copy the receiver's pipe to the destination's socket.

States: connecting (with backoff), connected (splice pipe -> socket, discard replies, watch the send
deadline) and down (drain the pipe into /dev/null and count the drop). Pipe EOF means the source is
done: flush what is left, close the connection, exit 0.
"""
import errno
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time

from proxylog import log

BACKOFF_START_S = 0.1
SPLICE_CHUNK = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DRAIN_FLAGS = os.SPLICE_F_NONBLOCK
CLOSE_LINGER_S = 1.0  # after our FIN, how long to wait for the destination's
ACK_POLL_S = 0.02  # while waiting for the last bytes to be acknowledged
STILL_DOWN_LOG_S = 60.0
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
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


def unsent_bytes(sock):
    """Bytes still in the socket's send queue (SIOCOUTQ): lost with the connection."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def reset(sock):
    """Close with a reset: queued bytes would otherwise still go out later (to a destination that
    was only stopped), and the drop counts would be wrong."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Lookup:
    """One getaddrinfo for a destination, in a thread; done_fd turns readable when it is over."""

    def __init__(self, dest):
        self.done_fd, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.info = self.error = None
        threading.Thread(target=self.run, args=(dest,), daemon=True).start()

    def run(self, dest):
        info = error = None
        try:
            info = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            error = exc
        os.write(self.done_w, b"x")  # before finished() can be true: result() closes this pipe
        self.error, self.info = error, info

    def finished(self):
        return self.info is not None or self.error is not None

    def result(self):
        """(family, address), or the resolver's error raised; closes the notification pipe."""
        os.close(self.done_fd)
        os.close(self.done_w)
        if self.error is not None:
            raise self.error
        family, _, _, _, address = self.info
        return family, address


class Forwarder:
    """Copies one pipe to one destination for the life of one source connection."""

    def __init__(self, pipe_fd, dest, config):
        self.pipe_fd = pipe_fd
        self.dest = dest
        self.config = config
        self.sock = None
        self.backoff_s = BACKOFF_START_S
        self.connected_at = 0.0
        self.sent = 0  # bytes handed to the destination's socket, over all connections
        self.dropped = 0  # bytes dropped, over all outages
        self.outage_dropped = 0
        self.outage_started = 0.0
        self.last_down_log = 0.0
        self.attempts = 0
        self.lookup = None  # a name lookup still running from an earlier attempt
        self.pipe_eof = False
        self.devnull_fd = os.open(os.devnull, os.O_WRONLY)
        self.discard = bytearray(16384)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self):
        """Serve until the pipe ends; returns the exit code."""
        first = True
        while not self.pipe_eof:
            if not self.connect(hold_pipe=first):
                first = False
                self.wait_down()
                continue
            first = False
            try:
                self.pump()
            except Disconnected as reason:
                self.lose_connection(str(reason))
        log.info("forwarder done: sent %d bytes, dropped %d bytes", self.sent, self.dropped)
        return 0

    def connect(self, hold_pipe):
        """One connection attempt within --connect-timeout; True when connected.

        While it runs the pipe is drained (the source must not stall), except on the very first
        attempt: data sent the moment a source connects waits for it (hold_pipe).
        """
        self.attempts += 1
        deadline = time.monotonic() + self.config.connect_timeout
        try:
            family, address = self.resolve(deadline, hold_pipe)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            self.note_failure(describe(exc))
            return False
        sock.setblocking(False)
        err = sock.connect_ex(address)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not hold_pipe:
            poller.register(self.pipe_fd, POLL_IN)
        while err == errno.EINPROGRESS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = errno.ETIMEDOUT
                break
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self.pipe_fd:
                    self.drain()
                else:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self.note_failure(describe(OSError(err, os.strerror(err))))
            return False
        self.configure(sock)
        self.sock = sock
        self.connected_at = time.monotonic()
        if self.outage_started:
            log.info("connected to %s after %d attempts; dropped %d bytes while down for %.1f s",
                     self.dest, self.attempts, self.outage_dropped, self.connected_at - self.outage_started)
        else:
            log.info("connected to %s", self.dest)
        self.attempts = 0
        self.outage_started = 0.0
        self.outage_dropped = 0
        return True

    def resolve(self, deadline, hold_pipe):
        """(family, address) of the destination, its name resolved afresh by the time of deadline.

        getaddrinfo cannot be interrupted, and a resolver that hangs must not stall the source: it
        runs in a thread (this process never forks) while we keep draining the pipe, as connect does.
        A lookup that outlives its attempt is waited for by the next attempt, never started twice.
        """
        if self.dest.family:  # an address: nothing to resolve
            return self.dest.family, (self.dest.host, self.dest.port)
        if self.lookup is None:
            self.lookup = Lookup(self.dest)
        lookup = self.lookup
        poller = select.poll()
        poller.register(lookup.done_fd, select.POLLIN)
        if not hold_pipe:
            poller.register(self.pipe_fd, POLL_IN)
        while not lookup.finished():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, "name resolution timed out")
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self.pipe_fd:
                    self.drain()
        self.lookup = None
        return lookup.result()

    def configure(self, sock):
        """Keepalive, and a kernel send deadline matching --send-timeout for unacknowledged data."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.config.send_timeout * 1000))

    def pump(self):
        """Copy pipe -> socket while connected; returns at pipe EOF after closing the connection."""
        sock_fd, pipe_fd = self.sock.fileno(), self.pipe_fd
        send_timeout_ms = self.config.send_timeout * 1000
        poller = select.poll()
        poller.register(pipe_fd, POLL_IN)
        poller.register(sock_fd, select.POLLIN)
        blocked_since = 0.0  # when the socket last refused data while data waited
        splice = os.splice
        while True:
            if blocked_since:
                timeout_ms = send_timeout_ms - (time.monotonic() - blocked_since) * 1000
                if timeout_ms <= 0:
                    raise Disconnected("no progress for %.1f s (send timeout)" % self.config.send_timeout)
            else:
                timeout_ms = None
            events = poller.poll(timeout_ms)
            for fd, event in events:
                if fd == sock_fd:
                    if event & select.POLLIN or event & (select.POLLERR | select.POLLHUP):
                        self.read_replies()
                    if event & select.POLLOUT:
                        blocked_since = 0.0
                        poller.modify(sock_fd, select.POLLIN)
                        poller.register(pipe_fd, POLL_IN)
                    continue
                # The pipe has data (or its writers are gone): move as much as the socket takes.
                while True:
                    try:
                        moved = splice(pipe_fd, sock_fd, SPLICE_CHUNK, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        blocked_since = blocked_since or time.monotonic()
                        poller.unregister(pipe_fd)
                        poller.modify(sock_fd, select.POLLIN | select.POLLOUT)
                        break
                    except OSError as exc:
                        raise Disconnected(describe(exc)) from None
                    if not moved:
                        self.pipe_eof = True
                        self.close_gracefully()
                        return
                    self.sent += moved
                    if moved < SPLICE_CHUNK:
                        break

    def read_replies(self):
        """Read and discard what the destination sends; its EOF or an error ends the connection."""
        try:
            if self.sock.recv_into(self.discard):
                return
            raise Disconnected("closed by destination")
        except BlockingIOError:
            return
        except OSError as exc:
            raise Disconnected(describe(exc)) from None

    def close_gracefully(self):
        """After the last byte: send FIN, wait until the destination has taken everything, close.

        Bytes still queued are waited for as long as the destination makes progress (the same
        --send-timeout rule as while streaming); what it never takes is counted as dropped and the
        connection reset. Then we wait briefly for the destination's FIN, reading replies, since
        closing with unread replies queued would send a reset that can discard unread data.
        """
        sock = self.sock
        self.sock = None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        lost = self.wait_acknowledged(sock)
        if lost:
            reset(sock)
            self.sent -= lost
            self.dropped += lost
            log.warning("closed connection to %s: it took no data for %.1f s after the source finished; "
                        "%d unsent bytes dropped", self.dest, self.config.send_timeout, lost)
            return
        deadline = time.monotonic() + CLOSE_LINGER_S
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
                if ready and not sock.recv_into(self.discard):
                    break
        except OSError:
            pass
        sock.close()
        log.info("closed connection to %s: source finished", self.dest)

    def wait_acknowledged(self, sock):
        """Wait until every byte sent is acknowledged; returns the bytes it gave up on (0 when all went).

        SIOCOUTQ counts the FIN as one byte. Gives up when the queue makes no progress for
        --send-timeout, or when the destination has closed and so will take no more.
        """
        queued = unsent_bytes(sock)
        progress_at = time.monotonic()
        while queued > 1:
            try:
                ready, _, _ = select.select([sock], [], [], ACK_POLL_S)
                if ready and not sock.recv_into(self.discard):
                    return max(unsent_bytes(sock) - 1, 0)  # closed by the destination
            except OSError:
                return max(unsent_bytes(sock) - 1, 0)
            now_queued = unsent_bytes(sock)
            if now_queued < queued:
                queued, progress_at = now_queued, time.monotonic()
            elif time.monotonic() - progress_at >= self.config.send_timeout:
                return max(now_queued - 1, 0)
        return 0

    # -- while down -------------------------------------------------------------------------------

    def lose_connection(self, reason):
        """Close a failed connection; bytes still queued in it are counted as dropped."""
        lost = unsent_bytes(self.sock)
        reset(self.sock)
        self.sock = None
        self.sent -= lost  # handed to the socket, counted as sent, but never delivered
        if time.monotonic() - self.connected_at >= self.config.retry_interval:
            self.backoff_s = BACKOFF_START_S
        self.outage_started = self.last_down_log = time.monotonic()
        self.outage_dropped = lost
        self.dropped += lost
        log.warning("disconnected from %s: %s; %d unsent bytes dropped; reconnecting in %.1f s",
                    self.dest, reason, lost, self.backoff_s)
        self.wait_down()

    def note_failure(self, reason):
        """Log a failed attempt: the first of an outage as a warning, then one line a minute."""
        now = time.monotonic()
        if not self.outage_started:
            self.outage_started = self.last_down_log = now
            log.warning("cannot connect to %s: %s; reconnecting in %.1f s", self.dest, reason, self.backoff_s)
        elif now - self.last_down_log >= STILL_DOWN_LOG_S:
            self.last_down_log = now
            log.warning("still cannot connect to %s after %d attempts (%s); dropped %d bytes so far",
                        self.dest, self.attempts, reason, self.outage_dropped)
        else:
            log.debug("cannot connect to %s: %s; reconnecting in %.1f s", self.dest, reason, self.backoff_s)

    def wait_down(self):
        """Sleep the backoff while draining the pipe (counted as dropped); then double the backoff."""
        deadline = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.config.retry_interval)
        poller = select.poll()
        poller.register(self.pipe_fd, POLL_IN)
        while not self.pipe_eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if poller.poll(remaining * 1000):
                self.drain()
        if self.pipe_eof and self.outage_dropped:
            log.warning("dropped %d bytes for %s while it was down", self.outage_dropped, self.dest)

    def drain(self):
        """Discard what the pipe holds now, counting it; notes pipe EOF."""
        while True:
            try:
                moved = os.splice(self.pipe_fd, self.devnull_fd, SPLICE_CHUNK, flags=DRAIN_FLAGS)
            except BlockingIOError:
                return
            if not moved:
                self.pipe_eof = True
                return
            self.dropped += moved
            self.outage_dropped += moved
            if moved < SPLICE_CHUNK:
                return


def run_forwarder(pipe_fd, dest, config):
    """Body of the forwarder process (see forking.fork_child)."""
    os.set_blocking(pipe_fd, False)
    return Forwarder(pipe_fd, dest, config).run()
