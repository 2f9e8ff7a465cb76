"""Main's side of --spare-groups (the groups' side is spares.py): the groups waiting for a source, a
source handed to one of them, their word that their source has ended, and the forks that keep
enough of them. A mixin of main's Proxy: the state is the Proxy's.

A group that waits is no source: it is not in `receivers`, holds no slot of the table, and its
death (however it dies) is logged and replaced, never counted as a source or a group kill. Main
forks spares at the start, then again once fewer than --spare-groups have waited for REFILL_S. A
source that finds none waiting waits in the listen queue a moment for one coming back while groups
turn over (wait_for_group), else it gets a group forked for it, as without spares; such a group
waits for the next source once its own ends, up to --spare-groups waiting (the others end).
"""
import dataclasses
import select
import time

from socketproxy_core import forking
from socketproxy_core import spares
from socketproxy_core import stats
from socketproxy_core.proxylog import log

GRACE_S = 0.005  # how long a source may wait in the listen queue for a group about to be free ...
TURNOVER_S = 0.1  # ... when one came back within this time, or when the sources of spare groups last
                  # less than this, typically (else a source gets a group forked for it at once)
REFILL_S = 1.0  # spares taken are forked again this often at most (Apache's idle maintenance)


@dataclasses.dataclass
class PoolGroup:
    """What main knows of one group of the pool."""

    pid: int
    control: object  # main's end of its control socket
    generation: int  # of the configuration it was forked with
    serving_since: float = None  # when it got its source; None while it waits


