"""--primary: the first destination is the source's session, and its replies go back to the source.

Everything of --primary is here: the session (Session, run by the primary's forwarder on its loop),
the link that hands the primary's socket to the receiver (RequestsLink), and the batches of the
mirrors (MirrorBatch).

Requests reach the primary through its forwarder's pipe until the forwarder has connected and
handed the socket to the receiver (RequestsLink); from then on, once that pipe is empty, the receiver
splices them straight into the socket: a request wakes one process, not two. The pipe's end is still
the end of requests. The forwarder holds a copy of the source socket and splices the primary's
replies to it through a pipe of its own: no byte through Python either way. Nothing is retried: when
the primary cannot be reached, fails, resets or closes, the source is closed the same way (a reset
for a reset, a close for a close), the receiver is asked to end the group (through the shared flag,
then SIGTERM), and what the pipe still brings is counted as dropped. Half-closes pass both ways: the
source's end of requests becomes a FIN to the primary, whose remaining replies still reach the source
before its own FIN does. After the source's FIN, --fin-timeout bounds a session where nothing moves.
"""
import collections
import os
import select
import struct
import signal
import socket
import time

from socketproxy_core import sessions
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import reset
from socketproxy_core.stats import STATE_CLOSING, STATE_DONE
from socketproxy_core.zerocopy import SPLICE_FLAGS, pipe_bytes, pipe_hung_up, set_pipe_size, tee

CHUNK = 1 << 20
ENDED_CLOSE, ENDED_RESET = 1, 2  # how the primary ended the session (in its forwarder's row of the table)
# A mirror of --primary sends in batches (a wake per request would take the CPU the primary needs):
# after a wake that moved under MIRROR_BATCH_BELOW (sent and replies read) it waits MIRROR_BATCH_S
# before it reads its pipe again, unless the receiver pokes it first (it has filled a sixteenth of the
# pipe's slots meanwhile, leaving the rest as slack for a mirror slow to be scheduled on a busy
# machine). Only with a pipe of MIRROR_BATCH_MIN_PIPE or more (64 slots: a poke every 4 writes at least).
MIRROR_BATCH_S = 0.02
MIRROR_BATCH_BELOW = 64 * 1024
MIRROR_BATCH_MIN_PIPE = 256 * 1024
MIRROR_POKE_SHARE = 16  # the receiver pokes a napping mirror once 1/16 of its pipe's slots are used
MAX_COMPARED_AHEAD = 10000  # replies one side may be ahead of the other while they are compared
LOGGED_MISMATCHES = 3  # replies that differ from the primary's logged per session (all are counted)
TURN_WAIT_S = 0.2  # a mirror of a byte stream sends the next turn after this, if its shadow has not answered
STOP_WAIT_S = 5.0  # after asking the receiver to end the group: its stop takes 1 s, then it kills
ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class RequestsLink:
    """Between the receiver and the primary's forwarder: the connected socket, handed over once
    (SCM_RIGHTS). The receiver publishes the request bytes it writes into it in its row of the
    shared table."""

    def __init__(self):
        self.receiver_end, self.forwarder_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def hand_over(self, sock):
        """Forwarder: the primary is connected; the receiver may write to it from now on."""
        try:
            socket.send_fds(self.forwarder_end, [b"c"], [sock.fileno()])
        except OSError:
            pass  # the receiver is gone: its group ends
        self.forwarder_end.close()

    def refuse(self):
        """Forwarder: there will be no connection (the receiver reads end of file)."""
        self.forwarder_end.close()

    def take(self):
        """Receiver: the primary's socket as a descriptor, None when it was not connected."""
        try:
            _, fds, _, _ = socket.recv_fds(self.receiver_end, 1, 1)
        except OSError:
            fds = []
        self.receiver_end.close()
        return fds[0] if fds else None



