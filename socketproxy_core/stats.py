"""The one table in shared memory: every fact one process publishes for others, each row with one writer.

Made by main before its first fork: a header (main's own counters and the totals of the groups that
are gone), then one slot per source being served. A slot holds:

  receiver row          written by the receiver: pid, bytes received, request bytes it wrote into
                        the primary's socket (--primary), and whether it closed the pipes on purpose
                        (set before it closes them: a forwarder seeing its pipe end tells the source's
                        end from the receiver's death by it)
  forwarder row x D     written by each forwarder: pid, its counters (sent, dropped, dropped records,
                        connect failures, reconnects, resent, error replies, mirror sessions
                        abandoned, replies that differ from the primary's), its state and since when, the
                        bytes in its backlog, how a --primary session ended (read by the receiver),
                        and (the primary's) how often it has passed replies on (read by the
                        receiver at every chunk, to mark turns for mirrors: written at once)
  drops row x D         written by the receiver: bytes and records it dropped for each mirror under
                        --mirror-policy drop (the mirror's forwarder adds them to its own counts), and
                        whether it cut a mirror's byte stream (the rest of the session is dropped)

A process writes its rows at most once a second and when something must be seen at once (an end),
so the data path makes no IPC. Main folds a slot into the totals once its whole group is gone, then
reuses it: the table never grows, and the totals count every finished connection exactly as its
processes last wrote it.

Each row (and the header, for folds) has a sequence number, odd while it is being written: a reader
retries until it reads the same even number before and after (a seqlock).
"""
import mmap
import os
import struct
import time

FIELD = struct.Struct("q")
ROW_FIELDS = 16
ROW = ROW_FIELDS * FIELD.size
ROW_FORMAT = struct.Struct("%dq" % ROW_FIELDS)
# A forwarder's row: seq, pid, then these, then its state and since when (a float).
FORWARDER_COUNTERS = ("sent", "dropped", "dropped_records", "connect_failures", "reconnects", "resent",
                      "error_replies", "abandoned", "mismatches")
# A forwarder's states (forwarding.py): the title and the metrics show them.
(STATE_NONE, STATE_CONNECTING, STATE_UP, STATE_DOWN, STATE_DRAINING, STATE_CLOSING, STATE_DONE,
 STATE_ABANDONED) = range(8)
STATE_NAMES = {STATE_NONE: "-", STATE_CONNECTING: "connecting", STATE_UP: "up", STATE_DOWN: "down",
               STATE_DRAINING: "draining", STATE_CLOSING: "closing", STATE_DONE: "done", STATE_ABANDONED: "abandoned"}
CONNECTED_STATES = (STATE_UP, STATE_DRAINING, STATE_CLOSING)  # a connection to the destination is open
# The header: a row holding only the fold's seq, main's row (these counters; the received total of
# finished groups), then a row per destination with the totals of finished forwarders (as their rows).
READ_TRIES = 1000  # a reader never waits for a writer that died in the middle of a write
MAIN_COUNTERS = ("accepted", "refused_allow", "refused_full", "active", "group_kills", "received", "refused_tls",
                 "refused_proxy", "spares")
# Why a receiver closed its source before serving it (its row's refused field, read by main when it ends).
REFUSED_TLS, REFUSED_PROXY, REFUSED_ALLOW = 1, 2, 3


class Row:
    """One process's row; write() publishes every field at once."""

    def __init__(self, table, offset):
        self.table = table
        self.offset = offset

    def write(self, *values):
        buf, offset = self.table.buf, self.offset
        seq = FIELD.unpack_from(buf, offset)[0]
        writing = seq | 1  # odd while writing (already odd if a writer of this row died writing)
        FIELD.pack_into(buf, offset, writing)
        struct.pack_into("%dq" % len(values), buf, offset + FIELD.size, *values)
        FIELD.pack_into(buf, offset, writing + 1)

    def read(self):
        """The fields after seq, consistent, unless the writer stays in the middle of a write: it
        was killed there (its row is final, as it is), or it was preempted (the next read is right)."""
        buf, offset = self.table.buf, self.offset
        for _ in range(READ_TRIES):
            fields = ROW_FORMAT.unpack_from(buf, offset)
            if fields[0] % 2 == 0 and FIELD.unpack_from(buf, offset)[0] == fields[0]:
                break
        return fields[1:]

    def clear(self):
        self.write(*([0] * (ROW_FIELDS - 1)))