class Pool:
    """Main's spares (see the module docstring)."""

    def init_pool(self):
        self.pool = {}  # pid -> PoolGroup, waiting or serving, until main lets go of it
        self.pool_by_fd = {}  # its control socket's fd -> the same PoolGroup
        self.idle = []  # pids of the groups that wait for a source; the last one back is taken first
        self.unexpected = set()  # pids of waiting groups that ended on their own, not yet reaped
        self.generation = 0  # one more at every reload: groups of an older one serve no new source
        self.short_since = None  # since when fewer than --spare-groups groups have waited
        self.last_free_at = 0.0  # when a group last came back
        self.typical_source_s = None  # how long the sources of spare groups last (a moving average)
        self.grace_until = None  # the listener is not watched until then, or until a group comes back
        self.grace_over = False  # a grace ended with no group back: the next source gets one forked for it
        self.grace_failed_at = 0.0  # when the last grace ended with no group back

    def fork_group(self, first=None):
        """Fork a spare group; first: (source, peer, slot) for a group forked for that source."""
        main_end, group_end = spares.control_pair()
        keep = self.receiver_keeps(group_end.fileno(), *([first[0].fileno()] if first is not None else []))
        title = "socketproxy: receiver %s" % first[1] if first is not None else spares.SPARE_TITLE
        try:
            pid = forking.fork_child(title, spares.run_group, group_end, first, self.config, self.lifeline_r,
                                     self.table, self.dests_fd, (self.tls_context, self.tls_client), keep=keep,
                                     close=[self.listener])
        except OSError:
            main_end.close()
            raise
        finally:
            group_end.close()
        self.own_group(pid)
        main_end.setblocking(False)
        group = self.pool[pid] = self.pool_by_fd[main_end.fileno()] = PoolGroup(pid, main_end, self.generation)
        if first is not None:
            group.serving_since = time.monotonic()
        self.poller.register(main_end.fileno(), select.POLLIN)
        return pid

    def hand_to_spare(self, source, peer, slot):
        """The source to a waiting group: its pid, or None when none waits (or none could take it)."""
        while self.idle:
            pid = self.idle.pop()
            self.idle_changed()
            try:
                spares.send_with_fd(self.pool[pid].control, {"peer": peer, "slot": slot}, source.fileno())
            except OSError:  # it is ending (its control socket is closed, or full): the next one
                self.unexpected.add(pid)
                self.forget_group(pid)
                continue
            self.pool[pid].serving_since = time.monotonic()
            return pid
        return None

    def group_said(self, fd):
        """A spare group's word: its source has ended (it waits again, or ends if we have spares
        enough), or, at the end of its control socket, that it is ending."""
        group = self.pool_by_fd[fd]
        pid = group.pid
        try:
            said = group.control.recv(64)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        if said != spares.FREE:  # reap() collects it, and says how a waiting one ended
            if pid in self.idle:
                self.unexpected.add(pid)
            self.forget_group(pid)
            return
        self.last_free_at = time.monotonic()
        lasted = self.last_free_at - (group.serving_since or self.last_free_at)
        group.serving_since = None
        self.typical_source_s = lasted if self.typical_source_s is None else 0.8 * self.typical_source_s + 0.2 * lasted
        peer, slot = self.receivers.pop(pid), self.slots.pop(pid)
        self.count_refusal(peer, self.table.receiver_row(slot).read()[stats.RCV_REFUSED])
        self.table.fold(slot)  # every process of the group has published its last counters
        log.debug("receiver %d for %s ended; its group waits for another source", pid, peer)
        if group.generation == self.generation and len(self.idle) < self.config.spare_groups:
            self.idle.append(pid)
            self.idle_changed()
        else:
            self.forget_group(pid)  # the end of its control socket ends it
        self.fold_finished()

    def wait_for_group(self):
        """None waits: whether to leave the next source in the listen queue for GRACE_S rather than
        fork a group for it. Only while groups may turn over (one came back within TURNOVER_S, their
        sources typically last less than that, or none has ended yet), and once per group back since
        the last grace that saw none: short sources in a row are served by the groups of those
        before, and a storm of sources that stay has its groups forked at once after one grace."""
        if self.grace_over or self.idle or not self.config.spare_groups:
            self.grace_over = False
            return False
        typical = self.typical_source_s
        turning = typical is None or typical <= TURNOVER_S or time.monotonic() - self.last_free_at <= TURNOVER_S
        if not turning or self.last_free_at < self.grace_failed_at:
            return False
        self.grace_until = time.monotonic() + GRACE_S
        self.update_listener()
        return True

    def grace_timeout_s(self):
        return None if self.grace_until is None else max(0.0, self.grace_until - time.monotonic())

    def end_grace(self):
        """The listener is watched again once a group waits or the grace is over."""
        if self.grace_until is None:
            return
        over = time.monotonic() >= self.grace_until
        if self.idle or over:
            self.grace_until = None
            self.grace_over = over and not self.idle
            if self.grace_over:
                self.grace_failed_at = time.monotonic()
            self.update_listener()

    def forget_group(self, pid):
        """Main lets go of a spare group: closing its control socket ends it once it waits."""
        group = self.pool.pop(pid, None)
        if group is None:
            return
        self.poller.unregister(group.control.fileno())
        del self.pool_by_fd[group.control.fileno()]
        group.control.close()
        if pid in self.idle:
            self.idle.remove(pid)
            self.idle_changed()

    def spare_ended(self, pid, code, text):
        """reap(): a waiting group's receiver exited. One we let go exits 0; any other end is a fault
        of that group (its members are killed), replaced by the next refill."""
        waiting = pid in self.pool or pid in self.unexpected
        self.unexpected.discard(pid)
        self.forget_group(pid)
        if code != 0:
            self.kill_group(pid)
            log.warning("spare group %d ended: %s; its group is killed and another takes its place", pid, text)
        elif waiting:
            log.info("spare group %d ended: %s", pid, text)

    def retire_spares(self, stopping=False):
        """A reload: the waiting groups end (those serving end after their source), and new ones are
        forked with the new configuration. A stop: main lets go of every group (those serving are
        told to stop as every receiver is)."""
        self.generation += 1
        for pid in list(self.pool if stopping else self.idle):
            self.forget_group(pid)
        if not stopping:
            self.fill_spares()
        self.count()
        self.update_title()

    def refill_timeout_s(self):
        """How long main may sleep before spares are due (None: none are)."""
        if self.short_since is None:
            return None
        return max(0.0, self.short_since + REFILL_S - time.monotonic())

    def idle_changed(self):
        """Since when fewer than --spare-groups have waited without a break (None: enough wait)."""
        if len(self.idle) >= self.config.spare_groups:
            self.short_since = None
        elif self.short_since is None:
            self.short_since = time.monotonic()

    def refill(self):
        """Fork the spares missing once fewer than --spare-groups have waited for REFILL_S without a
        break (a group taken and back within that time is not missed: no fork, and none ends)."""
        self.idle_changed()  # --spare-groups may have changed with a reload
        if self.short_since is not None and time.monotonic() >= self.short_since + REFILL_S:
            self.fill_spares()

    def fill_spares(self):
        self.short_since = None
        while len(self.idle) < self.config.spare_groups:
            try:
                self.idle.append(self.fork_group())
            except OSError as exc:
                log.warning("cannot fork a spare group: %s", exc.strerror or exc)
                self.short_since = time.monotonic()
                break
        self.count()
        self.update_title()
