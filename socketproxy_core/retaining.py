"""The retaining path (--buffer, --framing): what is sent stays retained until acknowledged, what
arrives while the destination is down is kept, and both are resent on the next connection.

A connection's stream is the replayed backlog, then the pipe. The backlog is sent from memory and
kept until acknowledged; the pipe is tee'd into a shadow pipe, then spliced to the socket, so the
healthy path copies nothing through Python (a tls:// destination: read from the pipe into memory and
handed to TLS, the shadow as for any other). Acknowledged bytes leave the shadow (all but KEEP_ACKED
when line-framed, so a cut record can be resent whole). `ahead` bytes were tee'd but not yet taken
by the socket: they sit both at the head of the pipe and at the tail of the shadow.

Through TLS, the destination acknowledges ciphertext: the send queue's bytes are taken as plaintext
not yet acknowledged. Records are larger than what they carry (22 to 29 bytes per 16 KiB), so a cut
connection resends a little more than was lost, never less.

Nothing here waits: step() says what the connection waits for, and the forwarder's loop watches it.
"""
import fcntl
import os
import socket

from socketproxy_core import framing
from socketproxy_core import sessions
from socketproxy_core import tls
from socketproxy_core import zerocopy
from socketproxy_core.backlog import Backlog
from socketproxy_core.sockets import WOULD_BLOCK, Disconnected, describe, reset, unsent_bytes
from socketproxy_core.zerocopy import DRAIN_FLAGS, SPLICE_FLAGS, pipe_bytes, pipe_hung_up, tee

SPLICE_CHUNK = 1 << 20
MIN_SNDBUF = 128 * 1024  # doubled by the kernel: over two of loopback's 64 KiB segments in flight
KEEP_ACKED = 64 * 1024  # line framing: acknowledged bytes kept, to resend a cut record whole
CUT_PEEK = 4096  # line framing: released bytes read (not spliced away) to find the start of the record they cut
KEEP_READ = 64 * 1024  # while down, the pipe is read into the backlog this much at a time ...
KEEP_READS = 16  # ... this many times a call at most


