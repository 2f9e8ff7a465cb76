"""One forwarder process per destination: copy the receiver's pipe to the destination's socket.

One loop (loop.Loop) and named states; each event has one handler per state:

  CONNECTING  the first attempt: data sent the moment a source connects waits for it, in the
              backlog while it has room, then in the pipe (for at most --send-timeout); after that
              the pipe is drained (dropped, or kept: --buffer).
  UP          splice pipe -> socket (through the shadow pipe when retaining), discard replies; a
              full socket that acknowledges nothing for --send-timeout is a lost connection.
  DOWN        backing off, then attempting again; the pipe is drained meanwhile (kept in the backlog
              when retaining) and the drop counted.
  DRAINING    the pipe has ended: wait until every byte is acknowledged (same --send-timeout rule),
              then send our FIN.
  CLOSING     wait briefly for the destination's FIN, reading replies, then close.
  ABANDONED   a mirror of --primary without framing whose connection was cut: its session cannot be
              resumed in the middle, so the rest of it is dropped until the pipe ends.
  DONE        the loop ends; the process exits 0.

CONNECTING and DOWN are in attempts.py; DRAINING, CLOSING and ABANDONED in ending.py; --primary
(primary.py) drives the same loop with its session's handlers, and a mirror sends in batches or turns
(mirrors.py).
"""
import os
import select
import signal
import ssl
import sys
import time

import setproctitle

from socketproxy_core import endpoints
from socketproxy_core import mirrors
from socketproxy_core import primary
from socketproxy_core import proxylog
from socketproxy_core import sessions
from socketproxy_core import tls
from socketproxy_core.accounting import Counts
from socketproxy_core.attempts import Attempts
from socketproxy_core.backlog import Backlog
from socketproxy_core.connector import Backoff, Connector
from socketproxy_core.ending import Ending
from socketproxy_core.loop import Loop
from socketproxy_core.proxylog import log
from socketproxy_core.retaining import Retainer
from socketproxy_core.sockets import (PROGRESS_POLL_S, WOULD_BLOCK, Disconnected, Progress, describe, reset,
                                      unsent_bytes)
from socketproxy_core.stats import STATE_CONNECTING, STATE_DONE, STATE_DOWN, STATE_UP, ForwarderStats
from socketproxy_core import zerocopy
from socketproxy_core.zerocopy import SPLICE_FLAGS, pipe_bytes

