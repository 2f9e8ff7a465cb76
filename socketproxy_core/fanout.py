"""The receiver's write side: every chunk of the source to every forwarder's pipe.

splice(2) moves the source's bytes into a staging pipe, tee(2) duplicates them into every pipe but
the last, and splice moves them into the last: nothing is copied through Python. Only when a pipe
cannot take the whole chunk at once (a slow destination) is the chunk read into memory and written
out from there, each pipe at its own pace, while the source waits (HELD). With --framing resp (and
line-framed --primary with dropping mirrors) the source is read into memory and only whole records
go on. Mirrors under --mirror-policy drop lose whole writes instead of holding the source.

A mixin of receiver.Receiver: the state is the receiver's, this is the part that writes pipes.
"""
import os
import select
import time

from socketproxy_core import framing
from socketproxy_core import tls
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import describe
from socketproxy_core.zerocopy import SPLICE_FLAGS, pipe_bytes, tee

CHUNK = 1024 * 1024
SPLICE_F_NONBLOCK = os.SPLICE_F_NONBLOCK
splice = os.splice
SLOT_GUESS = 256  # bytes per pipe slot, as the pokes of mirrors count them (see FanOut.fed)
RESP_CHUNK = 256 * 1024
MAX_COMMAND = 64 * 1024 * 1024  # --framing resp: a command is held until whole, up to this size


class TurnState:
    """A mirror sending turns (mirrors.Turns), as the receiver writes its pipe."""

    def __init__(self, marks):
        self.marks = marks  # mirrors.TurnMarks: where its turns begin, shared with its forwarder
        self.written = 0  # bytes written to its pipe
        self.last_start = 0  # where the last turn began
        self.room = 0  # bytes its pipe had room for at least (when last asked, less what we wrote since)

    def wrote(self, size):
        self.written += size
        self.room -= size