class Table:
    """The shared table: `slots` sources of `dests` destinations each."""

    def __init__(self, slots, dests, fd=None):
        self.slots = slots
        self.dests = dests
        self.header_rows = 2 + dests  # seq row + main counters, finished received, per destination
        self.slot_rows = 1 + 2 * dests  # the receiver's row, a row per forwarder, a drops row per destination
        size = ROW * (self.header_rows + slots * self.slot_rows)
        # A memfd, so that main can map it again after an upgrade in place (exec keeps the descriptor);
        # its children map it by inheritance. fd: the table of the image before (its layout is the same).
        if fd is None:
            fd = os.memfd_create("socketproxy-table", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.buf = mmap.mmap(fd, size)
        self.columns_used = dests  # columns given to destinations so far (main's): the rest are never written
        self.free = list(range(slots - 1, -1, -1))
        self.retiring = {}  # slot -> process group that must be gone before the slot is folded

    # -- rows -------------------------------------------------------------------------------------

    def main_row(self):
        return Row(self, ROW)

    def finished_row(self, dest):
        return Row(self, ROW * (2 + dest))

    def receiver_row(self, slot):
        return Row(self, ROW * (self.header_rows + slot * self.slot_rows))

    def forwarder_row(self, slot, dest):
        return Row(self, ROW * (self.header_rows + slot * self.slot_rows + 1 + dest))

    def drops_row(self, slot, dest):
        return Row(self, ROW * (self.header_rows + slot * self.slot_rows + 1 + self.dests + dest))

    # -- main's side ------------------------------------------------------------------------------

    def pipe_bytes_in_use(self):
        """(bytes of pipes every live group holds, how many groups hold some), from their receivers' rows."""
        total = groups = 0
        for slot in range(self.slots):
            held = self.receiver_row(slot).read()[RCV_PIPE_BYTES]
            if held:
                total += held
                groups += 1
        return total, groups

    def allocate(self):
        """A free slot for a new source, None when every slot is in use."""
        return self.free.pop() if self.free else None

    def retire(self, slot, pgid):
        """The receiver of slot has ended: fold its slot once the group is gone (see fold_gone)."""
        self.retiring[slot] = pgid

    def fold_gone(self, group_alive):
        """Fold the slots whose group is gone (group_alive(pgid) False) into the totals."""
        for slot, pgid in list(self.retiring.items()):
            if not group_alive(pgid):
                del self.retiring[slot]
                self.fold(slot)

    def fold(self, slot):
        """Add a finished slot's counters to the totals and free it, as one change for readers."""
        seq = FIELD.unpack_from(self.buf, 0)[0]
        FIELD.pack_into(self.buf, 0, seq + 1)
        main = self.main_row()
        counters = list(main.read())
        counters[MAIN_COUNTERS.index("received")] += self.receiver_row(slot).read()[1]
        main.write(*counters)
        for dest in range(self.columns_used):
            row = self.forwarder_row(slot, dest)
            values = row.read()
            drops = self.drops_row(slot, dest)
            if not any(values) and not any(drops.read()):
                continue  # a column this group did not use (a destination a reload removed or added)
            done = self.finished_row(dest)
            totals = list(done.read())
            for index in range(len(FORWARDER_COUNTERS)):
                totals[1 + index] += values[1 + index]
            done.write(*totals)
            row.clear()
            drops.clear()
        self.receiver_row(slot).clear()
        FIELD.pack_into(self.buf, 0, seq + 2)
        self.free.append(slot)

    def set_main(self, **values):
        """Main's counters (main is their only writer)."""
        main = self.main_row()
        counters = list(main.read())
        for name, value in values.items():
            counters[MAIN_COUNTERS.index(name)] = value
        main.write(*counters)

    def main_counters(self):
        return dict(zip(MAIN_COUNTERS, self.main_row().read()))

    # -- readers ----------------------------------------------------------------------------------

    def snapshot(self):
        """Everything at one instant: main's counters with the finished totals added to, and the
        live rows. Returns (main counters, per destination totals, live forwarder states, bytes kept
        in backlogs per destination)."""
        for attempt in range(READ_TRIES):  # main folds in microseconds: one under way for long means it died
            seq = FIELD.unpack_from(self.buf, 0)[0]
            if seq % 2 and attempt < READ_TRIES - 1:
                continue
            main = self.main_counters()
            totals = []
            for dest in range(self.dests):
                totals.append(dict(zip(FORWARDER_COUNTERS, self.finished_row(dest).read()[1:])))
            states = [[] for _ in range(self.dests)]
            backlogs = [0] * self.dests
            for slot in range(self.slots):
                pid, received = self.receiver_row(slot).read()[:2]
                main["received"] += received
                for dest in range(self.dests):
                    values = self.forwarder_row(slot, dest).read()
                    if not values[0]:
                        continue
                    for index, name in enumerate(FORWARDER_COUNTERS):
                        totals[dest][name] += values[1 + index]
                    states[dest].append(values[FWD_STATE])
                    backlogs[dest] += values[FWD_BACKLOG]
            if FIELD.unpack_from(self.buf, 0)[0] == seq:
                break
        return main, totals, states, backlogs


class ForwarderStats:
    """A forwarder's counters, published to its row and its title at most once a second."""

    def __init__(self, row, title):
        self.row = row
        self.title = title
        self.state, self.since = STATE_CONNECTING, time.time()
        self.connect_failures = 0
        self.reconnects = 0  # connections made after one was up
        self.abandoned = 0  # a mirror of --primary: sessions it stopped mirroring, cut and not restorable
        self.ever_up = False
        self.last = None

    def set_state(self, state):
        if state != self.state:
            self.state, self.since = state, time.time()

    def values(self, fwd):
        extra, extra_records = fwd.receiver_drops()  # --mirror-policy drop: dropped by the receiver
        return (fwd.delivered(), fwd.dropped + extra, fwd.backlog.dropped_records + extra_records, self.connect_failures,
                self.reconnects, fwd.counts.resent, fwd.error_replies(), self.abandoned, fwd.mismatches(), self.state,
                len(fwd.backlog),
                fwd.session_end, fwd.session.turns if fwd.session is not None else 0)

    def publish(self, fwd, pid):
        """Write the row and the title if anything changed since the last time; whether it did."""
        values = self.values(fwd)
        if values == self.last:
            return False
        self.last = values
        if self.row is not None:
            counted = len(FORWARDER_COUNTERS) + 1  # and the state
            self.row.write(pid, *values[:counted], struct.unpack("q", struct.pack("d", self.since))[0],
                           *values[counted:])
        if self.title is not None:
            self.title("%s, sent %s, dropped %s%s%s, %d reconnects%s%s%s" % (
                state_text(self.state, self.since), human(values[0]), human(values[1]),
                " (%d records)" % values[2] if fwd.framed else "",
                ", kept %s" % human(len(fwd.backlog)) if len(fwd.backlog) else "", self.reconnects,
                ", %d error replies" % values[6] if fwd.replies is not None else "",
                ", %d sessions abandoned" % self.abandoned if self.abandoned else "",
                ", %d replies differ from the primary's" % values[8] if fwd.comparison is not None else ""))
        return True


FWD_STATE = 1 + len(FORWARDER_COUNTERS)  # in a forwarder row's fields (after seq): pid, counters, state, since
FWD_SINCE = FWD_STATE + 1
FWD_BACKLOG = FWD_SINCE + 1
FWD_SESSION_END = FWD_BACKLOG + 1  # --primary: how the session ended (primary.ENDED_*), 0 while it goes on
FWD_REPLIES = FWD_SESSION_END + 1  # --primary: how often the primary's replies were passed on (see note_replies)
# A receiver row's fields (after seq).
RCV_PID, RCV_RECEIVED, RCV_PRIMARY_WRITTEN, RCV_PIPES_CLOSED, RCV_REFUSED, RCV_PIPE_BYTES = range(6)


class GroupRows:
    """One group's rows in the table, as its processes read each other's (see the module docstring)."""

    def __init__(self, table, slot, columns=()):
        self.table = table
        self.slot = slot
        self.columns = columns or range(table.dests)  # destination index -> its column in the table
        self.pid, self.counters, self.pipe_bytes = 0, (0, 0, 0), 0  # what our receiver row holds

    def write_receiver(self, pid, received, primary_written, pipes_closed):
        self.pid = pid
        self.counters = (received, primary_written, int(pipes_closed))
        self.table.receiver_row(self.slot).write(pid, *self.counters, 0, self.pipe_bytes)

    def write_pipe_bytes(self, pipe_bytes):
        """The bytes of the group's pipes, for other groups' growth (pipesizes.py)."""
        self.pipe_bytes = pipe_bytes
        self.table.receiver_row(self.slot).write(self.pid, *self.counters, 0, pipe_bytes)

    def write_refused(self, pid, why):
        """The receiver closed its source before serving it (stats.REFUSED_*): main counts it."""
        self.table.receiver_row(self.slot).write(pid, 0, 0, 0, why)

    def pipes_closed(self):
        """Whether the receiver closed the pipes on purpose (else a pipe's end is its death)."""
        return bool(self.table.receiver_row(self.slot).read()[RCV_PIPES_CLOSED])

    def primary_written(self):
        return self.table.receiver_row(self.slot).read()[RCV_PRIMARY_WRITTEN]

    def write_drops(self, index, dropped, records, cut=False):
        self.table.drops_row(self.slot, self.columns[index]).write(dropped, records, int(cut))

    def receiver_drops(self, index):
        """(bytes, records) the receiver dropped for destination index instead of waiting for it."""
        return tuple(self.table.drops_row(self.slot, self.columns[index]).read()[:2])

    def note_replies(self, count):
        """The primary's forwarder, at each reply it passes on: the one field written at once, out of
        the seqlock (a single aligned 8-byte store, read whole), for the receiver to mark turns."""
        FIELD.pack_into(self.table.buf, self.forwarder_row(0).offset + FIELD.size * (1 + FWD_REPLIES), count)

    def replies_passed(self):
        return FIELD.unpack_from(self.table.buf, self.forwarder_row(0).offset + FIELD.size * (1 + FWD_REPLIES))[0]

    def set_left(self, index):
        """Receiver: a reload removed destination index from the group; its pipe closes on purpose."""
        row = self.table.drops_row(self.slot, self.columns[index])
        values = list(row.read()[:3])
        row.write(*values, 1)

    def left(self, index):
        return bool(self.table.drops_row(self.slot, self.columns[index]).read()[3])

    def receiver_cut(self, index):
        """Whether the receiver cut a mirror's byte stream (it gets nothing more of the session)."""
        return bool(self.table.drops_row(self.slot, self.columns[index]).read()[2])

    def session_end(self):
        """--primary: how the primary's forwarder says the session ended (0: it goes on)."""
        return self.forwarder_row(0).read()[FWD_SESSION_END]

    def forwarder_row(self, index):
        return self.table.forwarder_row(self.slot, self.columns[index])


def since_of(values):
    """The float `since` of a forwarder row's fields (after seq)."""
    return struct.unpack("d", struct.pack("q", values[FWD_SINCE]))[0]


def state_text(state, since):
    name = STATE_NAMES.get(state, "?")
    if state in (STATE_UP, STATE_DOWN):
        return "%s since %s" % (name, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since)))
    return name


def human(count):
    """Bytes as a short figure: 0 B, 512 B, 1.5 KB, 12.3 MB, 4.0 GB."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return "%d B" % count if unit == "B" else "%.1f %s" % (value, unit)
        value /= 1000
