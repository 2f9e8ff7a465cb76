"""Destinations that join and leave live groups at a reload.

Main writes the destinations of its configuration into a memfd every group inherits (write_list), and
after a reload that changed them sends SIGHUP to every receiver, which compares the list with its own
forwarders (Membership.reconcile):

- a destination added is joined: the receiver forks a forwarder for it and writes every later chunk
  to its pipe too; with --framing line it skips to the end of the line in progress, so it gets the
  stream from the next whole line on. Only a stream without session state is joined in the middle:
  with --primary, --framing resp (AUTH, SELECT ...) or --session-preamble a destination added gets
  the next sources, not the live ones.
- a destination removed is left: its pipe is closed on purpose (flagged in its drops row first, so
  its forwarder does not take the end for the receiver's death); the forwarder delivers what it holds
  within --send-timeout, says what it dropped, and exits 0 without ending the group. The primary of
  --primary is the session: it is never left.

A destination keeps its column of the shared table, so a removed destination's counters of this
group stay in its row and are folded at the group's end; one added again while its old forwarder
still runs in a group, or after it ran there, joins only the next sources (its row is taken).

A mixin of receiver.Receiver.
"""
import dataclasses
import json
import os

from socketproxy_core import endpoints
from socketproxy_core.proxylog import log


def write_list(fd, config):
    """Main: the configuration's destinations and their columns into the memfd (before any SIGHUP)."""
    data = json.dumps([{"text": str(dest), "options": list(dest.options), "column": column}
                       for dest, column in zip(config.dests, config.columns)]).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def read_list(fd):
    """Receiver: [(Dest, column)] from the memfd; None when it cannot be read whole (a reload is being
    written: the next SIGHUP brings it)."""
    try:
        size = os.fstat(fd).st_size
        items = json.loads(os.pread(fd, size, 0))
        return [(endpoints.with_options(endpoints.parse_dest(item["text"]),
                                        tuple(tuple(pair) for pair in item["options"])), item["column"])
                for item in items]
    except (OSError, ValueError, KeyError, endpoints.UsageError) as exc:
        log.warning("cannot read the reloaded destinations: %s", exc)
        return None


class Membership:
    """The receiver's side (see the module docstring)."""

    def reconcile(self):
        listed = read_list(self.dests_fd) if self.dests_fd is not None else None
        if listed is None or self.pipes_closed:
            return
        config = self.config
        current = {column: index for index, column in enumerate(config.columns) if index not in self.left}
        wanted = {column for _, column in listed}
        for column, index in current.items():
            if column not in wanted:
                self.leave(index)
        can_join = not (config.primary or config.framing == "resp" or config.session_preamble)
        for dest, column in listed:
            if column in current:
                continue
            if not can_join:
                log.info("destination %s added by a reload: it gets the next sources (this one's stream has a "
                         "session: %s)", dest, "--primary" if config.primary else
                         "--framing resp" if config.framing == "resp" else "--session-preamble")
            elif column in config.columns:
                log.info("destination %s added by a reload: it was left by this source's group, whose counters "
                         "for it are kept; it gets the next sources", dest)
            else:
                try:
                    self.join(dest, column)
                except OSError as exc:  # no pipe or process left (the pipe budget, the unit's TasksMax)
                    log.warning("destination %s added by a reload: cannot fork its forwarder here (%s); it gets "
                                "the next sources", dest, exc.strerror or exc)

    def join(self, dest, column):
        index = len(self.config.dests)
        self.config = dataclasses.replace(self.config, dests=self.config.dests + (dest,),
                                          columns=self.config.columns + (column,))
        self.rows.columns = self.config.columns
        self.drops.append([0, 0])
        self.spawn_forwarder(index, dest, joined=True)
        pid = self.pid_of[index]
        log.info("destination %s added by a reload: forwarder %d joins the stream%s", dest, pid,
                 " from the next whole line" if self.config.framing == "line" else "")

    def leave(self, index):
        """Close a removed destination's pipe on purpose; its forwarder finishes and exits 0."""
        if self.config.primary and index == 0:
            log.info("the primary %s was removed by a reload: this source's session keeps it",
                     self.config.dests[0])
            return
        fd = next((fd for fd, dest_index in self.dest_index.items() if dest_index == index), None)
        self.left.add(index)
        if fd is None or fd not in self.pipes:
            return
        self.rows.set_left(index)  # before the pipe's end: its forwarder reads it there
        self.pending.pop(fd, None)
        self.mirror_tails.pop(fd, None)
        self.loop.unwatch(fd)
        self.pipe_fds.remove(fd)
        for table in (self.pipes, self.pokes, self.turns):
            table.pop(fd, None)
        self.droppable.discard(fd)
        self.pipe_sizes.remove(fd)
        os.close(fd)
        self.leaving.add(self.pid_of[index])
        log.info("destination %s removed by a reload: its forwarder delivers what it holds and ends",
                 self.config.dests[index])
        if not self.pending and self.state == "held":
            self.after_chunk()