class Session:
    """Requests pipe -> primary, replies primary -> source, until one side ends the session: the
    handlers of the primary's forwarder while it is UP, then CLOSING until the receiver ends the group.

    Only what the session waits for is watched: the primary's socket for replies while the reply
    pipe has room (and for room while requests wait), the source for room while replies wait. An
    ended connection (POLLHUP) is reported at every poll while its socket is watched, so a socket is
    watched for nothing once nothing is expected of it.
    """

    def __init__(self, fwd, source, link, evidence=()):
        self.fwd = fwd
        self.loop = fwd.loop
        self.source = source
        self.evidence = list(evidence)  # --framing resp: a pipe per mirror that compares our replies
        self.link = link
        # Requests the receiver writes into the primary's socket, from its row of the shared table.
        fwd.counts.extra_sent = fwd.rows.primary_written if fwd.rows is not None else (lambda: 0)
        self.returned = 0  # reply bytes delivered to the source
        self.queued = 0  # reply bytes waiting in our reply pipe for the source to take them
        self.requests_open = self.replies_open = True
        self.socket_full = False
        self.sock_events = None  # what the primary's socket is watched for now
        self.source_full = None  # whether the source is watched for room now
        self.moved_at = 0.0  # when a byte last moved either way (for --fin-timeout)
        self.reply_r = self.reply_w = None
        self.capacity = 0
        self.turns = 0  # replies passed on so far (wakes that moved reply bytes): the receiver marks turns by it

    def start(self, sock):
        """Connected: hand the socket to the receiver, and serve."""
        fwd = self.fwd
        self.link.hand_over(sock)
        self.sock, self.sock_fd, self.source_fd = sock, sock.fileno(), self.source.fileno()
        self.reply_r, self.reply_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = set_pipe_size(self.reply_w, fwd.config.pipe_size)
        self.loop.watch(fwd.pipe_fd, select.POLLIN, self.requests)
        self.watch()

    def unreachable(self):
        """The connection attempt failed: the source is reset, the group ends."""
        fwd = self.fwd
        self.link.refuse()
        if fwd.pipe_eof:  # the source finished before the primary answered: nothing to deliver
            self.source.close()
            fwd.enter(STATE_DONE)
            return
        self.end_session(ENDED_RESET, "cannot reach the primary %s within --connect-timeout" % fwd.dest)

    def requests(self, _event):
        """Our pipe has requests (or its end, which becomes our FIN to the primary)."""
        fwd = self.fwd
        try:
            moved = os.splice(fwd.pipe_fd, self.sock_fd, CHUNK, flags=SPLICE_FLAGS)
        except BlockingIOError:  # the pipe has data (POLLIN): the primary's socket is full
            if not pipe_bytes(fwd.pipe_fd) and pipe_hung_up(fwd.pipe_fd):
                return  # EOF is seen by the next splice
            self.socket_full = True
            self.loop.unwatch(fwd.pipe_fd)
            self.watch()
            return
        except OSError as exc:
            self.failed(exc)
            return
        if moved:
            fwd.counts.handed(moved)
            return
        fwd.end_of_pipe()  # the source has finished sending: the primary gets our FIN
        self.requests_open = False
        self.moved_at = time.monotonic()
        shutdown(self.sock, socket.SHUT_WR)  # a failed primary: the next splice says how
        if fwd.config.fin_timeout:
            self.loop.set_timer("fin", fwd.config.fin_timeout, self.fin_check)

    def primary_ready(self, event):
        """The primary's socket: replies to pass on, room for requests, or its end."""
        if event & select.POLLOUT and self.socket_full:
            self.socket_full = False
            self.loop.watch(self.fwd.pipe_fd, select.POLLIN, self.requests)
        if self.replies_open and (not self.queued if self.evidence else self.queued < self.capacity) and event & (
                select.POLLIN | select.POLLERR | select.POLLHUP):
            try:
                moved = os.splice(self.sock_fd, self.reply_w, self.capacity - self.queued, flags=SPLICE_FLAGS)
            except BlockingIOError:
                moved = -1
            except OSError as exc:
                self.failed(exc)
                return
            if moved == 0:
                self.replies_open = False
            elif moved > 0:
                if self.evidence:
                    self.copy_replies(moved)
                self.queued += moved
                self.moved_at = time.monotonic()
                self.turns += 1
                if self.fwd.rows is not None:  # before the source can see them (see fanout.mark_turn)
                    self.fwd.rows.note_replies(self.turns)
        self.pass_replies()

    def copy_replies(self, moved):
        """The reply pipe holds just the moved bytes (it is read into only when empty, see watch):
        copy them (tee) into every mirror's evidence pipe. A mirror whose pipe cannot take a whole
        copy reads its end instead (and compares no more)."""
        for fd in list(self.evidence):
            try:
                copied = tee(self.reply_r, fd, moved, os.SPLICE_F_NONBLOCK)
            except (BlockingIOError, BrokenPipeError):
                copied = 0
            if copied < moved:
                self.evidence.remove(fd)
                os.close(fd)

    def source_ready(self, _event):
        self.pass_replies()

    def pass_replies(self):
        """Hand the replies to the source now; it is watched only when it is full."""
        if self.queued:
            try:
                moved = os.splice(self.reply_r, self.source_fd, self.queued, flags=SPLICE_FLAGS)
                self.queued -= moved
                self.returned += moved
                self.moved_at = time.monotonic()
            except BlockingIOError:
                pass
            except ERRORS as exc:
                self.source_gone(exc)
                return
        if not self.replies_open and not self.queued:
            self.primary_closed()
            return
        self.watch()

    def watch(self):
        """Watch what the session waits for now (the loop is told only of a change: this runs at
        every request and reply)."""
        room = not self.queued if self.evidence else self.queued < self.capacity  # (see copy_replies)
        sock_events = (select.POLLIN if self.replies_open and room else 0) | (
            select.POLLOUT if self.socket_full else 0)
        if sock_events != self.sock_events:
            self.sock_events = sock_events
            if sock_events:
                self.loop.watch(self.sock_fd, sock_events, self.primary_ready)
            else:
                self.loop.unwatch(self.sock_fd)
        source_full = bool(self.queued)
        if source_full != self.source_full:
            self.source_full = source_full
            if source_full:
                self.loop.watch(self.source_fd, select.POLLOUT, self.source_ready)
            else:
                self.loop.unwatch(self.source_fd)

    def fin_check(self):
        """--fin-timeout after the source's FIN: the session ends once nothing moved for that long."""
        idle_left = self.moved_at + self.fwd.config.fin_timeout - time.monotonic()
        if idle_left > 0:
            self.loop.set_timer("fin", idle_left, self.fin_check)
            return
        fwd = self.fwd
        log.info("closing the session: nothing moved for %.1f s after the source finished (--fin-timeout); "
                 "%d bytes of replies reached the source%s", fwd.config.fin_timeout, self.returned,
                 ", %d more were waiting for it" % self.queued if self.queued else "")
        self.leave()
        reset(self.sock)
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()
        fwd.enter(STATE_DONE)

    def leave(self):
        """Stop watching what the session watched."""
        fwd = self.fwd
        for fd in (fwd.pipe_fd, self.sock_fd, self.source_fd):
            self.loop.unwatch(fd)
        self.sock_events, self.source_full = 0, False
        self.loop.cancel("fin")
        fwd.sock = None

    def failed(self, exc):
        """An error on the primary's socket."""
        self.end_session(ENDED_RESET, "the primary %s failed (%s)" % (self.fwd.dest, exc.strerror or exc))

    def primary_closed(self):
        """The primary sent its FIN and every reply reached the source: the source gets ours."""
        fwd = self.fwd
        requests_open = self.requests_open
        self.leave()
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()
        self.sock.close()
        if requests_open:  # mid-session: the group ends
            self.end_session(ENDED_CLOSE, "the primary %s closed the connection" % fwd.dest)
        else:
            log.info("closed connection to %s: source finished, and the primary's %d bytes of replies reached it",
                     fwd.dest, self.returned)
            fwd.enter(STATE_DONE)

    def source_gone(self, exc):
        """The source went away while replies were on their way: the primary's connection is reset."""
        fwd = self.fwd
        log.info("the source is gone (%s): resetting the connection to the primary %s", exc.strerror or exc, fwd.dest)
        self.leave()
        reset(self.sock)
        self.source.close()
        self.stop_group(ENDED_CLOSE)

    def end_session(self, how, why):
        """The primary ended the session: the source is closed the same way, the group ends. A close
        is a normal end (a server that closes after its reply); a reset or a failure is a warning."""
        fwd = self.fwd
        if how == ENDED_RESET:
            reset(self.source)  # linger 0: the last close of the source (the receiver's) sends a reset
            if fwd.sock is not None:
                self.leave()
                reset(self.sock)
        (log.warning if how == ENDED_RESET else log.info)(
            "%s: %s the source; its group ends (%d bytes of replies reached it)", why,
            "resetting" if how == ENDED_RESET else "closing", self.returned)
        self.stop_group(how)

    def stop_group(self, how):
        """CLOSING: tell the receiver how the session ended and ask it to stop; count what the pipe
        still brings as dropped, until the receiver closes it (STOP_WAIT_S at most)."""
        fwd = self.fwd
        fwd.session_end = how
        fwd.publish()  # the receiver reads how the session ended from our row
        if fwd.receiver_pidfd is not None:
            try:
                signal.pidfd_send_signal(fwd.receiver_pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
        fwd.enter(STATE_CLOSING)
        if fwd.pipe_eof:
            fwd.enter(STATE_DONE)
            return
        self.loop.watch(fwd.pipe_fd, POLL_IN, self.drain_until_end)
        self.loop.set_timer("stop", STOP_WAIT_S, self.receiver_too_slow)

    def drain_until_end(self, _event):
        fwd = self.fwd
        fwd.drain()
        if fwd.pipe_eof:
            self.loop.cancel("stop")
            fwd.enter(STATE_DONE)

    def receiver_too_slow(self):
        log.warning("the receiver did not end the group within %.1f s: exiting", STOP_WAIT_S)
        self.loop.unwatch(self.fwd.pipe_fd)
        self.fwd.enter(STATE_DONE)


class MirrorBatch:
    """A mirror of --primary that moved little at its last wake lets its pipe gather more before it
    looks again: one wake per batch, not per request, leaves the CPU to the primary. The receiver
    pokes it (an eventfd) when the pipe fills faster, so a burst is never dropped for a nap."""

    def __init__(self, fwd, poke_fd):
        self.fwd = fwd
        self.poke_fd = poke_fd
        self.moved_at_wake = 0

    def nap(self):
        """Whether the mirror naps now, before it watches its pipe again (at the nap's end or a poke)."""
        fwd = self.fwd
        moved = fwd.counts.conn_sent + fwd.replies_read
        quiet = moved - self.moved_at_wake < MIRROR_BATCH_BELOW
        self.moved_at_wake = moved
        if not quiet:
            return False
        fwd.loop.unwatch(fwd.pipe_fd)
        fwd.loop.unwatch(fwd.sock)  # the shadow's replies too wait for the batch's end: read then at once
        fwd.loop.watch(self.poke_fd, select.POLLIN, self.poked)
        fwd.loop.set_timer("batch", MIRROR_BATCH_S, self.wake)
        return True

    def poked(self, _event):
        try:
            os.eventfd_read(self.poke_fd)
        except BlockingIOError:
            pass
        log.debug("woken before the batch's end: the pipe fills fast")
        self.wake()

    def wake(self):
        self.stop()
        fwd = self.fwd
        fwd.loop.watch(fwd.sock, select.POLLIN, fwd.socket_up)
        fwd.loop.watch(fwd.pipe_fd, POLL_IN, fwd.pipe_up)

    def stop(self):
        self.fwd.loop.cancel("batch")
        self.fwd.loop.unwatch(self.poke_fd)


class Turns:
    """A mirror of a byte stream sends the source's turns as the primary got them: the bytes the
    source sent before it could have seen the primary's next reply form one turn, and the next turn
    goes to the shadow only once the shadow has answered (any bytes) or TURN_WAIT_S has passed.
    Negotiate-then-speak protocols (PostgreSQL's SSLRequest, SMTP's STARTTLS) refuse bytes sent
    before their answer; pipelined requests (several in one turn) keep their batch. A shadow that
    leaves a turn unanswered for TURN_WAIT_S does not answer turn by turn (a sink, a capture): the
    mirror waits no more for it in this session.

    The receiver marks where turns begin, in bytes written to our pipe (fanout.mark_turn), through
    the turns pipe, before it writes the turn itself. Such a mirror is never resumed on another
    connection, so the bytes handed to its one connection are its position in the stream."""

    def __init__(self, fwd, turns_fd):
        self.fwd = fwd
        self.fd = turns_fd
        self.starts = collections.deque()  # where the next turns begin
        self.position = 0  # bytes handed when last noted ...
        self.replies_then = 0  # ... and the reply bytes read by then
        self.waiting = True  # False once a turn went unanswered for TURN_WAIT_S

    def room(self, position, in_memory=0):
        """Bytes that may be handed now from position, in_memory of them held outside the pipe (a
        backlog being resent): 0 at a turn's end until the shadow answers; -1 when there is nothing
        to hand (wait for the pipe); None once the pipe has ended and is empty (its end is read).

        The pipe's bytes are counted before the turns pipe is read: the receiver writes a turn's
        start before the turn, so every start within them is known."""
        in_pipe = pipe_bytes(self.fwd.pipe_fd)
        self.read_starts()
        starts = self.starts
        while starts and starts[0] <= position:
            if starts[0] == position and self.waiting and self.fwd.replies_read <= self.replies_then:
                if not self.fwd.loop.has_timer("turn"):
                    self.fwd.loop.set_timer("turn", TURN_WAIT_S, self.wait_over)
                return 0
            starts.popleft()
            self.fwd.loop.cancel("turn")
        end = position + in_memory + in_pipe
        if starts:
            end = min(end, starts[0])
        if end > position:
            return end - position
        return None if pipe_hung_up(self.fwd.pipe_fd) else -1

    def handed(self, position):
        """After handing bytes: the next turn needs an answer read after this."""
        if position != self.position:
            self.position, self.replies_then = position, self.fwd.replies_read

    def answered(self):
        """Whether the shadow has answered at the end of a turn the mirror waits on."""
        return self.fwd.loop.has_timer("turn") and self.fwd.replies_read > self.replies_then

    def wait_over(self):
        log.debug("%s left a turn unanswered for %.1f s: its turns are no longer waited for", self.fwd.dest,
                  TURN_WAIT_S)
        self.waiting = False
        self.fwd.pipe_up(0)

    def read_starts(self):
        try:
            data = os.read(self.fd, 8 * 512)
        except BlockingIOError:
            return
        self.starts.extend(struct.unpack("%dq" % (len(data) // 8), data))


class ReplyComparison:
    """--primary with --framing resp: a mirror compares each reply of its shadow with the primary's
    reply to the same command (what Scientist or Diffy do for code and HTTP), so divergence is seen,
    not discovered. The primary's forwarder copies its replies into our evidence pipe (Session); both
    streams are read as RESP, and the k-th replies are compared. Only while the shadow's stream is
    the primary's, command for command: a cut connection or a dropped command ends the comparison
    (said once). The first LOGGED_MISMATCHES mismatches of a session are logged with the command."""

    def __init__(self, fwd, evidence_fd):
        self.fwd = fwd
        self.fd = evidence_fd
        self.from_primary = collections.deque()
        self.from_shadow = collections.deque()
        self.primary = sessions.RespReplies()
        self.primary.capture = self.from_primary
        fwd.replies.capture = self.from_shadow
        self.compared = 0
        self.mismatches = 0
        self.active = True

    def read_primary(self):
        """Read the primary's replies that came: when the shadow's come (the evidence pipe is not
        watched: a mirror in batches must not wake at every reply of the primary)."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            if not data:  # the primary's forwarder has finished (or found us too slow)
                os.close(self.fd)
                self.fd = None
                return
            self.primary.feed(data)

    def compare(self):
        if not self.active:
            return
        self.read_primary()
        from_primary, from_shadow = self.from_primary, self.from_shadow
        while from_primary and from_shadow:
            self.compared += 1
            theirs, ours = from_primary.popleft(), from_shadow.popleft()
            if theirs != ours:
                self.differs(theirs, ours)
        if self.primary.broken:
            self.stop("a reply of the primary too large to hold, or not RESP")
        elif len(from_primary) > MAX_COMPARED_AHEAD or len(from_shadow) > MAX_COMPARED_AHEAD:
            self.stop("the shadow is %d replies away from the primary" % abs(len(from_primary) - len(from_shadow)))
        elif self.fd is None and not from_primary and from_shadow:
            self.stop("the primary's replies stopped coming (its forwarder fell behind the copy, or ended)")

    def differs(self, theirs, ours):
        self.mismatches += 1
        if self.mismatches > LOGGED_MISMATCHES:
            return
        fwd = self.fwd
        memory = fwd.retainer.memory
        memory.wanted[self.compared] = None
        if fwd.sock is not None:
            fwd.retainer.release_acknowledged(fwd.sock, final=True)  # the command was answered: it is acknowledged
        command = memory.wanted.pop(self.compared)
        log.info("reply %d of %s differs from the primary's%s: command %s; the primary answered %s, the shadow %s",
                 self.compared, fwd.dest, " (the last logged for this session)" if self.mismatches == LOGGED_MISMATCHES
                 else "", sessions.show_command(command), short(theirs), short(ours))

    def stop(self, why):
        """The streams are no longer the same command for command: compare no more."""
        if not self.active:
            return
        self.active = False
        self.from_primary.clear()
        self.from_shadow.clear()
        self.primary.capture = self.fwd.replies.capture = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        log.info("replies of %s no longer compared with the primary's: %s (%d compared, %d differed)",
                 self.fwd.dest, why, self.compared, self.mismatches)


def short(reply, limit=80):
    text = repr(bytes(reply))[2:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass
