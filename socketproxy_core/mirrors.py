"""The mirrors of --primary: how they send (in batches with framing, turn by turn without) and how
they compare their shadow's replies with the primary's (--framing resp).

The primary's side of the session is in primary.py; a mirror is otherwise a forwarder like any other.
"""
import collections
import mmap
import os
import select
import struct

from socketproxy_core import sessions
from socketproxy_core.proxylog import log
from socketproxy_core.zerocopy import pipe_bytes, pipe_hung_up

CHUNK = 1 << 20
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
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


class TurnMarks:
    """Where a mirror's turns begin, in bytes written to its pipe: a ring in memory shared by the
    receiver (which marks a turn's start before it writes the turn into the pipe) and the mirror's
    forwarder (which reads the marks after counting its pipe's bytes), made before the fork. A mark
    is a store, not a syscall: a request costs the receiver no write and the mirror no read. A full
    ring (a mirror far behind) takes no mark: the turns it was not told of merge."""

    SLOTS = 8192
    COUNT = struct.Struct("q")  # each side writes its own count: marks written (0), marks taken (8)
    WRITTEN_AT, TAKEN_AT, MARKS_AT = 0, 8, 16

    def __init__(self):
        self.ring = mmap.mmap(-1, self.MARKS_AT + self.SLOTS * self.COUNT.size)  # shared, anonymous

    def count(self, offset):
        return self.COUNT.unpack_from(self.ring, offset)[0]

    def mark(self, position):
        """Receiver: the next turn begins at position; False when the ring is full."""
        written = self.count(self.WRITTEN_AT)
        if written - self.count(self.TAKEN_AT) >= self.SLOTS:
            return False
        self.COUNT.pack_into(self.ring, self.MARKS_AT + written % self.SLOTS * self.COUNT.size, position)
        self.COUNT.pack_into(self.ring, self.WRITTEN_AT, written + 1)  # the mark first, then its count
        return True

    def take(self):
        """Mirror: the marks written since the last take."""
        written, taken = self.count(self.WRITTEN_AT), self.count(self.TAKEN_AT)
        if written == taken:
            return ()
        marks = [self.count(self.MARKS_AT + index % self.SLOTS * self.COUNT.size) for index in range(taken, written)]
        self.COUNT.pack_into(self.ring, self.TAKEN_AT, written)
        return marks


class Turns:
    """A mirror of a byte stream sends the source's turns as the primary got them: the bytes the
    source sent before it could have seen the primary's next reply form one turn, and the next turn
    goes to the shadow only once the shadow has answered (any bytes) or TURN_WAIT_S has passed.
    Negotiate-then-speak protocols (PostgreSQL's SSLRequest, SMTP's STARTTLS) refuse bytes sent
    before their answer; pipelined requests (several in one turn) keep their batch. A shadow that
    leaves a turn unanswered for TURN_WAIT_S does not answer turn by turn (a sink, a capture): the
    mirror waits no more for it in this session.

    The receiver marks where turns begin, in bytes written to our pipe (fanout.mark_turn), in the
    shared TurnMarks, before it writes the turn itself. Such a mirror is never resumed on another
    connection, so the bytes handed to its one connection are its position in the stream."""

    def __init__(self, fwd, marks):
        self.fwd = fwd
        self.marks = marks
        self.starts = collections.deque()  # where the next turns begin
        self.position = 0  # bytes handed when last noted ...
        self.replies_then = 0  # ... and the reply bytes read by then
        self.waiting = True  # False once a turn went unanswered for TURN_WAIT_S
        self.takes_all = False  # the bytes room() gave are all there was: handed, the pipe is empty

    def room(self, position, in_memory=0):
        """Bytes that may be handed now from position, in_memory of them held outside the pipe (a
        backlog being resent): 0 at a turn's end until the shadow answers; -1 when there is nothing
        to hand (wait for the pipe); None once the pipe has ended and is empty (its end is read).

        The pipe's bytes are counted before the marks are read: the receiver marks a turn's start
        before it writes the turn, so every start within them is known."""
        in_pipe = pipe_bytes(self.fwd.pipe_fd)
        self.read_starts()
        starts = self.starts
        if not self.waiting:  # a shadow that does not answer turn by turn: turns are not waited for
            starts.clear()
        while starts and starts[0] <= position:
            if starts[0] == position and self.waiting and self.fwd.replies_read <= self.replies_then:
                if not self.fwd.loop.has_timer("turn"):
                    self.fwd.loop.set_timer("turn", TURN_WAIT_S, self.wait_over)
                return 0
            starts.popleft()
            self.fwd.loop.cancel("turn")
        end = position + in_memory + in_pipe
        self.takes_all = not starts or end <= starts[0]
        if not self.takes_all:
            end = starts[0]
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
        self.starts.extend(self.marks.take())


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
