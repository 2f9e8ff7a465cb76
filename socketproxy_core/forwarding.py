"""One forwarder process per destination: copy the receiver's pipe to the destination's socket.

States: connecting (with backoff), connected (splice pipe -> socket, discard replies, watch the send
deadline) and down (drain the pipe into /dev/null and count the drop). Pipe EOF means the source is
done: flush what is left, close the connection, exit 0.
"""
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

from socketproxy_core.backlog import Backlog
from socketproxy_core import framing
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import Lookup, describe, reset, unsent_bytes
from socketproxy_core.stats import STATE_DOWN, STATE_UP, ForwarderStats
from socketproxy_core import primary
from socketproxy_core import zerocopy
from socketproxy_core.zerocopy import pipe_bytes, pipe_hung_up, tee

BACKOFF_START_S = 0.1
TITLE_PERIOD_S = 1.0  # the title and the shared counters are refreshed this often at most
IDLE_TITLE_PERIOD_S = 5.0  # ... and this often once a refresh found nothing changed (an idle group sleeps)
SPLICE_CHUNK = 1 << 20
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DRAIN_FLAGS = os.SPLICE_F_NONBLOCK
CLOSE_LINGER_S = 1.0  # after our FIN, how long to wait for the destination's
ACK_POLL_S = 0.02  # while waiting for the last bytes to be acknowledged
STILL_DOWN_LOG_S = 60.0
PROGRESS_POLL_S = 0.1  # while a destination's socket is full: how often its progress is checked
USER_TIMEOUT_FACTOR = 3
MIN_SNDBUF = 128 * 1024  # doubled by the kernel: over two of loopback's 64 KiB segments in flight
REPLY_READS = 64  # of 16 KiB: what a wake reads of the replies at most (1 MiB)
ACK_WAIT_S = 0.001  # a full shadow waits for acknowledgements, which have no event: poll this often
KEEP_ACKED = 64 * 1024  # line framing: acknowledged bytes kept, to resend a cut record whole
CUT_PEEK = 4096  # line framing: released bytes read (not spliced away) to find the start of the record they cut
KEEP_READ = 64 * 1024  # while down, the pipe is read into the backlog this much at a time ...
KEEP_READS = 16  # ... this many times a call at most
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
class Disconnected(Exception):
    """The destination connection ended; the message is the reason for the log."""


class Forwarder:
    """Copies one pipe to one destination for the life of one source connection."""

    def __init__(self, pipe_fd, dest, config, receiver_pid=None, clean_end=None, stats=None, source=None,
                 mirror_drops=None, requests_link=None, poke_fd=None):
        self.pipe_fd = pipe_fd
        self.source = source  # --primary: this forwarder's destination is the source's session
        self.primary = source is not None
        self.requests_link = requests_link  # --primary: the receiver writes the requests (primary.RequestsLink)
        self.mirror_drops = mirror_drops  # --mirror-policy drop: (shared counters, our index) the receiver adds to
        self.stats = stats or ForwarderStats(None, None)  # counters for the title and the metrics
        self.receiver_pid = receiver_pid
        self.clean_end = clean_end  # shared with the receiver: set before it closes our pipe on purpose
        self.receiver_pidfd = None
        if receiver_pid is not None:
            try:
                self.receiver_pidfd = os.pidfd_open(receiver_pid)
            except ProcessLookupError:
                pass  # already gone: its pipe will end without clean_end set
        self.dest = dest
        self.config = config
        self.sock = None
        self.backoff_s = BACKOFF_START_S
        self.connected_at = 0.0
        # The counters (see delivered()): each source byte is either sent (acknowledged by the
        # destination, counted once however often it was resent) or dropped, and neither count ever
        # goes down, so a scrape never sees a counter reset.
        self.sent = 0  # bytes acknowledged on the connections that have ended
        self.piped = 0  # --primary: bytes we spliced into the primary's socket (the receiver writes the rest)
        self.dropped = 0  # bytes dropped, over all outages
        self.outage_dropped = 0
        self.outage_started = 0.0
        self.last_down_log = 0.0
        self.attempts = 0
        self.lookup = None  # a name lookup still running from an earlier attempt
        self.pipe_eof = False
        self.hold_until = 0.0  # during the first attempt: when the pipe stops being held
        self.devnull_fd = os.open(os.devnull, os.O_WRONLY)
        self.discard = bytearray(16384)
        # Retaining (--buffer or --framing): what is sent stays in a shadow pipe until acknowledged,
        # and what arrives while down is kept in the backlog, both resent on the next connection.
        self.framed = config.framing != "none"
        self.retaining = (config.buffer > 0 or self.framed) and not self.primary  # the primary is never retried
        self.backlog = Backlog(config.buffer, config.framing)
        # Where records end: lines are found by searching back from any cut; a Redis command only by
        # reading forward from the command before it, so with resp every released byte is read.
        self.release_scan = framing.scanner(config.framing)
        self.line_framed = config.framing == "line"
        self.head_limit = KEEP_ACKED if self.line_framed else max(KEEP_ACKED, config.buffer)
        self.shadow_r = self.shadow_w = None
        self.replay = bytearray()  # the backlog being resent on the current connection, then spilled bytes
        self.replay_end = 0
        self.conn_sent = 0  # bytes of this connection's stream handed to its socket
        self.conn_floor = 0  # bytes at the start of this connection's stream delivered on an earlier one
        self.outage_records_base = 0
        self.acked_front = 0  # bytes at the backlog's front the destination already acknowledged
        self.cut_head, self.head_known = b"", True  # framed: the head of the record the release point cuts
        self.keep_buffer = None  # KEEP_READ bytes, made at the first outage
        self.poke_fd = poke_fd  # a mirror of --primary: the receiver's eventfd that ends a batch early
        self.next_publish = 0.0  # when the title and the shared counters are refreshed next
        self.replies_read = 0  # bytes of replies read and discarded
        self.moved_at_wake = 0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self):
        """Serve until the pipe ends; returns the exit code."""
        first = not self.retaining
        if self.primary:
            primary.PrimarySession(self, self.source, self.requests_link).run()
        while not self.pipe_eof and not self.primary:
            if not self.connect(hold_pipe=first):
                first = False
                self.wait_down()
                continue
            first = False
            try:
                if self.retaining:
                    self.pump_retaining()
                else:
                    self.pump()
            except Disconnected as reason:
                self.lose_connection(str(reason))
        self.add_mirror_drops()
        self.publish_final()
        if self.framed:
            log.info("forwarder done: sent %d bytes, dropped %d bytes (%d records)", self.delivered(), self.dropped,
                     self.backlog.dropped_records)
        else:
            log.info("forwarder done: sent %d bytes, dropped %d bytes", self.delivered(), self.dropped)
        return 0

    def connect(self, hold_pipe):
        """One connection attempt within --connect-timeout; True when connected.

        While it runs the pipe is drained (the source must not stall), except on the very first
        attempt: data sent the moment a source connects waits for it (hold_pipe), for at most
        --send-timeout. A name's addresses are tried in order, each given at least its share of
        the time left, as socket.create_connection tries them.
        """
        self.attempts += 1
        now = time.monotonic()
        deadline = now + self.config.connect_timeout
        self.hold_until = deadline if self.primary else now + self.config.send_timeout if hold_pipe else now
        try:
            addresses = self.resolve(deadline)
        except (OSError, UnicodeError) as exc:
            self.note_failure(describe(exc))
            return False
        if addresses is None:
            return False  # the source finished while we waited: nothing is left to deliver
        failures = []
        for index, (family, address) in enumerate(addresses):
            share = (deadline - time.monotonic()) / (len(addresses) - index)
            try:
                sock = self.connect_to(family, address, time.monotonic() + max(share, 0.0))
            except OSError as exc:
                failures.append((address[0], describe(exc)))
                continue
            if sock is None:
                return False  # the source finished while we waited
            self.connected(sock, address[0])
            return True
        self.note_failure(self.failure_text(failures))
        return False

    def failure_text(self, failures):
        """Why every address failed: the reason alone for an address, per address for a name."""
        if self.dest.family or not failures:
            return failures[0][1] if failures else "no address"
        reasons = {reason for _, reason in failures}
        if len(reasons) == 1:
            return "%s (tried %s)" % (reasons.pop(), ", ".join(host for host, _ in failures))
        return ", ".join("%s: %s" % failure for failure in failures)

    def connect_to(self, family, address, deadline):
        """A connected socket, None when the pipe ended meanwhile; raises OSError on failure."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(address)
        while err == errno.EINPROGRESS:
            events = self.wait_draining(sock.fileno(), select.POLLOUT, deadline)
            if events is None:
                sock.close()
                return None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events else errno.ETIMEDOUT
        if err:
            sock.close()
            raise OSError(err, os.strerror(err))
        return sock

    def connected(self, sock, host):
        self.stats.reconnects += self.stats.ever_up
        self.stats.ever_up = True
        self.stats.set_state(STATE_UP)
        self.configure(sock)
        self.sock = sock
        self.conn_sent = self.conn_floor = 0
        self.connected_at = time.monotonic()
        where = "" if self.dest.family else " (%s)" % host
        if self.outage_started and self.retaining:
            log.info("connected to %s%s after %d attempts; resending %d bytes kept while down for %.1f s, "
                     "dropped %d bytes%s", self.dest, where, self.attempts, len(self.backlog),
                     self.connected_at - self.outage_started, self.outage_dropped,
                     " (%d records)" % self.outage_dropped_records() if self.framed else "")
        elif self.outage_started:
            log.info("connected to %s%s after %d attempts; dropped %d bytes while down for %.1f s",
                     self.dest, where, self.attempts, self.outage_dropped, self.connected_at - self.outage_started)
        else:
            log.info("connected to %s%s", self.dest, where)
        self.attempts = 0
        self.outage_started = 0.0
        self.outage_dropped = 0
        self.outage_records_base = self.backlog.dropped_records

    def wait_draining(self, fd, events, deadline):
        """Wait for events on fd until deadline, draining the pipe meanwhile (after hold_until).

        Returns the events seen, 0 at the deadline, None once the pipe has ended with nothing kept
        for the destination: the source is done and what it sent is dropped, so there is nothing left
        to connect for. With a backlog to deliver the attempt goes on. The pipe leaves the poll set at
        its end, so a hung-up pipe cannot make this spin.
        """
        poller = select.poll()
        poller.register(fd, events)
        draining = False
        while True:
            now = time.monotonic()
            if not draining and now >= self.hold_until:
                if self.pipe_eof and not len(self.backlog):
                    return None
                if not self.pipe_eof:
                    poller.register(self.pipe_fd, POLL_IN)
                draining = True
            wait = deadline - now if draining else min(deadline, self.hold_until) - now
            if deadline - now <= 0:
                return 0
            self.publish_if_due()
            for ready_fd, revents in poller.poll(max(min(wait, self.publish_due()), 0.0) * 1000):
                if ready_fd != self.pipe_fd:
                    return revents
                self.drain()
                if self.pipe_eof:
                    if not len(self.backlog):
                        return None
                    poller.unregister(self.pipe_fd)

    def resolve(self, deadline):
        """[(family, address), ...] of the destination, its name resolved afresh by the deadline;
        None when the pipe ended meanwhile.

        getaddrinfo cannot be interrupted, and a resolver that hangs must not stall the source: it
        runs in a thread (this process never forks) while we keep draining the pipe, as connect does.
        A lookup that outlives its attempt is waited for by the next attempt, never started twice.
        """
        if self.dest.family:  # an address: nothing to resolve
            return [(self.dest.family, (self.dest.host, self.dest.port))]
        if self.lookup is None:
            self.lookup = Lookup(self.dest)
        lookup = self.lookup
        while not lookup.finished():
            events = self.wait_draining(lookup.done_fd, select.POLLIN, deadline)
            if events is None:
                return None
            if not events and not lookup.finished():
                raise OSError(errno.ETIMEDOUT, "name resolution timed out")
        self.lookup = None
        return lookup.result()

    def configure(self, sock):
        """Keepalive, and a kernel deadline for unacknowledged data (a backstop at 3x --send-timeout)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A backstop for a destination that vanished while its bytes were unacknowledged but the
        # socket was not full (the progress check covers a full one, at exactly --send-timeout). Not
        # --send-timeout itself: the kernel counts zero-window probes against it and aborts slow
        # readers that are acknowledging, only rarely (a small window on loopback's 64 KiB segments).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        int(self.config.send_timeout * USER_TIMEOUT_FACTOR * 1000))

    def receiver_gone(self):
        """At pipe EOF: whether it came from the receiver's death rather than from its close_pipes.

        A dying process closes its descriptors before its parent or a pidfd learns of its death,
        so neither getppid nor the pidfd can tell at EOF; the flag the receiver sets first can.
        """
        return self.clean_end is not None and not self.clean_end[0]

    def end_of_pipe(self):
        """The pipe has ended: from a clean end of the source, or (exiting here) the receiver's death."""
        self.pipe_eof = True
        if self.receiver_gone():
            self.receiver_died()

    def receiver_died(self):
        """The pipe ended because the receiver died, not because the source finished: say so, and
        what the pipe still held (dropped: the group is being ended), then exit."""
        held = pipe_bytes(self.pipe_fd)
        self.dropped += held
        kept = len(self.backlog.take()) - self.acked_front + max(0, self.replay_end - max(self.conn_sent,
                                                                                          self.conn_floor))
        self.acked_front = 0
        self.dropped += kept
        log.error("receiver %d died: the source's connection is lost; its pipe still held %d bytes, dropped%s",
                  self.receiver_pid, held, " (and %d bytes kept for its destination)" % kept if kept else "")
        if self.sock is not None and not self.primary:
            self.dropped += self.settle(reset(self.sock))
        self.settle_sent()
        self.publish_final()
        log.info("forwarder done: sent %d bytes, dropped %d bytes", self.delivered(), self.dropped)
        sys.exit(1)

    def settle_sent(self):
        """--primary: take the receiver's count of the requests it wrote into the primary's socket
        for good."""
        if self.requests_link is not None:
            self.piped += self.requests_link.bytes_written()
            self.requests_link = None

    def delivered(self):
        """Bytes sent, as the title and the metrics show them: acknowledged by the destination, each
        counted once (a resent byte the destination had acknowledged before is not counted again).
        --primary: the request bytes handed to the primary's socket (the session is never resent)."""
        if self.primary:
            return self.piped + (self.requests_link.bytes_written() if self.requests_link is not None else 0)
        if self.sock is None:
            return self.sent
        acknowledged = self.conn_sent - unsent_bytes(self.sock)
        return self.sent + max(0, acknowledged - self.conn_floor)

    def settle(self, unacknowledged):
        """The connection ends with unacknowledged bytes never to be acknowledged: what it delivered
        joins sent. Returns the bytes handed to it that no connection delivered (dropped, unless
        they are kept to be resent)."""
        acknowledged = self.conn_sent - unacknowledged
        self.sent += max(0, acknowledged - self.conn_floor)
        return max(0, self.conn_sent - max(acknowledged, self.conn_floor))

    def add_mirror_drops(self):
        """Add what the receiver dropped for us (--mirror-policy drop) to our counts, once."""
        if self.mirror_drops is not None:
            dropped, records = self.receiver_drops()
            self.dropped += dropped
            self.backlog.dropped_records += records
            self.mirror_drops = None

    def receiver_drops(self):
        """(bytes, records) the receiver dropped for us so far instead of waiting for us."""
        if self.mirror_drops is None:
            return 0, 0
        shared, index = self.mirror_drops
        return struct.unpack_from("qq", shared, 16 * index)

    def publish(self):
        """Counters to the shared table and the title, from the loop (never from a signal handler,
        which could run between a connection's reset and its accounting): every TITLE_PERIOD_S
        while they change, every IDLE_TITLE_PERIOD_S while they do not."""
        changed = self.stats.publish(self, os.getpid())
        self.next_publish = time.monotonic() + (TITLE_PERIOD_S if changed else IDLE_TITLE_PERIOD_S)

    def publish_due(self):
        """Seconds until the next publish: every wait is bounded by it."""
        return max(0.0, self.next_publish - time.monotonic())

    def publish_if_due(self):
        if time.monotonic() >= self.next_publish:
            self.publish()

    def publish_final(self):
        """The exact last counters, before the done line."""
        self.publish()

    def pump(self):
        """Copy pipe -> socket while connected; returns at pipe EOF after closing the connection.

        A full socket is not a stalled destination: while data waits, the bytes the destination has
        acknowledged (handed to the socket minus its send queue, SIOCOUTQ) are checked every
        PROGRESS_POLL_S, and only --send-timeout without any acknowledged byte disconnects it. The
        socket is retried at each check too: POLLOUT needs a third of a large send buffer free,
        which a slow reader can take many seconds to make.
        """
        sock_fd, pipe_fd = self.sock.fileno(), self.pipe_fd
        poller = select.poll()
        poller.register(pipe_fd, POLL_IN)
        poller.register(sock_fd, select.POLLIN)
        if self.receiver_pidfd is not None:
            poller.register(self.receiver_pidfd, select.POLLIN)
        progress_at = 0.0  # while blocked: when the destination last acknowledged a byte
        acknowledged = 0
        splice = os.splice
        while True:
            timeout_ms = None
            if progress_at:
                now = time.monotonic()
                now_acknowledged = self.conn_sent - unsent_bytes(self.sock)
                if now_acknowledged > acknowledged:
                    acknowledged, progress_at = now_acknowledged, now
                elif now - progress_at >= self.config.send_timeout:
                    raise Disconnected("no progress for %.1f s (send timeout)" % self.config.send_timeout)
                timeout_ms = min(PROGRESS_POLL_S, progress_at + self.config.send_timeout - now) * 1000
            elif self.poke_fd is not None:  # a mirror of --primary: batches
                primary.gather(self)
            self.publish_if_due()
            publish_ms = self.publish_due() * 1000
            events = poller.poll(publish_ms if timeout_ms is None else min(timeout_ms, publish_ms))
            if progress_at and not events:
                events = [(pipe_fd, select.POLLIN)]  # try the socket again
            for fd, event in events:
                if fd == sock_fd:
                    if event & select.POLLIN or event & (select.POLLERR | select.POLLHUP):
                        self.read_replies()
                    if event & select.POLLOUT:
                        progress_at = 0.0
                        poller.modify(sock_fd, select.POLLIN)
                        poller.register(pipe_fd, POLL_IN)
                    continue
                if fd == self.receiver_pidfd:
                    self.receiver_died()
                # The pipe has data (or its writers are gone): move as much as the socket takes.
                while True:
                    try:
                        moved = splice(pipe_fd, sock_fd, SPLICE_CHUNK, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        if not progress_at:
                            progress_at = time.monotonic()
                            acknowledged = self.conn_sent - unsent_bytes(self.sock)
                            poller.unregister(pipe_fd)
                            poller.modify(sock_fd, select.POLLIN | select.POLLOUT)
                        break
                    except OSError as exc:
                        raise Disconnected(describe(exc)) from None
                    if not moved:
                        self.end_of_pipe()
                        self.close_gracefully()
                        return
                    self.conn_sent += moved
                    if progress_at:  # the socket took data again: not blocked any more
                        progress_at = 0.0
                        poller.modify(sock_fd, select.POLLIN)
                        poller.register(pipe_fd, POLL_IN)
                    if moved < SPLICE_CHUNK:
                        break

    def read_replies(self):
        """Read and discard what the destination has sent, up to REPLY_READS buffers a wake (a mirror
        that sends in batches wakes seldom: its shadow's replies must not pile up); its EOF or an
        error ends the connection."""
        try:
            for _ in range(REPLY_READS):
                got = self.sock.recv_into(self.discard)
                if not got:
                    raise Disconnected("closed by destination")
                self.replies_read += got
                if got < len(self.discard):
                    return
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
        # The FIN goes out once every byte is acknowledged: a FIN puts the receiver in delayed-ACK mode,
        # and a destination that reads the last bytes and resets before that ACK leaves them
        # unacknowledged here (an RST's acknowledgement is not processed): counted dropped, though read.
        lost = self.wait_acknowledged(sock)
        if not lost:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if lost:
            lost = reset(sock)
            if self.framed and self.retaining and lost:
                self.backlog.dropped_records += self.records_in_last(lost)
            self.dropped += self.settle(lost)
            self.sock = None
            if lost:
                log.warning("closed connection to %s: it took no data for %.1f s after the source finished; "
                            "%d unsent bytes dropped", self.dest, self.config.send_timeout, lost)
            else:
                log.info("closed connection to %s: source finished (the last bytes acknowledged as it was reset)",
                         self.dest)
            return
        self.settle(0)
        self.sock = None
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

        Called before the FIN is queued. Gives up when the queue makes no progress for
        --send-timeout, or when the destination has closed and so will take no more.
        """
        queued = unsent_bytes(sock)
        progress_at = time.monotonic()
        while queued > 0:
            self.publish_if_due()
            try:
                ready, _, _ = select.select([sock], [], [], ACK_POLL_S)
                if ready and not sock.recv_into(self.discard):
                    return unsent_bytes(sock)  # closed by the destination
            except OSError:
                return unsent_bytes(sock)
            now_queued = unsent_bytes(sock)
            if now_queued < queued:
                queued, progress_at = now_queued, time.monotonic()
            elif time.monotonic() - progress_at >= self.config.send_timeout:
                return now_queued
        return 0

    # -- retaining: --buffer and --framing ---------------------------------------------------------

    def pump_retaining(self):
        """Like pump, but every byte sent stays retained until the destination acknowledges it.

        The connection's stream is the replayed backlog, then the pipe. The backlog is sent from
        memory and kept until acknowledged; the pipe is tee'd into a shadow pipe, then spliced to the
        socket, so the healthy path copies nothing through Python. Acknowledged bytes leave the
        shadow (all but KEEP_ACKED when framed, so a cut record can be resent whole). `ahead` bytes
        were tee'd but not yet taken by the socket: they sit both at the head of the pipe and at the
        tail of the shadow.
        """
        if self.shadow_r is None:
            self.shadow_r, self.shadow_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.shadow_capacity = zerocopy.set_pipe_size(self.shadow_w, self.config.pipe_size)
        # The socket must fill before the shadow does: then "wait for the destination" is POLLOUT,
        # not a loop polling for acknowledgements. The kernel doubles the value (for its overhead).
        # A small shadow (an unprivileged user's small pipes) spills into memory instead: the socket
        # must still hold enough in flight that the destination's delayed ACKs do not pace it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(self.shadow_capacity // 4, MIN_SNDBUF))
        self.conn_sent = 0  # bytes of this connection's stream handed to the socket
        self.retained_from = 0  # offset in this connection's stream of the first retained byte
        self.shadow_len = 0
        self.ahead = 0
        self.replay = self.backlog.take()  # retained in memory: the backlog resent, then spilled bytes
        self.conn_floor = self.acked_front  # the backlog's front was delivered already: resent, not counted again
        self.acked_front = 0
        self.cut_head, self.head_known = b"", True  # the connection's stream starts at a record boundary
        self.release_scan = framing.scanner(self.config.framing)
        self.skip_to_boundary()
        self.replay_end = len(self.replay)  # offset in this connection's stream where the resend ends
        sock_fd, pipe_fd = self.sock.fileno(), self.pipe_fd
        poller = select.poll()
        poller.register(sock_fd, select.POLLIN)
        if self.receiver_pidfd is not None:
            poller.register(self.receiver_pidfd, select.POLLIN)
        progress_at = 0.0
        acknowledged = 0
        while True:
            if self.conn_sent < self.replay_end:
                waiting = self.send_replay()
            else:
                waiting = self.splice_retained()
            if waiting == "eof":
                self.release_acknowledged(final=True)
                self.end_of_pipe()
                self.close_gracefully()
                return
            now = time.monotonic()
            if waiting in ("socket", "acks"):
                now_acknowledged = self.conn_sent - unsent_bytes(self.sock)
                if not progress_at or now_acknowledged > acknowledged:
                    acknowledged, progress_at = now_acknowledged, now
                elif now - progress_at >= self.config.send_timeout:
                    raise Disconnected("no progress for %.1f s (send timeout)" % self.config.send_timeout)
                # A full socket says when it has room (POLLOUT); acknowledgements that free the
                # shadow have no event of their own: they are polled for.
                poller.modify(sock_fd, select.POLLIN | (select.POLLOUT if waiting == "socket" else 0))
                poll_s = PROGRESS_POLL_S if waiting == "socket" else ACK_WAIT_S
                timeout_ms = min(poll_s, progress_at + self.config.send_timeout - now) * 1000
                watch_pipe = False
            else:  # waiting for the pipe
                progress_at = 0.0
                poller.modify(sock_fd, select.POLLIN)
                timeout_ms = None
                watch_pipe = True
            if watch_pipe:
                if self.poke_fd is not None:  # a mirror of --primary: batches
                    primary.gather(self)
                poller.register(pipe_fd, POLL_IN)
            self.publish_if_due()
            publish_ms = self.publish_due() * 1000
            for fd, event in poller.poll(publish_ms if timeout_ms is None else min(timeout_ms, publish_ms)):
                if fd == sock_fd and event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                    self.read_replies()
                elif fd == self.receiver_pidfd:
                    self.receiver_died()
            if watch_pipe:
                poller.unregister(pipe_fd)

    def skip_to_boundary(self):
        """Framed, when the start of the record in progress was dropped: read the pipe up to that
        record's end (dropping it), so this connection starts at a record boundary."""
        while self.backlog.skipping and not self.pipe_eof:
            self.publish_if_due()
            select.select([self.pipe_fd], [], [], PROGRESS_POLL_S)
            try:
                chunk = os.read(self.pipe_fd, SPLICE_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                return  # the pipe's end is seen by the caller
            before = self.backlog.dropped
            rest = self.backlog.skip_partial_record(chunk)
            self.dropped += self.backlog.dropped - before
            self.outage_dropped += self.backlog.dropped - before
            self.replay += rest

    def send_replay(self):
        """Send the backlog from memory; what it waits for: "socket" (full) or None (all sent)."""
        try:
            sent = self.sock.send(memoryview(self.replay)[self.conn_sent:self.replay_end])
        except BlockingIOError:
            return "socket"
        except OSError as exc:
            raise Disconnected(describe(exc)) from None
        self.conn_sent += sent
        return "socket" if self.conn_sent < self.replay_end else None

    def splice_retained(self):
        """Move pipe -> socket through the shadow; what it now waits for: "socket", "pipe" or "eof"."""
        sock_fd = self.sock.fileno()
        drained = False  # the last tee took less than it asked for: the pipe was empty after it
        while True:
            if not self.ahead:
                if drained:
                    return "pipe"  # poll says when more comes (or the end): no tee just to see EAGAIN
                if self.replay or self.shadow_len * 2 > self.shadow_capacity:  # not at every chunk: an ioctl
                    self.release_acknowledged()
                room = self.shadow_capacity - self.shadow_len
                if room <= 0:
                    if self.spill():
                        continue
                    return "acks"  # everything retained is unacknowledged: wait for the destination
                asked = min(room, SPLICE_CHUNK)
                try:
                    teed = tee(self.pipe_fd, self.shadow_w, asked, os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    # tee says EAGAIN, not 0, at the pipe's end when the shadow is full: ask poll.
                    if not pipe_bytes(self.pipe_fd):
                        return "eof" if pipe_hung_up(self.pipe_fd) else "pipe"
                    # The shadow has no free slot (small writes take one each): let go of the
                    # acknowledged bytes kept for record boundaries too, then wait for acks.
                    retained = self.shadow_len
                    self.release_acknowledged(final=True)
                    if self.shadow_len < retained or self.spill():
                        continue
                    return "acks"
                if not teed:
                    return "eof"
                self.shadow_len += teed
                self.ahead = teed
                drained = teed < asked
            try:
                moved = os.splice(self.pipe_fd, sock_fd, self.ahead, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return "socket"
            except OSError as exc:
                raise Disconnected(describe(exc)) from None
            self.ahead -= moved
            self.conn_sent += moved
            if self.ahead:
                return "socket"

    def release_acknowledged(self, final=False):
        """Let go of what the destination has acknowledged: the replayed backlog, then the shadow's
        head (all but KEEP_ACKED when framed)."""
        acknowledged = self.conn_sent - unsent_bytes(self.sock)
        if self.replay:
            if self.conn_sent < self.replay_end:
                return  # still resending the backlog
            released = min(acknowledged - self.retained_from, len(self.replay))
            if released <= 0:
                return
            if self.framed:
                self.note_released(self.replay[:released], True)
            del self.replay[:released]
            self.retained_from += released
            if self.replay:
                return
        keep = min(KEEP_ACKED, self.shadow_capacity // 4) if self.line_framed and not final else 0
        release = acknowledged - self.retained_from - keep
        if release > 0:
            release = min(release, self.shadow_len - self.ahead)
            peek = (min(release, CUT_PEEK) if self.line_framed else release) if self.framed else 0
            whole = peek == release
            release -= peek
            while release > 0:
                moved = os.splice(self.shadow_r, self.devnull_fd, release, flags=DRAIN_FLAGS)
                release -= moved
                self.shadow_len -= moved
                self.retained_from += moved
            if peek:  # framed: read the released end, to keep the head of the record it cuts
                tail = bytearray()
                while len(tail) < peek:
                    tail += os.read(self.shadow_r, peek - len(tail))
                self.shadow_len -= peek
                self.retained_from += peek
                self.note_released(tail, whole)

    def note_released(self, tail, whole):
        """Framed: the released bytes end with tail (all of them when whole): keep the head of the
        record the release point cuts (cut_head), or note that its start is gone."""
        _, end = self.release_scan.scan(tail)
        if end >= 0:
            self.cut_head, self.head_known = bytes(tail[end:]), True
        elif whole and self.head_known and len(self.cut_head) + len(tail) <= self.head_limit:
            self.cut_head += bytes(tail)
        else:
            self.cut_head, self.head_known = b"", False

    def spill(self):
        """Move the shadow's sent bytes into memory, making room in it; whether there were any.

        Only a shadow smaller than what the socket holds in flight fills up this way (small pipes);
        the memory is let go as the destination acknowledges it."""
        count = self.shadow_len - self.ahead
        if count <= 0:
            return False
        while count:
            chunk = os.read(self.shadow_r, count)
            self.replay += chunk
            count -= len(chunk)
            self.shadow_len -= len(chunk)
        return True

    def retained_bytes(self):
        """Everything retained for this connection, the pipe's `ahead` bytes excluded (they stay in the
        pipe); empties the shadow."""
        data = bytearray(self.replay)
        self.replay = bytearray()
        while self.shadow_len:
            chunk = os.read(self.shadow_r, self.shadow_len)
            self.shadow_len -= len(chunk)
            data += chunk
        if self.ahead:
            del data[-self.ahead:]
            self.ahead = 0
        return data

    def lose_retaining_connection(self):
        """A failed connection's unacknowledged bytes go back to the backlog, framed from the start of
        the record they cut (or with that record dropped whole when its start is gone).

        Returns (unacknowledged bytes, bytes resent from already acknowledged ones).
        """
        unacknowledged = reset(self.sock)
        self.settle(unacknowledged)
        self.sock = None
        head = self.cut_head if self.framed else b""
        data = bytearray(head) + self.retained_bytes()
        base = self.retained_from - len(head)  # offset of data in this connection's stream
        acked_at = self.conn_sent - unacknowledged - base  # in data
        acked_at = max(0, min(acked_at, len(data)))
        start = acked_at
        if self.framed:
            # data begins a record when its head is known; else it continues the released bytes
            scan = self.backlog.scanner() if self.head_known else self.release_scan.copy()
            _, boundary = scan.scan(data, 0, acked_at)
            if boundary >= 0:
                start = boundary
            elif base == 0 or self.head_known:
                start = 0  # data begins a record
            else:  # the cut record began before what was kept: it is dropped whole
                self.backlog.start_skipping(scan)
        handed = self.conn_sent - base  # bytes of data handed to the socket
        # Kept bytes delivered already (acknowledged now, or on an earlier connection before being
        # resent on this one): neither sent again in the counts nor dropped, whatever happens to them.
        delivered_to = max(acked_at, min(self.conn_floor - base, len(data)))
        self.acked_front = max(0, delivered_to - start)
        self.keep(memoryview(data)[start:])
        return handed - acked_at, acked_at - start

    def records_in_last(self, count):
        """Framed: how many records end in the last count bytes retained (emptying what is retained)."""
        head = self.cut_head if self.head_known else b""
        data = bytearray(head) + self.retained_bytes()
        scan = self.backlog.scanner() if self.head_known else self.release_scan.copy()
        scan.scan(data, 0, len(data) - count)
        return scan.scan(data, len(data) - count)[0]

    def outage_dropped_records(self):
        return self.backlog.dropped_records - self.outage_records_base

    def keep(self, chunk):
        """Add to the backlog, counting what it drops."""
        before = self.backlog.dropped
        self.backlog.add(chunk)
        dropped = self.backlog.dropped - before
        credit = min(dropped, self.acked_front)  # already delivered once: counted as sent, not dropped
        self.acked_front -= credit
        self.dropped += dropped - credit
        self.outage_dropped += dropped - credit

    # -- while down -------------------------------------------------------------------------------

    def drain_to_backlog(self):
        """Move what the pipe holds now into the backlog (the newest --buffer bytes stay); notes EOF."""
        if self.keep_buffer is None:
            self.keep_buffer = memoryview(bytearray(KEEP_READ))
        for _ in range(KEEP_READS):  # then back to the caller's deadlines
            try:
                size = os.readv(self.pipe_fd, [self.keep_buffer])
            except BlockingIOError:
                return
            if not size:
                self.end_of_pipe()
                return
            self.keep(self.keep_buffer[:size])
            if size < KEEP_READ:
                return

    def lose_connection(self, reason):
        """Close a failed connection; bytes still queued in it are counted as dropped (or, retaining,
        kept to be resent)."""
        self.stats.set_state(STATE_DOWN)
        if time.monotonic() - self.connected_at >= self.config.retry_interval:
            self.backoff_s = BACKOFF_START_S
        self.outage_started = self.last_down_log = time.monotonic()
        self.outage_dropped = 0
        if self.retaining:
            unacknowledged, again = self.lose_retaining_connection()
            less = ", less %d dropped" % self.outage_dropped if self.outage_dropped else ""
            log.warning("disconnected from %s: %s; %d unacknowledged bytes kept to resend (%d more to resend "
                        "a cut record whole%s), %d bytes in the backlog; reconnecting in %.1f s", self.dest,
                        reason, unacknowledged, again, less, len(self.backlog), self.backoff_s)
        else:
            lost = self.settle(reset(self.sock))
            self.sock = None
            self.outage_dropped = lost
            self.dropped += lost
            log.warning("disconnected from %s: %s; %d unsent bytes dropped; reconnecting in %.1f s",
                        self.dest, reason, lost, self.backoff_s)
        self.wait_down()

    def note_failure(self, reason):
        """Log a failed attempt: the first of an outage as a warning, then one line a minute."""
        self.stats.connect_failures += 1
        self.stats.set_state(STATE_DOWN)
        if self.primary:  # never retried: the session's end is logged
            log.debug("cannot connect to the primary %s: %s", self.dest, reason)
            return
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
            self.publish_if_due()
            if poller.poll(min(remaining, self.publish_due()) * 1000):
                self.drain()
        if self.pipe_eof and len(self.backlog):
            kept = self.backlog.take()
            credit = min(len(kept), self.acked_front)
            self.acked_front = 0
            self.dropped += len(kept) - credit
            self.outage_dropped += len(kept) - credit
            self.backlog.dropped += len(kept)
            if self.framed:
                self.backlog.dropped_records += self.backlog.scanner().scan(kept)[0]
        if self.pipe_eof and self.outage_dropped:
            log.warning("dropped %d bytes for %s while it was down", self.outage_dropped, self.dest)

    def drain(self):
        """Discard what the pipe holds now, counting it (retaining: keep it); notes pipe EOF."""
        if self.retaining:
            self.drain_to_backlog()
            return
        while True:
            try:
                moved = os.splice(self.pipe_fd, self.devnull_fd, SPLICE_CHUNK, flags=DRAIN_FLAGS)
            except BlockingIOError:
                return
            if not moved:
                self.end_of_pipe()
                return
            self.dropped += moved
            self.outage_dropped += moved
            if moved < SPLICE_CHUNK:
                return


def run_forwarder(pipe_fd, dest, config, receiver_pid=None, clean_end=None, stats=None, source=None,
                  mirror_drops=None, requests_link=None, poke_fd=None):
    """Body of the forwarder process (see forking.fork_child).

    SIGTERM or SIGINT asks the receiver to stop the group in order (so a stop that signals every
    process at once, as systemd does, is the same orderly stop as one that signals main alone);
    this forwarder goes on until its pipe ends. SIGHUP is ignored.
    """
    os.set_blocking(pipe_fd, False)
    zerocopy.return_large_blocks()
    fwd = Forwarder(pipe_fd, dest, config, receiver_pid, clean_end, stats, source, mirror_drops, requests_link,
                    poke_fd)

    def ask_receiver_to_stop(_signum, _frame):
        if fwd.receiver_pidfd is not None:
            try:
                signal.pidfd_send_signal(fwd.receiver_pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it is gone: the group ends anyway

    signal.signal(signal.SIGTERM, ask_receiver_to_stop)
    signal.signal(signal.SIGINT, ask_receiver_to_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    fwd.publish()
    return fwd.run()
