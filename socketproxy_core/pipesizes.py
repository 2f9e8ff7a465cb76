"""Pipes that follow demand, within an unprivileged user's pipe budget (fs.pipe-user-pages-soft).

Main plans a small base size (zerocopy.plan_pipe_size) so that --max-connections sources fit a
quarter of the budget's share. A group whose source fills its staging pipe at a read, or has more
to read after it, is busy: its pipes double (F_SETPIPE_SZ), up to PIPE_SIZE_MAX, as long as every group's pipes (each receiver
publishes its total in its row of the shared table) plus base-size pipes for every slot not in use
stay within the share: a new source always gets its pipes. A group idle for SHRINK_AFTER_S gives
its pipes back down to the base size (an empty pipe can shrink; one holding data waits).

A retaining forwarder's shadow pipe follows the size of its input pipe (retaining.Retainer), so such
a pipe counts twice here. Root is not under a budget: its pipes have PIPE_SIZE_MAX from the start.
"""
import dataclasses
import fcntl
import time

from socketproxy_core import endpoints
from socketproxy_core import zerocopy
from socketproxy_core.proxylog import log
from socketproxy_core.zerocopy import F_GETPIPE_SZ, F_SETPIPE_SZ, PAGE, PIPE_SIZE_MAX, pipe_bytes

SHRINK_AFTER_S = 10.0
DENIED_S = 1.0  # after a refused growth, the next try waits this long (it reads every group's row)


class PipeSizes:
    """One receiver's pipes and their sizes; read_size() after each read of the source, shrink_if_idle()
    on a timer."""

    def __init__(self, config, table, rows):
        self.base = config.pipe_size
        self.share = config.pipe_share  # bytes of pipes the whole tree may hold; 0 = no budget
        self.per_source = config.pipes_per_source
        self.slots = config.max_connections
        self.table, self.rows = table, rows
        self.weight = {}  # write fd -> pipes it stands for (2: a retaining forwarder's, its shadow follows)
        self.capacity = {}  # write fd -> its size now
        self.stage_fd = None
        self.source_fd = None  # its unread bytes after a read say the source has more than the pipe took
        self.denied_until = 0.0  # growth was refused (the share, or the kernel): not asked again before then
        self.busy_at = 0.0

    def add(self, fd, capacity, weight=1, stage=False):
        self.capacity[fd] = capacity
        self.weight[fd] = weight
        if stage:
            self.stage_fd = fd
        self.publish()

    def remove(self, fd):
        self.capacity.pop(fd, None)
        self.weight.pop(fd, None)
        self.publish()

    def publish(self):
        if self.share:
            self.rows.write_pipe_bytes(self.total())

    def total(self):
        """The bytes our pipes hold in the budget (published in our row)."""
        return sum(size * self.weight[fd] for fd, size in self.capacity.items())

    def size_for_new(self):
        """A pipe added to the group (a destination a reload added) starts at the group's size."""
        return max(self.capacity.values(), default=self.base)

    def read_size(self, moved):
        """A read of the source moved this much into memory or the staging pipe: a read that filled the
        staging pipe, or left the source with more to read, grows the group's pipes where the budget
        allows."""
        if not self.share:
            return
        if moved < self.capacity.get(self.stage_fd, self.base) and not (
                moved >= PAGE and self.source_fd is not None and pipe_bytes(self.source_fd)):
            return  # (a read under a page is a message, not a stream: no ioctl for it)
        now = time.monotonic()
        self.busy_at = now
        if now < self.denied_until:
            return
        top = max(self.capacity.values())
        target = min(top * 2, PIPE_SIZE_MAX) if all(size == top for size in self.capacity.values()) else top
        growing = {fd: min(size * 2, target) for fd, size in self.capacity.items() if size < target}
        if not growing:
            return
        # The check and the growth as one step among the receivers: two busy groups must not both
        # take the last of the share. A POSIX lock (lockf): every receiver inherited the table's one
        # open file description, which a flock would share among them all.
        fcntl.lockf(self.table.fd, fcntl.LOCK_EX)
        try:
            extra = sum((size - self.capacity[fd]) * self.weight[fd] for fd, size in growing.items())
            in_use, groups = self.table.pipe_bytes_in_use()
            reserve = max(0, self.slots - groups) * self.per_source * self.base
            if in_use + extra + reserve > self.share:
                self.denied_until = now + DENIED_S
                return
            for fd in sorted(growing, key=lambda fd: fd == self.stage_fd):  # the staging pipe last
                if not self.resize(fd, growing[fd]):
                    self.denied_until = now + DENIED_S
                    break
            self.publish()
        finally:
            fcntl.lockf(self.table.fd, fcntl.LOCK_UN)

    def shrink_if_idle(self):
        """Back to the base size once the source has not been busy for SHRINK_AFTER_S."""
        if not self.share or time.monotonic() - self.busy_at < SHRINK_AFTER_S:
            return
        shrunk = False
        for fd, size in list(self.capacity.items()):
            if size > self.base and not pipe_bytes(fd):
                shrunk |= self.resize(fd, self.base)
        if shrunk:
            self.denied_until = 0.0
            self.publish()

    def resize(self, fd, size):
        """Whether the pipe has the new size (the kernel may refuse: the user's budget is spent)."""
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except OSError as exc:
            log.debug("pipe not resized to %d KiB: %s", size // 1024, exc.strerror)
            return False
        self.capacity[fd] = fcntl.fcntl(fd, F_GETPIPE_SZ)
        return True


def plan_pipes(config, quiet=False):
    """The config with a pipe size that fits --max-connections sources in the user's pipe budget:
    a quarter of it at the start, busy groups growing into the rest (pipesizes.py); with --primary,
    whose mirrors pace themselves by their pipes' size, all of it, fixed."""
    budget = zerocopy.pipe_budget()
    # A staging pipe, one pipe per forwarder, and, retaining, a shadow pipe per forwarder.
    pipes = 1 + sum(2 if endpoints.retains(endpoints.for_destination(config, dest)) else 1 for dest in config.dests)
    growing = budget is not None and not config.primary
    size = zerocopy.plan_pipe_size(config.max_connections * (4 if growing else 1), pipes, budget)
    if budget is not None and not quiet:
        log.info("pipes of %d KiB%s: %d sources x %d pipes fit in %d%% of this user's pipe budget of %d MiB "
                 "(fs.pipe-user-pages-soft)", size // 1024, ", growing while busy" if growing else "",
                 config.max_connections, pipes, zerocopy.PIPE_BUDGET_SHARE * 100, budget >> 20)
    share = int(budget * zerocopy.PIPE_BUDGET_SHARE) if growing else 0
    return dataclasses.replace(config, pipe_size=size, pipe_share=share, pipes_per_source=pipes)