CONNECTING, UP, DOWN, DONE = STATE_CONNECTING, STATE_UP, STATE_DOWN, STATE_DONE  # the others: ending.py
TITLE_PERIOD_S = 1.0  # the title and the shared counters are refreshed this often at most
IDLE_TITLE_PERIOD_S = 5.0  # ... and this often once a refresh found nothing changed (an idle group sleeps)
SPLICE_CHUNK = 1 << 20
ACK_WAIT_S = 0.001  # a full shadow waits for acknowledgements, which have no event: poll this often
REPLY_READS = 64  # of 16 KiB: what a wake reads of the replies at most (1 MiB)
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Forwarder(Attempts, Ending):
    """Copies one pipe to one destination for the life of one source connection."""

    def __init__(self, pipe_fd, dest, config, receiver_pid=None, rows=None, index=0, stats=None, source=None,
                 requests_link=None, poke_fd=None, turn_marks=None, evidence=None, joined=False, proxy_header=b"",
                 tls_context=None):
        self.pipe_fd = pipe_fd
        self.proxy_header = proxy_header  # --send-proxy: what every connection to the destination begins with
        self.dest = dest
        self.config = config
        self.primary = source is not None  # --primary: this destination is the source's session
        # A mirror of --primary without framing cannot be resumed in the middle of a session: nothing
        # tells where its protocol's state is (a cut connection abandons the session's mirroring).
        self.resumable = not (config.primary and not self.primary and config.framing == "none")
        self.rows, self.index = rows, index  # our group's rows in the shared table (stats.GroupRows)
        self.drops_added = False  # the receiver's drops for us (--mirror-policy drop) are in our counts
        self.session_end = 0  # --primary: how the session ended (primary.ENDED_*), for the receiver
        self.stats = stats or ForwarderStats(None, None)  # counters for the title and the metrics
        self.receiver_pid = receiver_pid
        self.receiver_pidfd = None
        if receiver_pid is not None:
            try:
                self.receiver_pidfd = os.pidfd_open(receiver_pid)
            except ProcessLookupError:
                pass  # already gone: its pipe will end without the pipes closed on purpose
        self.loop = Loop()
        self.state = None
        self.counts = Counts()
        self.framed = config.framing != "none"
        self.devnull_fd = os.open(os.devnull, os.O_WRONLY)
        self.retainer = None
        # Retaining (--buffer or --framing): what is sent stays in a shadow pipe until acknowledged,
        # and what arrives while down is kept in the backlog, both resent on the next connection.
        # A tls:// destination is written through TLS, from memory (tls.Plaintext).
        if dest.tls and tls_context is None:
            raise ValueError("a tls:// destination needs its TLS context")  # never a plaintext fallback
        self.tls_context = tls_context if dest.tls else None
        self.plaintext = tls.Plaintext()  # tls:// without retaining: read from the pipe, not yet taken by TLS
        if endpoints.retains(config) and not self.primary:  # the primary is never retried
            self.retainer = Retainer(pipe_fd, config, self.counts, self.devnull_fd, through_tls=dest.tls)
        # --framing resp: the destination's replies are read as RESP (error replies counted, the
        # session's preamble checked on a new connection).
        self.replies = sessions.RespReplies() if config.framing == "resp" else None
        self.handshake = None  # a tls:// connection's handshake in progress (tls.ClientHandshake)
        self.restoring = None  # a new connection whose session is being restored (restore.Restore)
        self.restore_error = None  # the last failed restore's reason, logged as a warning once
        self.cut_noted = False  # the receiver cut our byte stream (--mirror-policy drop), and we said so
        self.abandoned_why = None  # the shadow closed; the session is abandoned if more of it comes
        self.backlog = self.retainer.backlog if self.retainer else Backlog(0, config.framing)
        if joined and config.framing == "line":  # added by a reload: from the next whole line on
            self.backlog.start_skipping()
        self.connector = Connector(self.loop, dest, self.connected, self.attempt_failed)
        self.backoff = Backoff(config.retry_interval)
        self.progress = Progress(config.send_timeout)
        self.batch = mirrors.MirrorBatch(self, poke_fd) if poke_fd is not None else None
        self.turns = mirrors.Turns(self, turn_marks) if turn_marks is not None else None
        self.session = primary.Session(self, source, requests_link, evidence or ()) if self.primary else None
        self.comparison = None  # a mirror with --framing resp: its shadow's replies against the primary's
        if not self.primary and evidence is not None:
            self.comparison = mirrors.ReplyComparison(self, evidence)
        self.sock = None
        self.blocked = False  # UP: the socket is full and data waits
        self.pipe_eof = False
        self.holding = False  # the first attempt holds the source rather than drop (start_attempt)
        self.connected_at = 0.0
        self.outage_started = 0.0
        self.last_down_log = 0.0
        self.attempts = 0
        self.discard = bytearray(16384)
        self.replies_read = 0  # bytes of replies read and discarded

    # -- the loop ---------------------------------------------------------------------------------

    def run(self):
        """Serve until the pipe ends; returns the exit code."""
        if self.receiver_pidfd is not None:
            self.loop.watch(self.receiver_pidfd, select.POLLIN, lambda _event: self.receiver_died())
        self.publish()
        self.start_attempt(first=True)
        while self.state != DONE:
            self.loop.run_once()
        self.add_mirror_drops()
        self.counts.settle_primary()
        self.publish()
        if self.framed:
            log.info("forwarder done: sent %d bytes, dropped %d bytes (%d records)", self.delivered(),
                     self.counts.dropped, self.backlog.dropped_records)
        else:
            log.info("forwarder done: sent %d bytes, dropped %d bytes", self.delivered(), self.counts.dropped)
        return 0

    def enter(self, state):
        """The state changes: the title says which (connecting, up, down, draining, closing)."""
        self.state = state
        if state != DONE:
            self.stats.set_state(state)

    def delivered(self):
        return self.counts.delivered(self.sock)

    def error_replies(self):
        return self.replies.errors if self.replies is not None else 0

    def mismatches(self):
        return self.comparison.mismatches if self.comparison is not None else 0

    @property
    def dropped(self):
        return self.counts.dropped

    # -- UP ---------------------------------------------------------------------------------------

    def wait_for_pipe(self):
        """Data flows again: watch the pipe (a mirror of --primary in batches may nap first). Runs at
        every wake: the loop is told only when the pipe was not watched."""
        if self.batch is None:
            if not self.loop.watching(self.pipe_fd):
                self.loop.watch(self.pipe_fd, POLL_IN, self.pipe_up)
            if self.turns is not None:  # its replies are read at the next turn's wake (pipe_up)
                self.loop.unwatch(self.sock)
            return
        if self.batch.nap():
            return
        self.loop.watch(self.pipe_fd, POLL_IN, self.pipe_up)

    def pipe_up(self, _event):
        if self.turns is not None:
            # A mirror sending turns reads its shadow's replies when the next turn comes, not when
            # they come: a turn wakes it once, and the answer is usually there already.
            try:
                self.read_replies()
            except Disconnected as reason:
                self.lose(str(reason))
                return
        if self.retainer is not None:
            self.pump_retained()
        elif self.tls_context is not None:
            self.pump_tls()
        else:
            self.pump()

    def socket_up(self, event):
        """UP: replies are read and discarded (their EOF or an error ends the connection); room in a
        full socket lets data flow again."""
        if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
            try:
                self.read_replies()
            except Disconnected as reason:
                self.lose(str(reason))
                return
            if self.turns is not None and self.turns.answered():
                self.pipe_up(event)
                return
        if event & select.POLLOUT and self.blocked:
            self.pipe_up(event)

    def pump(self):
        """Move as much of the pipe as the socket takes (a mirror sending turns: to the turn's end)."""
        while True:
            room = SPLICE_CHUNK
            if self.turns is not None:
                turn_room = self.turns.room(self.counts.conn_sent)
                if turn_room == 0:
                    self.wait_for_turn()
                    return
                if turn_room == -1:
                    break  # nothing in the pipe yet
                room = min(room, turn_room or room)
            try:
                moved = os.splice(self.pipe_fd, self.sock.fileno(), room, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self.wait_for_destination("socket")
                return
            except OSError as exc:
                self.lose(describe(exc))
                return
            if not moved:
                self.end_of_pipe()
                self.start_draining()
                return
            self.counts.handed(moved)
            if self.turns is not None:
                self.turns.handed(self.counts.conn_sent)
                if moved == room and self.turns.takes_all:
                    break  # the pipe is empty: its next bytes (or its end) wake us
            if moved < room:
                break
        self.data_flows()

    def pump_tls(self):
        """tls://: read the pipe into memory and hand it to TLS, as much as the socket takes."""
        while True:
            if not self.plaintext:
                try:
                    if not self.plaintext.read(self.pipe_fd, SPLICE_CHUNK):
                        self.end_of_pipe()
                        self.start_draining()
                        return
                except BlockingIOError:
                    break
            try:
                self.counts.handed(self.plaintext.send(self.sock))
            except WOULD_BLOCK:
                self.wait_for_destination("socket")
                return
            except OSError as exc:
                self.lose(describe(exc))
                return
        self.data_flows()

    def pump_retained(self):
        """Move what can be moved through the shadow; then wait for what the retainer says."""
        while True:
            stop = None  # a mirror sending turns: where the current turn ends
            if self.turns is not None:
                turn_room = self.turns.room(self.counts.conn_sent, self.retainer.unsent_replay())
                if turn_room == 0:
                    self.wait_for_turn()
                    return
                if turn_room == -1:
                    self.data_flows()  # nothing to hand yet
                    return
                stop = None if turn_room is None else self.counts.conn_sent + turn_room
            try:
                waiting = self.retainer.step(self.sock, stop)
            except Disconnected as reason:
                self.lose(str(reason))
                return
            if self.turns is None:
                break
            self.turns.handed(self.counts.conn_sent)
            if waiting != "turn":
                break  # at a turn's end: the next pass waits for the answer (or goes on, when it has come)
        if waiting == "eof":
            self.retainer.release_acknowledged(self.sock, final=True)
            self.end_of_pipe()
            self.start_draining()
        elif waiting in ("socket", "acks"):
            self.wait_for_destination(waiting)
        else:
            self.data_flows()

    def wait_for_destination(self, waiting):
        """The socket is full ("socket": POLLOUT says when it has room) or the shadow is
        ("acks": acknowledgements have no event, they are polled for): the progress rule applies."""
        if self.progress.stalled(self.counts.conn_sent - unsent_bytes(self.sock)):
            self.lose("no progress for %.1f s (send timeout)" % self.config.send_timeout)
            return
        self.blocked = True
        self.loop.unwatch(self.pipe_fd)
        self.loop.watch(self.sock, select.POLLIN | (select.POLLOUT if waiting == "socket" else 0), self.socket_up)
        poll_s = PROGRESS_POLL_S if waiting == "socket" else ACK_WAIT_S
        # POLLOUT needs a third of a large send buffer free, which a slow reader can take many
        # seconds to make: the socket is retried at each check too.
        self.loop.set_timer("progress", self.progress.check_in(poll_s), lambda: self.pipe_up(0))

    def wait_for_turn(self):
        """At a turn's end: the pipe waits until the shadow answers (socket_up) or the turn's wait
        is over (mirrors.Turns)."""
        if self.blocked:
            self.blocked = False
            self.progress.stop()
            self.loop.cancel("progress")
        self.loop.unwatch(self.pipe_fd)
        self.loop.watch(self.sock, select.POLLIN, self.socket_up)

    def data_flows(self):
        """The socket took everything the pipe had: wait for the pipe."""
        if self.blocked:
            self.blocked = False
            self.progress.stop()
            self.loop.cancel("progress")
            self.loop.watch(self.sock, select.POLLIN, self.socket_up)
        self.wait_for_pipe()

    def pipe_skipping(self, _event):
        """Framed, the start of the record in progress dropped: read the pipe to that record's end."""
        more = self.retainer.skip()
        if more and self.retainer.skipping():
            return
        self.loop.unwatch(self.pipe_fd)
        self.pump_retained()  # at the pipe's end too: what was kept goes out, then the end is seen

    def read_replies(self):
        """Read and discard what the destination has sent, up to REPLY_READS buffers a wake (a mirror
        that sends in batches wakes seldom: its shadow's replies must not pile up); its EOF or an
        error raises Disconnected."""
        try:
            for _ in range(REPLY_READS):
                got = self.sock.recv_into(self.discard)
                if not got:
                    raise Disconnected("closed by destination")
                self.replies_read += got
                if self.replies is not None:
                    self.replies.feed(memoryview(self.discard)[:got])
                    if self.comparison is not None:
                        self.comparison.compare()
                if got < len(self.discard):
                    return
        except WOULD_BLOCK:
            return
        except ssl.SSLZeroReturnError:
            raise Disconnected("closed by destination") from None
        except OSError as exc:
            raise Disconnected(describe(exc)) from None

    def lose(self, reason):
        """UP -> DOWN: close a failed connection; bytes still queued in it are counted as dropped
        (or, retaining, kept to be resent)."""
        if not self.resumable:
            self.abandon(reason)
            return
        if self.comparison is not None:
            self.comparison.stop("the connection to it was cut")
        self.leave_up()
        self.stats.set_state(STATE_DOWN)
        self.backoff.connection_lasted(time.monotonic() - self.connected_at)
        self.outage_started = self.last_down_log = time.monotonic()
        self.counts.outage_dropped = 0
        if self.retainer is not None:
            unacknowledged, again = self.retainer.lose(self.sock)
            less = ", less %d dropped" % self.counts.outage_dropped if self.counts.outage_dropped else ""
            log.warning("disconnected from %s: %s; %d unacknowledged bytes kept to resend (%d more to resend "
                        "a cut record whole%s), %d bytes in the backlog; reconnecting in %.1f s", self.dest,
                        reason, unacknowledged, again, less, len(self.backlog), self.backoff.delay_s)
        else:
            lost = self.counts.settle(reset(self.sock)) + self.plaintext.clear()
            self.counts.drop(lost)
            log.warning("disconnected from %s: %s; %d unsent bytes dropped; reconnecting in %.1f s",
                        self.dest, reason, lost, self.backoff.delay_s)
        self.sock = None
        self.back_off()

    def leave_up(self):
        """Stop watching what UP watched."""
        self.loop.unwatch(self.pipe_fd)
        self.loop.unwatch(self.sock)
        self.loop.cancel("progress", "batch", "turn")
        if self.batch is not None:
            self.batch.stop()
        self.blocked = False
        self.progress.stop()

    # -- the pipe's end and the receiver ----------------------------------------------------------

    def end_of_pipe(self):
        """The pipe has ended: from a clean end of the source, or (exiting here) the receiver's death."""
        self.pipe_eof = True
        self.loop.unwatch(self.pipe_fd)
        if self.receiver_gone():
            self.receiver_died()

    def receiver_gone(self):
        """At pipe EOF: whether it came from the receiver's death rather than from its close_pipes.

        A dying process closes its descriptors before its parent or a pidfd learns of its death,
        so neither getppid nor the pidfd can tell at EOF; the flag the receiver sets first can.
        """
        return self.rows is not None and not self.rows.pipes_closed() and not self.rows.left(self.index)

    def receiver_died(self):
        """The pipe ended because the receiver died, not because the source finished: say so, and
        what the pipe still held (dropped: the group is being ended), then exit 1."""
        held = pipe_bytes(self.pipe_fd)
        self.counts.drop(held)
        kept = 0
        if self.retainer is not None:
            kept = len(self.backlog) + self.retainer.unsent_replay()
            self.counts.drop_kept(len(self.backlog.take()))
            self.counts.drop(self.retainer.unsent_replay())
        log.error("receiver %d died: the source's connection is lost; its pipe still held %d bytes, dropped%s",
                  self.receiver_pid, held, " (and %d bytes kept for its destination)" % kept if kept else "")
        if self.sock is not None and not self.primary:
            self.counts.drop(self.counts.settle(reset(self.sock)))
            self.sock = None
        self.counts.settle_primary()
        self.publish()
        log.info("forwarder done: sent %d bytes, dropped %d bytes", self.delivered(), self.counts.dropped)
        sys.exit(1)

    def watch_signals(self, wake_r=None):
        """SIGTERM or SIGINT asks the receiver to stop the group in order (so a stop that signals every
        process at once, as systemd does, is the same orderly stop as one that signals main alone);
        this forwarder goes on until its pipe ends. SIGHUP is ignored. The handlers only record: the
        wake-up pipe tells the loop, which acts. wake_r: a spare group's forwarder's, set up once."""
        if wake_r is None:
            wake_r = record_signals()
        self.loop.watch(wake_r, select.POLLIN, lambda _event: self.signalled(wake_r))

    def signalled(self, wake_r):
        try:
            received = os.read(wake_r, 64)
        except BlockingIOError:
            return
        if self.receiver_pidfd is not None and {signal.SIGTERM, signal.SIGINT} & set(received):
            try:
                signal.pidfd_send_signal(self.receiver_pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it is gone: the group ends anyway

    def release(self):
        """A spare group's forwarder serves its next source in this process: what this one held is
        given back. Whether the process may serve another (not while a name lookup of ours still runs
        in its thread, which writes to its pipe when it is over)."""
        self.connector.cancel()
        for fd in (self.pipe_fd, self.devnull_fd, self.receiver_pidfd):
            if fd is not None:
                os.close(fd)
        if self.sock is not None:
            self.sock.close()
        if self.retainer is not None:
            self.retainer.release()
        return self.connector.lookup is None

    # -- counters ---------------------------------------------------------------------------------

    def add_mirror_drops(self):
        """Add what the receiver dropped for us (--mirror-policy drop) to our counts, once."""
        if not self.drops_added:
            dropped, records = self.receiver_drops()
            self.counts.dropped += dropped
            self.backlog.dropped_records += records
            self.drops_added = True

    def receiver_drops(self):
        """(bytes, records) the receiver dropped for us so far instead of waiting for us."""
        if self.rows is None or self.drops_added:
            return 0, 0
        return self.rows.receiver_drops(self.index)

    def publish(self):
        """Counters to the shared table and the title, from the loop (never from a signal handler,
        which could run between a connection's reset and its accounting): every TITLE_PERIOD_S while
        they change, every IDLE_TITLE_PERIOD_S while they do not."""
        if not self.resumable and not self.cut_noted and self.rows is not None and self.rows.receiver_cut(self.index):
            self.cut_noted = True
            self.stats.abandoned += 1
            log.warning("abandoned mirroring this session to %s: it could not keep up (--mirror-policy drop), and a "
                        "session without framing cannot go on after a gap; the rest of it is dropped", self.dest)
        if self.comparison is not None and self.comparison.active and (self.counts.dropped or self.receiver_drops()[0]):
            self.comparison.stop("commands were dropped for it")
        if self.retainer is not None:
            self.retainer.follow_input(self.sock if self.state == UP else None)
        changed = self.stats.publish(self, os.getpid())
        self.loop.set_timer("publish", TITLE_PERIOD_S if changed else IDLE_TITLE_PERIOD_S, self.publish)


def record_signals():
    """A forwarder's signals: SIGTERM and SIGINT are recorded in the wake-up pipe returned (its loop
    acts on them, see Forwarder.watch_signals); SIGHUP is ignored."""
    wake_r, wake_w = zerocopy.small_pipe()
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return wake_r


def serving(peer, dest, title, rows, index):
    """A forwarder takes a source: its log lines name the connection, and its counters (returned)
    are shown in its title after `title`."""
    proxylog.set_connection("src=%s dst=%s" % (peer, dest))
    return ForwarderStats(rows.forwarder_row(index), lambda text: setproctitle.setproctitle("%s | %s" % (title, text)))


def run_forwarder(pipe_fd, dest, config, receiver_pid=None, rows=None, index=0, stats=None, source=None,
                  requests_link=None, poke_fd=None, turn_marks=None, evidence=None, joined=False, proxy_header=b"",
                  tls_context=None):
    """Body of the forwarder process (see forking.fork_child)."""
    os.set_blocking(pipe_fd, False)
    zerocopy.return_large_blocks()
    fwd = Forwarder(pipe_fd, dest, config, receiver_pid, rows, index, stats, source, requests_link, poke_fd,
                    turn_marks, evidence, joined, proxy_header, tls_context)
    fwd.watch_signals()
    return fwd.run()
