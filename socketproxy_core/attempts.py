"""A forwarder's attempts: CONNECTING (the first attempt, which holds the stream's start for it),
DOWN (backing off, then attempting again, the pipe drained into the backlog or dropped meanwhile),
and what makes a new connection UP: a tls:// handshake, the PROXY header and the session's restore.

A mixin of forwarding.Forwarder, as ending.py is: the state is the forwarder's, these are its
handlers in those states.
"""
import os
import select
import ssl
import time

from socketproxy_core import tls
from socketproxy_core.proxylog import log
from socketproxy_core.restore import Restore
from socketproxy_core.sockets import configure, reset
from socketproxy_core.stats import STATE_CONNECTING, STATE_DONE, STATE_DOWN, STATE_UP
from socketproxy_core.zerocopy import DRAIN_FLAGS

CONNECTING, UP, DOWN, DONE = STATE_CONNECTING, STATE_UP, STATE_DOWN, STATE_DONE
SPLICE_CHUNK = 1 << 20
STILL_DOWN_LOG_S = 60.0  # a destination still down is said again this often
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Attempts:
    """The forwarder's handlers while it has no connection up (see the module docstring)."""

    def start_attempt(self, first=False):
        """One connection attempt within --connect-timeout. While it runs the pipe is drained into
        the backlog or dropped (the source must not stall), except on the very first one: data sent
        the moment a source connects waits for it, in the backlog as long as that has room, then in
        the pipe (holding the source), for at most --send-timeout (the primary's, for the whole
        attempt). A destination that connects within that loses nothing of the stream's start."""
        self.attempts += 1
        now = time.monotonic()
        deadline = now + self.config.connect_timeout
        if first:
            self.enter(CONNECTING)
        if self.primary:
            hold_until = deadline
        elif first:
            hold_until = now + self.config.send_timeout
        else:
            hold_until = now
        if hold_until > now:
            self.loop.set_deadline("hold", hold_until, self.end_hold)
            if self.config.buffer and self.retainer is not None:
                self.holding = True  # into the backlog while it has room (drain)
                self.drain_while_down()
        else:
            self.drain_while_down()
        self.connector.start(deadline)

    def end_hold(self):
        """The first attempt held the source --send-timeout: from now on the pipe is drained."""
        self.holding = False
        self.drain_while_down()

    def drain_while_down(self):
        """Watch the pipe and drain it (or keep it) until a connection is made."""
        if not self.pipe_eof:
            self.loop.watch(self.pipe_fd, POLL_IN, self.pipe_while_down)

    def pipe_while_down(self, _event):
        self.drain()
        if not self.pipe_eof:
            return
        if (self.connector.active or self.handshake is not None or self.restoring is not None) and len(self.backlog):
            return  # a backlog to deliver: the attempt goes on
        if self.handshake is not None:  # nothing left to deliver: the connection is not needed
            self.handshake.abort()
            self.handshake = None
        if self.restoring is not None:  # nothing left to resume: the new connection is not needed
            self.restoring.finish()
            reset(self.restoring.sock)
            self.restoring = None
        self.connector.cancel()  # the source is done and what it sent is dropped: nothing to connect for
        self.loop.cancel("backoff", "hold")
        self.finish_down()

    def drain(self):
        """Discard what the pipe holds now, counting it (retaining: keep it); notes pipe EOF. While the
        first attempt holds, only what the backlog has room for is kept, and the pipe fills."""
        if self.retainer is not None:
            room = self.config.buffer - len(self.backlog) if self.holding else None
            if room is not None and room <= 0:
                self.loop.unwatch(self.pipe_fd)  # the pipe fills: the source is held (end_hold ends it)
                return
            if not self.retainer.drain_to_backlog(room):
                self.end_of_pipe()
            return
        self.drain_dropping()

    def drain_dropping(self):
        """Discard what the pipe holds now, counting it; notes pipe EOF."""
        while True:
            try:
                moved = os.splice(self.pipe_fd, self.devnull_fd, SPLICE_CHUNK, flags=DRAIN_FLAGS)
            except BlockingIOError:
                return
            if not moved:
                self.end_of_pipe()
                return
            self.counts.drop(moved)
            if moved < SPLICE_CHUNK:
                return

    def attempt_failed(self, reason):
        self.loop.cancel("hold")
        self.holding = False
        self.note_failure(reason)
        if self.primary:
            self.session.unreachable()
            return
        self.back_off()

    def back_off(self):
        """DOWN: wait the backoff (draining the pipe), then attempt again; at the pipe's end, done."""
        self.enter(DOWN)
        if self.pipe_eof:
            self.finish_down()
            return
        self.loop.set_timer("backoff", self.backoff.next(), self.start_attempt)
        self.drain_while_down()

    def finish_down(self):
        """The source finished while the destination was down: what was kept will never be sent."""
        self.loop.unwatch(self.pipe_fd)
        if self.retainer is not None:
            self.retainer.drop_backlog()
        if self.counts.outage_dropped:
            log.warning("dropped %d bytes for %s while it was down", self.counts.outage_dropped, self.dest)
        self.enter(DONE)

    def note_failure(self, reason):
        """Log a failed attempt: the first of an outage as a warning, then one line a minute."""
        self.stats.connect_failures += 1
        self.enter(DOWN)
        if self.primary:  # never retried: the session's end is logged
            log.debug("cannot connect to the primary %s: %s", self.dest, reason)
            return
        now = time.monotonic()
        if not self.outage_started:
            self.outage_started = self.last_down_log = now
            log.warning("cannot connect to %s: %s; reconnecting in %.1f s", self.dest, reason, self.backoff.delay_s)
        elif now - self.last_down_log >= STILL_DOWN_LOG_S:
            self.last_down_log = now
            log.warning("still cannot connect to %s after %d attempts (%s); dropped %d bytes so far",
                        self.dest, self.attempts, reason, self.counts.outage_dropped)
        else:
            log.debug("cannot connect to %s: %s; reconnecting in %.1f s", self.dest, reason, self.backoff.delay_s)

    def connected(self, sock, host):
        """A connection is made: it starts with the PROXY protocol header (--send-proxy), and the
        session is restored on it first when something of it was delivered on an earlier one; the pipe
        goes on draining into the backlog meanwhile (the first attempt's hold goes on too)."""
        if self.tls_context is not None and not isinstance(sock, ssl.SSLSocket):
            self.handshake = tls.ClientHandshake(self.loop, sock, self.tls_context, self.dest.host,
                                                 self.config.connect_timeout, lambda tls_sock: self.handshaken(tls_sock, host),
                                                 self.handshake_failed)
            self.handshake.start()
            return
        memory = self.retainer.memory if self.retainer is not None else None
        preamble = memory.preamble() if memory is not None else None
        if self.proxy_header:
            data, replies, checked, what = preamble or (b"", 0, 0, "")
            preamble = (self.proxy_header + data, replies, checked, what)
        if preamble and preamble[0]:
            if self.replies is not None:
                self.replies.restart()
            self.restoring = Restore(self.loop, sock, preamble, self.replies, self.config.connect_timeout,
                                     lambda sock, what: self.up(sock, host, what), self.restore_failed)
            return
        self.up(sock, host)

    def handshaken(self, tls_sock, host):
        self.handshake = None
        self.connected(tls_sock, host)

    def handshake_failed(self, reason):
        self.handshake = None
        self.attempt_failed(reason)

    def restore_failed(self, sock, reason):
        """The session could not be restored on the new connection: a failed attempt."""
        self.restoring = None
        reset(sock)
        reason = "the session was not restored (%s)" % reason
        if reason != self.restore_error:  # each new reason once as a warning, even within an outage
            self.restore_error = reason
            log.warning("connected to %s, but %s; reconnecting in %.1f s", self.dest, reason,
                        self.backoff.delay_s)
        self.attempt_failed(reason)

    def up(self, sock, host, restored=None):
        """CONNECTING or DOWN -> UP: the stream starts (or resumes) on the connection."""
        self.loop.cancel("hold")  # the first attempt's hold lasts through the handshake and the restore
        self.holding = False
        if not self.resumable and (self.counts.dropped or self.receiver_drops()[0]):
            self.loop.unwatch(self.pipe_fd)
            self.sock = sock
            self.abandon("the start of the session was dropped while it was down")
            return
        if self.restoring is not None:  # the preamble was delivered before: sent again
            self.counts.resend(len(self.restoring.data) - len(self.proxy_header))
            self.restoring = None
        self.restore_error = None
        self.loop.unwatch(self.pipe_fd)
        self.stats.reconnects += self.stats.ever_up
        self.stats.ever_up = True
        configure(sock, self.config.send_timeout)
        self.sock = sock
        self.connected_at = time.monotonic()
        self.log_connected(host, restored)
        self.attempts = 0
        self.outage_started = 0.0
        self.counts.outage_dropped = 0
        if self.retainer is not None:
            self.retainer.outage_records_base = self.backlog.dropped_records
        self.enter(UP)
        if self.primary:
            self.session.start(sock)
            return
        self.loop.watch(sock, select.POLLIN, self.socket_up)
        if self.retainer is None:
            self.counts.start_connection()
            self.wait_for_pipe()
            return
        self.retainer.begin(sock)
        if self.retainer.skipping():
            self.loop.watch(self.pipe_fd, POLL_IN, self.pipe_skipping)
        else:
            self.pump_retained()

    def log_connected(self, host, restored):
        where = "" if self.dest.family else " (%s)" % host
        attempts = " after %d attempts" % self.attempts if self.outage_started else ""
        session = "; restored the session (%s)" % restored if restored else ""
        if self.outage_started and self.retainer is not None:
            log.info("connected to %s%s%s%s; resending %d bytes kept while down for %.1f s, dropped %d bytes%s",
                     self.dest, where, attempts, session, len(self.backlog), self.connected_at - self.outage_started,
                     self.counts.outage_dropped,
                     " (%d records)" % self.retainer.outage_dropped_records() if self.framed else "")
        elif self.outage_started:
            log.info("connected to %s%s%s; dropped %d bytes while down for %.1f s", self.dest, where, attempts,
                     self.counts.outage_dropped, self.connected_at - self.outage_started)
        else:
            log.info("connected to %s%s%s", self.dest, where, session)