class Retainer:
    """The shadow pipe, the replay and the backlog of one forwarder; its counts go to counts."""

    def __init__(self, pipe_fd, config, counts, devnull_fd, through_tls=False):
        self.pipe_fd = pipe_fd
        # tls://: the tee'd bytes are read out of the pipe for TLS, and wait here until it takes them
        self.plaintext = tls.Plaintext() if through_tls else None
        self.config = config
        self.counts = counts
        self.devnull_fd = devnull_fd
        self.framed = config.framing != "none"
        self.backlog = Backlog(config.buffer, config.framing)
        # Where records end: lines are found by searching back from any cut; a Redis command only by
        # reading forward from the command before it, so with resp every released byte is read.
        self.release_scan = framing.scanner(config.framing)
        self.line_framed = config.framing == "line"
        self.head_limit = KEEP_ACKED if self.line_framed else max(KEEP_ACKED, config.buffer)
        self.shadow_r = self.shadow_w = None
        self.shadow_capacity = self.shadow_len = 0
        self.ahead = 0
        self.replay = bytearray()  # the backlog being resent on the current connection, then spilled bytes
        self.replay_end = 0  # offset in the connection's stream where the resend ends
        self.retained_from = 0  # offset in the connection's stream of the first retained byte
        self.cut_head, self.head_known = b"", True  # framed: the head of the record the release point cuts
        self.keep_buffer = None  # KEEP_READ bytes, made at the first outage
        self.outage_records_base = 0
        # What a new connection needs of the session before the stream resumes (sessions.py): it
        # learns from the delivered bytes as they are released, and from those a lost connection
        # delivered and that are not resent.
        self.memory = sessions.session_memory(config)

    # -- a connection -----------------------------------------------------------------------------

    def release(self):
        """The shadow pipe is closed (its forwarder's process goes on to another source)."""
        if self.shadow_r is not None:
            os.close(self.shadow_r)
            os.close(self.shadow_w)
            self.shadow_r = self.shadow_w = None

    def begin(self, sock):
        """A new connection: its stream starts with the backlog (after skipping() is over)."""
        if self.shadow_r is None:
            self.shadow_r, self.shadow_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.shadow_capacity = zerocopy.set_pipe_size(self.shadow_w, self.config.pipe_size)
        # The socket must fill before the shadow does: then "wait for the destination" is POLLOUT,
        # not a loop polling for acknowledgements. The kernel doubles the value (for its overhead).
        # A small shadow (an unprivileged user's small pipes) spills into memory instead: the socket
        # must still hold enough in flight that the destination's delayed ACKs do not pace it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(self.shadow_capacity // 4, MIN_SNDBUF))
        self.counts.start_connection()
        self.retained_from = 0
        self.shadow_len = 0
        self.ahead = 0
        self.replay = self.backlog.take()
        self.cut_head, self.head_known = b"", True  # the connection's stream starts at a record boundary
        self.release_scan = framing.scanner(self.config.framing)
        self.replay_end = len(self.replay)

    def follow_input(self, sock=None):
        """Under a pipe budget, the shadow takes its input pipe's size, which the receiver grows and
        shrinks with demand (pipesizes.py): larger at once, smaller once what it holds is
        acknowledged (sock: the connection, when up). Whether it grew."""
        if self.shadow_w is None or not self.config.pipe_share:
            return False
        wanted = zerocopy.pipe_capacity(self.pipe_fd)
        if wanted < self.shadow_capacity and self.shadow_len and sock is not None:
            self.release_acknowledged(sock, final=True)
        if wanted == self.shadow_capacity or (wanted < self.shadow_capacity and self.shadow_len):
            return False
        try:
            fcntl.fcntl(self.shadow_w, zerocopy.F_SETPIPE_SZ, wanted)
        except OSError:
            return False  # the user's budget is spent: the shadow stays as it is
        grew = wanted > self.shadow_capacity
        self.shadow_capacity = zerocopy.pipe_capacity(self.shadow_w)
        if grew and sock is not None:  # the socket must still fill before the shadow does (begin)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(self.shadow_capacity // 4, MIN_SNDBUF))
        return grew

    def skipping(self):
        """Framed, when the start of the record in progress was dropped: the pipe is read up to that
        record's end (skip()) before the connection's stream begins."""
        return self.backlog.skipping

    def skip(self):
        """Read the pipe while skipping; False at its end."""
        try:
            chunk = os.read(self.pipe_fd, SPLICE_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        before = self.backlog.dropped
        rest = self.backlog.skip_partial_record(chunk)
        self.counts.drop(self.backlog.dropped - before)
        self.replay += rest
        self.replay_end = len(self.replay)
        return True

    def step(self, sock, stop=None):
        """Move what can be moved now, up to the stream offset stop if given; what the connection
        then waits for: "socket" (room in it), "acks" (acknowledgements, to free the shadow), "pipe",
        "eof" or "turn" (stop reached). Raises Disconnected."""
        if self.counts.conn_sent < self.replay_end:
            waiting = self.send_replay(sock, stop)
            if waiting:
                return waiting
        return self.splice_retained(sock, stop)

    def send_replay(self, sock, stop=None):
        """Send the backlog from memory; "socket" while it is not all sent ("turn" at stop), else None."""
        counts = self.counts
        end = self.replay_end if stop is None else min(stop, self.replay_end)
        if counts.conn_sent >= end:
            return "turn"
        while counts.conn_sent < end:
            # Through TLS a record at a time, as tls.Plaintext does: what is taken counts at once.
            piece_end = end if self.plaintext is None else min(end, counts.conn_sent + tls.RECORD)
            try:
                sent = sock.send(memoryview(self.replay)[counts.conn_sent:piece_end])
            except WOULD_BLOCK:
                return "socket"
            except OSError as exc:
                raise Disconnected(describe(exc)) from None
            counts.handed(sent)
            if self.plaintext is None and counts.conn_sent < end:
                return "socket"  # a plain socket took what it had room for
        return "turn" if end < self.replay_end else None

    def splice_retained(self, sock, stop=None):
        """Move pipe -> socket through the shadow (up to the stream offset stop if given)."""
        sock_fd = sock.fileno()
        drained = False  # the last tee took less than it asked for: the pipe was empty after it
        while True:
            if not self.ahead and not self.plaintext:
                if drained:
                    return "pipe"  # poll says when more comes (or the end): no tee just to see EAGAIN
                if self.replay or self.shadow_len * 2 > self.shadow_capacity:  # not at every chunk: an ioctl
                    self.release_acknowledged(sock)
                room = self.shadow_capacity - self.shadow_len
                if room <= 0:
                    if self.follow_input(sock):
                        continue
                    if self.spill():
                        continue
                    return "acks"  # everything retained is unacknowledged: wait for the destination
                asked = min(room, SPLICE_CHUNK)
                if stop is not None:
                    if stop <= self.counts.conn_sent:
                        return "turn"
                    asked = min(asked, stop - self.counts.conn_sent)
                try:
                    teed = tee(self.pipe_fd, self.shadow_w, asked, os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    # tee says EAGAIN, not 0, at the pipe's end when the shadow is full: ask poll.
                    if not pipe_bytes(self.pipe_fd):
                        return "eof" if pipe_hung_up(self.pipe_fd) else "pipe"
                    # The shadow has no free slot (small writes take one each): let go of the
                    # acknowledged bytes kept for record boundaries too, then wait for acks.
                    retained = self.shadow_len
                    self.release_acknowledged(sock, final=True)
                    if self.shadow_len < retained or self.spill():
                        continue
                    return "acks"
                if not teed:
                    return "eof"
                self.shadow_len += teed
                self.ahead = teed
                drained = teed < asked
            try:
                moved = self.send_ahead(sock, sock_fd)
            except WOULD_BLOCK:
                return "socket"
            except OSError as exc:
                raise Disconnected(describe(exc)) from None
            self.counts.handed(moved)
            if self.ahead and self.plaintext is None:
                return "socket"  # splice moved what the socket had room for (TLS: on to the next record)

    def send_ahead(self, sock, sock_fd):
        """Hand the tee'd bytes to the socket: spliced, or through TLS from memory; how many it took."""
        if self.plaintext is None:
            moved = os.splice(self.pipe_fd, sock_fd, self.ahead, flags=SPLICE_FLAGS)
            self.ahead -= moved
            return moved
        if not self.plaintext:  # out of the pipe (still in the shadow), into TLS's hands
            self.plaintext.read_exactly(self.pipe_fd, self.ahead)
            self.ahead = 0
        return self.plaintext.send(sock)

    def release_acknowledged(self, sock, final=False):
        """Let go of what the destination has acknowledged: the replayed backlog, then the shadow's
        head (all but KEEP_ACKED when line-framed, unless final)."""
        conn_sent = self.counts.conn_sent
        acknowledged = conn_sent - unsent_bytes(sock)
        if self.replay:
            if conn_sent < self.replay_end:
                return  # still resending the backlog
            released = min(acknowledged - self.retained_from, len(self.replay))
            if released <= 0:
                return
            if self.framed:
                self.note_released(self.replay[:released], True)
            if self.memory is not None and self.memory.hungry():
                self.memory.feed(self.replay[:released])
            del self.replay[:released]
            self.retained_from += released
            if self.replay:
                return
        keep = min(KEEP_ACKED, self.shadow_capacity // 4) if self.line_framed and not final else 0
        release = acknowledged - self.retained_from - keep
        if release > 0:
            release = min(release, self.shadow_len - self.ahead)
            learning = self.memory is not None and self.memory.hungry()
            if learning:
                peek = release
            else:
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
                if self.framed:
                    self.note_released(tail, whole)
                if learning:
                    self.memory.feed(tail)

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
        if self.plaintext is not None:
            self.plaintext.clear()  # read out of the pipe, still in the shadow
        while self.shadow_len:
            chunk = os.read(self.shadow_r, self.shadow_len)
            self.shadow_len -= len(chunk)
            data += chunk
        if self.ahead:
            del data[-self.ahead:]
            self.ahead = 0
        return data

    def lose(self, sock):
        """A failed connection (reset here): its unacknowledged bytes go back to the backlog, framed
        from the start of the record they cut (or with that record dropped whole when its start is
        gone). Returns (unacknowledged bytes, bytes resent from already acknowledged ones)."""
        counts = self.counts
        conn_sent, conn_floor = counts.conn_sent, counts.conn_floor
        unacknowledged = reset(sock)
        counts.settle(unacknowledged)
        head = self.cut_head if self.framed else b""
        data = bytearray(head) + self.retained_bytes()
        base = self.retained_from - len(head)  # offset of data in this connection's stream
        acked_at = conn_sent - unacknowledged - base  # in data
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
        if self.memory is not None:  # what is not resent was delivered: the session has it
            self.memory.feed(data[len(head):max(start, len(head))])
            self.memory.at_boundary()
        handed = conn_sent - base  # bytes of data handed to the socket
        # Kept bytes delivered already (acknowledged now, or on an earlier connection before being
        # resent on this one): neither sent again in the counts nor dropped, whatever happens to them.
        delivered_to = max(acked_at, min(conn_floor - base, len(data)))
        counts.acked_front = max(0, delivered_to - start)
        counts.outage_dropped = 0
        self.keep(memoryview(data)[start:])
        return handed - acked_at, acked_at - start

    def records_in_last(self, count):
        """Framed: how many records end in the last count bytes retained (emptying what is retained)."""
        head = self.cut_head if self.head_known else b""
        data = bytearray(head) + self.retained_bytes()
        scan = self.backlog.scanner() if self.head_known else self.release_scan.copy()
        count = min(count, len(data))  # through TLS, count is ciphertext: a little more than it carries
        scan.scan(data, 0, len(data) - count)
        return scan.scan(data, len(data) - count)[0]

    # -- while down -------------------------------------------------------------------------------

    def keep(self, chunk):
        """Add to the backlog, counting what it drops."""
        before = self.backlog.dropped
        self.backlog.add(chunk)
        self.counts.drop_kept(self.backlog.dropped - before)

    def drain_to_backlog(self, limit=None):
        """Move what the pipe holds now (at most limit bytes) into the backlog (the newest --buffer
        bytes stay); False at the pipe's end."""
        if self.keep_buffer is None:
            self.keep_buffer = memoryview(bytearray(KEEP_READ))
        for _ in range(KEEP_READS):  # then back to the loop
            if limit is not None and limit <= 0:
                return True
            try:
                size = os.readv(self.pipe_fd, [self.keep_buffer if limit is None else self.keep_buffer[:limit]])
            except BlockingIOError:
                return True
            if not size:
                return False
            self.keep(self.keep_buffer[:size])
            if limit is not None:
                limit -= size
            if size < KEEP_READ:
                return True
        return True

    def drop_backlog(self):
        """The source finished while the destination was down: what is kept will never be sent."""
        kept = self.backlog.take()
        if not kept:
            return
        self.counts.drop_kept(len(kept))
        self.backlog.dropped += len(kept)
        if self.framed:
            self.backlog.dropped_records += self.backlog.scanner().scan(kept)[0]

    def outage_dropped_records(self):
        return self.backlog.dropped_records - self.outage_records_base

    def unsent_replay(self):
        """Bytes of the replayed backlog not yet handed to the connection, none of them delivered."""
        counts = self.counts
        return max(0, self.replay_end - max(counts.conn_sent, counts.conn_floor))