class FanOut:
    """Writing the source to the pipes (see the module docstring)."""

    def discard_stage(self, size):
        """The chunk in the staging pipe is lost (for a failed primary): the next must not follow it."""
        while size > 0:
            size -= len(os.read(self.stage_r, min(size, CHUNK)))

    def fed(self, fd, size):
        """A mirror's pipe took size bytes: poke its forwarder once they may fill a sixteenth of the
        pipe's slots, so it does not nap through a burst. A write takes a slot per buffer, and a
        chunk spliced from the source has one per packet it came in: counted as one per
        SLOT_GUESS bytes (a request in one packet counts one)."""
        poke = self.pokes[fd]
        poke[1] += size // SLOT_GUESS + 1
        if poke[1] >= poke[2]:
            poke[1] = 0
            os.eventfd_write(poke[0], 1)

    def mark_turn(self, size):
        """--primary, a mirror of a byte stream: a chunk read after the primary's forwarder passed on
        more replies begins a new turn (the source may have seen them before sending it): each such
        mirror is told where, in bytes written to its pipe, before the chunk is written there. A
        mirror far behind (its ring of marks full) merges the turns it was not told of. Whether the chunk
        begins a turn."""
        replies = self.rows.replies_passed()
        if replies == self.replies_seen:
            return self.received == size  # the session's first chunk begins its first turn
        self.replies_seen = replies
        for turn in self.turns.values():
            if turn.written == turn.last_start:
                continue  # the last turn was dropped whole (skip_turn): this one begins where it did
            turn.last_start = turn.written
            turn.marks.mark(turn.written)
        return True

    def skip_turn(self, fd, size, turn_starts):
        """--mirror-policy drop, a mirror sending turns: a turn its pipe has no room for as it begins
        is dropped whole (never part of one: the shadow would read on from an arbitrary byte); whether
        this chunk is dropped so."""
        if turn_starts:
            turn = self.turns[fd]
            if turn.room < size:  # what we know may be stale: the mirror takes from the pipe meanwhile
                turn.room = self.config.pipe_size - pipe_bytes(fd)
            if turn.room >= size:
                self.skipping_turn.discard(fd)
                return False
            self.skipping_turn.add(fd)
        elif fd not in self.skipping_turn:
            return False
        self.count_mirror_drop(fd, size)
        return True

    def wrote(self, fd, size):
        if fd == self.primary_fd:
            self.primary_written += size

    def lost(self, fd, size):
        """Requests the failed primary's socket did not take: dropped, in its forwarder's counts."""
        if fd == self.primary_fd:
            self.count_mirror_drop(fd, size)

    def read_source(self):
        """Move one chunk of the source into every pipe without copying it through Python.

        splice(2) moves the source's bytes into the staging pipe, tee(2) duplicates them into every
        forwarder's pipe but the last, and splice moves them into the last. Only when a pipe cannot
        take the whole chunk at once (a slow destination) is the chunk read into our buffer and
        written out from there, each pipe at its own pace.
        """
        size = self.take_from_source(splice, self.source_fd, self.stage_w, CHUNK, None, None, SPLICE_FLAGS)
        if not size:
            return
        self.pipe_sizes.read_size(size)
        turn_starts = self.mark_turn(size) if self.turns else False
        self.chunk_len = size
        if self.handed_fd is not None:
            self.write_to_primary()
        fds = self.pipe_fds
        last = len(fds) - 1
        for index, fd in enumerate(fds):
            if fd in self.droppable:  # never waited for: what it does not take now, it loses (a byte stream)
                if fd in self.cut_mirrors:
                    self.count_mirror_drop(fd, size)
                    continue
                if fd in self.turns and self.skip_turn(fd, size, turn_starts):
                    continue
                try:
                    moved = tee(self.stage_r, fd, size, SPLICE_F_NONBLOCK)
                except (BlockingIOError, BrokenPipeError):
                    moved = 0
                if fd in self.turns:
                    self.turns[fd].wrote(moved)
                    if turn_starts and not moved:  # no room for the turn's start after all: dropped whole
                        self.skipping_turn.add(fd)
                        self.count_mirror_drop(fd, size)
                        continue
                if moved < size:
                    # A byte stream cut here would go on from an arbitrary byte: the mirror's session
                    # stops here, and the rest of it is dropped (its forwarder reports it abandoned).
                    self.cut_mirrors.add(fd)
                    self.count_mirror_drop(fd, size - moved)
                if fd in self.pokes:
                    self.fed(fd, moved)
                continue
            try:
                if index < last:
                    moved = tee(self.stage_r, fd, size, SPLICE_F_NONBLOCK)
                    if fd in self.pokes:
                        self.fed(fd, moved)
                    elif fd in self.turns:
                        self.turns[fd].wrote(moved)
                else:
                    moved = splice(self.stage_r, fd, size, flags=SPLICE_FLAGS)
                    self.wrote(fd, moved)
            except BlockingIOError:
                moved = 0
            except OSError:
                # That forwarder died (check_forwarders ends the group), or the primary failed (its
                # forwarder resets the source and ends the group): the chunk is lost for it. A failed
                # splice (the last) leaves the chunk in the staging pipe: it must not stay there.
                if index == last:
                    self.lost(fd, size)
                    self.discard_stage(size)
                moved = size
            if moved < size:
                self.copy_rest(index, moved)
                return

    def take_from_source(self, read, *args):
        """One read of the source, read(*args): its size, or 0 when there is nothing to pass on (nothing
        yet; or the source closed or failed, and then it is ended here)."""
        try:
            size = read(*args)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.end_source(describe(exc))
            return 0
        if not size:
            if self.partial:
                log.warning("source closed inside a %s: its %d bytes were not passed on",
                            "command" if self.config.framing == "resp" else "line", len(self.partial))
            self.end_source("source closed")
            return 0
        self.received += size
        self.last_data = time.monotonic()
        return size

    def read_commands(self):
        """--framing resp: read the source into memory and pass on only whole Redis commands.

        Every byte is read by the scanner (a command's end is found only by reading it from its
        start), and the commands are written to each pipe from our buffer: two copies the byte
        stream does not make. A stream that is not RESP is never passed on: the source is closed.
        """
        if self.resp_buffer is None:
            self.resp_buffer = memoryview(bytearray(RESP_CHUNK))
        size = self.take_from_source(self.recv_into, self.resp_buffer)
        if not size:
            return
        self.pipe_sizes.read_size(size)
        chunk = self.resp_buffer[:size].tobytes()
        before = self.commands.copy()
        try:
            records, end = self.commands.scan(chunk)
        except framing.NotRecords as exc:
            log.error("closing source: not valid RESP (%s); the whole commands before were passed on", exc)
            self.end_reason = "the source does not speak RESP"
            self.loop.unwatch(self.source_fd)
            self.source.close()
            end = last_end_before_error(before, chunk)
            self.fan_out(bytes(self.partial) + chunk[:end] if end > 0 else b"")
            return
        if end < 0:
            self.partial += chunk
            if len(self.partial) > MAX_COMMAND:
                log.error("closing source: a command of more than %d MiB (the most --framing resp holds)",
                          MAX_COMMAND >> 20)
                self.partial.clear()
                self.end_source("command too large")
            return
        whole = bytes(self.partial) + chunk[:end] if self.partial else chunk[:end]
        self.partial = bytearray(chunk[end:])
        self.fan_out(whole, records)

    def read_decrypted(self):
        """A TLS source (--tls-cert): its decrypted bytes cannot be spliced; they are read into memory
        and written to every pipe from there. Bytes the TLS object has decrypted already are read on
        at once (poll does not see them)."""
        if self.resp_buffer is None:
            self.resp_buffer = memoryview(bytearray(RESP_CHUNK))
        size = self.take_from_source(self.recv_into, self.resp_buffer)
        # A TLS read returns one record (16 KiB at most): gather what is there into one write per pipe.
        while size and size < RESP_CHUNK - tls.RECORD:
            try:
                more = self.recv_into(self.resp_buffer[size:])
            except OSError:  # nothing more now, or a failure the next read meets and ends the source with
                break
            if not more:  # the end (close_notify): read again once this has gone out, though poll
                self.tls_ended = True  # will not say so (the source may wait for our close_notify)
                break
            size += more
            self.received += more
        if size:
            self.pipe_sizes.read_size(size)
            self.fan_out(self.resp_buffer[:size].tobytes())

    def read_pending_tls(self):
        """After a chunk went out: the TLS source may hold decrypted bytes, or its end, that poll cannot see."""
        if self.tls_context is not None and self.source.fileno() >= 0 and (self.tls_ended or self.source.pending()):
            self.loop.set_timer("tls pending", 0, lambda: self.source_ready(0))

    def fan_out(self, data, records=0):
        """Write data to every pipe from memory; pipes that cannot take it all hold the source (but
        mirrors under --mirror-policy drop, which lose it whole instead)."""
        if self.handed_fd is not None:
            self.write_to_primary()
        self.view = memoryview(data)
        self.chunk_len = len(data)
        for fd in self.pipe_fds:
            if fd in self.droppable:
                self.offer_to_mirror(fd, data, records)
            else:
                self.pending[fd] = 0
        if not self.pending:  # every pipe dropped it
            self.after_chunk()
        for fd in list(self.pending):
            self.write_pending(fd, register=True)

    def room_for(self, fd, size, records=0):
        """Whether a mirror's pipe may have room for size bytes now (counted in bytes: a pipe of
        small writes can still be full); if not, they are dropped for it."""
        if self.config.pipe_size - pipe_bytes(fd) >= size:
            return True
        self.count_mirror_drop(fd, size, records)
        return False

    def count_mirror_drop(self, fd, size, records=0):
        """Count bytes (and records) dropped for a mirror, for its forwarder to report."""
        index = self.dest_index[fd]
        drops = self.drops[index]
        drops[0] += size
        drops[1] += records
        self.rows.write_drops(index, drops[0], drops[1], fd in self.cut_mirrors)

    def offer_to_mirror(self, fd, data, records):
        """Whole records to a mirror that is never waited for: written whole, or dropped whole. A
        write the pipe takes only part of is finished later from memory (a record must not be torn),
        and the mirror loses what comes meanwhile."""
        if fd in self.mirror_tails:
            self.count_mirror_drop(fd, len(data), records)
            return
        if not self.room_for(fd, len(data), records):
            return
        try:
            written = os.write(fd, data)
        except (BlockingIOError, BrokenPipeError):
            written = 0
        if fd in self.pokes:
            self.fed(fd, written)
        if not written:
            self.count_mirror_drop(fd, len(data), records)
        elif written < len(data):
            self.mirror_tails[fd] = memoryview(data)[written:]
            self.loop.watch(fd, select.POLLOUT, lambda _event, fd=fd: self.finish_mirror_tail(fd))

    def drop_mirror_tails(self):
        """The pipes close now: the rest of the records mirrors took only part of is dropped (such a
        mirror ends inside a record)."""
        for fd, tail in self.mirror_tails.items():
            self.count_mirror_drop(fd, len(tail))
            self.loop.unwatch(fd)
        self.mirror_tails.clear()

    def finish_mirror_tail(self, fd):
        """A mirror's pipe has room again: go on with the rest of the write it took only part of."""
        tail = self.mirror_tails[fd]
        try:
            written = os.write(fd, tail)
        except BlockingIOError:
            return
        except BrokenPipeError:
            written = len(tail)
        if written < len(tail):
            self.mirror_tails[fd] = tail[written:]
            return
        del self.mirror_tails[fd]
        self.loop.unwatch(fd)
        if not self.mirror_tails and self.pipes_closing:
            self.close_pipes()

    def copy_rest(self, index, moved):
        """A pipe took only part of the chunk: finish this chunk from our buffer (backpressure)."""
        left = self.chunk_len if index < len(self.pipe_fds) - 1 else self.chunk_len - moved
        if self.view is None:
            self.view = memoryview(bytearray(CHUNK))
        os.readv(self.stage_r, [self.view[:left]])
        if index == len(self.pipe_fds) - 1:
            # splice consumed what the last pipe took: the buffer holds only the rest.
            self.chunk_len = left
            self.pending[self.pipe_fds[index]] = 0
        else:
            self.pending[self.pipe_fds[index]] = moved
            for fd in self.pipe_fds[index + 1:]:
                self.pending[fd] = 0
        for fd in self.pending:
            self.loop.watch(fd, select.POLLOUT, lambda _event, fd=fd: self.write_pending(fd))
        self.hold()

    def write_pending(self, fd, register=False):
        """Continue the current chunk into a pipe that has room again (register: a first try)."""
        offset = self.pending[fd]
        try:
            written = os.write(fd, self.view[offset:self.chunk_len])
            offset += written
            self.wrote(fd, written)
            if fd in self.pokes:
                self.fed(fd, written)
            elif fd in self.turns:
                self.turns[fd].wrote(written)
        except BlockingIOError:
            pass
        except OSError:  # as in read_source: the group is ending
            self.lost(fd, self.chunk_len - offset)
            offset = self.chunk_len
        if offset < self.chunk_len:
            self.pending[fd] = offset
            if register:
                self.loop.watch(fd, select.POLLOUT, lambda _event, fd=fd: self.write_pending(fd))
                self.hold()  # backpressure, as copy_rest
            return
        del self.pending[fd]
        if not register:
            self.loop.unwatch(fd)
        if not self.pending:
            self.after_chunk()


def last_end_before_error(scan, chunk):
    """Where the last whole command before the error in chunk ends (-1: none), with the scanner
    as it was before chunk."""
    end = -1
    try:
        while True:
            _, next_end = scan.scan(chunk, max(end, 0), until=max(end, 0))
            if next_end < 0:
                return end
            end = next_end
    except framing.NotRecords:
        return end
