"""One receiver process per source: read the source, write every chunk to one pipe per forwarder.

The receiver leads its own process group, which holds its forwarders. It watches them (a pidfd each
in its poll set, psutil to collect their exit) and kills the whole group when one dies, so the
source sees its connection close and reconnects.
"""
import os
import select
import signal
import socket
import struct
import sys
import time

import psutil
import setproctitle

from socketproxy_core import endpoints
from socketproxy_core.admission import Admission
from socketproxy_core import forking
from socketproxy_core.fanout import FanOut, TurnState
from socketproxy_core.membership import Membership
from socketproxy_core.pipesizes import PipeSizes
from socketproxy_core.spare_receiver import SpareReceiver
from socketproxy_core import forwarding
from socketproxy_core import framing
from socketproxy_core import loop
from socketproxy_core import mirrors
from socketproxy_core import primary
from socketproxy_core import proxyproto
from socketproxy_core import tls
from socketproxy_core import proxylog
from socketproxy_core import zerocopy
from socketproxy_core import stats
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import PROGRESS_POLL_S, Progress, unsent_bytes
from socketproxy_core.zerocopy import PAGE, pipe_bytes, set_pipe_size

MAIN_EXIT_WAIT_S = 0.5  # after main's end of the lifeline closed: how long we wait for it to be gone
STOP_FLUSH_S = 1.0  # on SIGTERM or main's death: how long already-read data may take to go out
TICK_S = 5.0  # backstop only: pidfds report a forwarder's death at once
READING, HELD, STOPPING, ENDED, KILLING, DONE = "reading", "held", "stopping", "ended", "killing", "done"
KILL_WAIT_S = 2.0  # after SIGKILL to forwarders that did not finish: how long we wait to collect them
TITLE_PERIOD_S = 1.0  # the title and the shared counters are refreshed this often at most ...
IDLE_TITLE_PERIOD_S = TICK_S  # ... and this often once a refresh found nothing changed (an idle group sleeps)


class Receiver(Admission, FanOut, Membership, SpareReceiver):
    """Fans one source out to the forwarders of its group."""

    def __init__(self, source, peer, config, lifeline_fd, table=None, slot=None, dests_fd=None, tls_contexts=(None, None),
                 group=None):
        self.source = source
        self.group = group  # --spare-groups: the group (spares.Group) whose forwarders wait for our pipes
        self.reloaded = False  # a SIGHUP came: this group serves no other source (spares.py)
        self.stage_r = self.stage_w = None
        # main's TLS contexts: the sources' (--tls-cert; the handshake is ours, admit) and the tls://
        # destinations' (their forwarders' handshakes)
        self.tls_context, self.tls_client = tls_contexts
        self.tls_ended = False  # a TLS source sent its close_notify
        self.dests_fd = dests_fd  # main's list of destinations, read again at SIGHUP (membership.py)
        self.left = set()  # destination indices a reload removed from this group
        self.leaving = set()  # the pids of their forwarders: their exit does not end the group
        self.pid_of = {}  # destination index -> its forwarder's pid
        self.published = None
        self.title_period = TITLE_PERIOD_S
        self.checked_at = time.monotonic()  # when exited forwarders were last looked for without a pidfd's word
        self.peer = peer
        self.config = config
        self.lifeline_fd = lifeline_fd
        self.main_pid = os.getppid()
        self.pipes = {}  # write fd -> dest
        self.pipe_fds = []  # the same write fds, in destination order
        self.forwarders = {}  # pidfd -> (pid, dest)
        self.pending = {}  # write fd -> offset already written of the current chunk
        self.held_since = None  # when the source was last held back by a full pipe
        self.chunk_len = 0
        self.view = None  # a CHUNK buffer, only while a slow pipe needs it (see copy_rest)
        self.received = 0
        self.last_data = 0.0
        self.state = READING
        self.pipes_closing = False  # the pipes close once mirrors have finished their records (STOP_FLUSH_S)
        self.end_reason = "ended"
        self.loop = loop.Loop()
        # Our rows in the shared table, and what we publish there for our forwarders: set just
        # before the pipes are closed on purpose, so a forwarder can tell that end from the
        # receiver's death (which closes them too); per destination, the bytes and records dropped
        # here instead of waiting (--mirror-policy drop).
        if table is None:  # alone (in tests): a table of our own
            table, slot = stats.Table(1, len(config.dests)), 0
        self.table, self.slot = table, slot
        self.rows = stats.GroupRows(table, slot, config.columns)
        self.pipe_sizes = PipeSizes(config, table, self.rows)
        self.pipes_closed = False
        self.drops = [[0, 0] for _ in config.dests]
        self.droppable = set()  # the write fds of mirrors that must never hold the source
        self.mirror_tails = {}  # droppable write fd -> the rest of a write it took only part of
        self.cut_mirrors = set()  # droppable write fds whose byte stream was cut: they get nothing more
        self.skipping_turn = set()  # droppable write fds of mirrors dropping the current turn whole
        self.dest_index = {}  # write fd -> destination index
        # --framing resp: the source is read through a scanner, and only whole commands go on.
        # So is a line-framed source in --primary mode with --mirror-policy drop: a mirror's drops are
        # whole writes, which are whole records only when we write whole records.
        drop = config.primary and config.mirror_policy == "drop" and len(config.dests) > 1
        self.commands = framing.scanner(config.framing) if config.framing == "resp" or (
            drop and config.framing == "line") else None
        self.partial = bytearray()  # the start of a command not yet whole
        self.resp_buffer = None
        # --primary: requests go through the primary's pipe until its forwarder has connected and
        # handed us the socket, then (once that pipe is empty, for order) straight into the socket.
        self.requests_link = primary.RequestsLink() if config.primary else None
        self.primary_fd = None
        self.handed_fd = None  # the primary's socket, handed over but not yet written to
        self.primary_written = 0  # bytes written into it (published with our counters)
        self.primary_progress = Progress(config.send_timeout)  # while requests wait for it
        # --primary: mirrors send in batches; each has an eventfd we poke when its pipe fills faster
        # (see mirrors.MIRROR_BATCH_S): write fd -> [eventfd, pipe slots used since the last poke,
        # the slots that call for a poke].
        self.pokes = {}
        self.turns = {}  # a mirror's write fd -> its fanout.TurnState (mirrors.Turns)
        self.replies_seen = 0  # the primary's replies counter when the current turn began

    def start(self):
        """Own process group, wake-up pipe for signals, forwarders."""
        if self.group is None:  # (a spare group's is its own already)
            try:
                os.setpgid(0, 0)
            except OSError:
                pass  # main already made us a group leader
        proxylog.set_connection("src=%s" % self.peer)
        # A TLS source is read through its TLS object, as a plain socket would be (tls.recv_into).
        self.recv_into = tls.recv_into(self.source) if self.tls_context is not None else self.source.recv_into
        # --send-proxy: the header every destination connection begins with, naming the source (the
        # real one a balancer named) and the address it connected to.
        self.proxy_header = b""
        if self.config.send_proxy:
            try:
                self.proxy_header = proxyproto.header(self.config.send_proxy, self.real_source, self.source.getsockname())
            except OSError:
                pass  # the source is gone already: its group ends at its first read
        self.source.setblocking(False)
        self.source_fd = self.source.fileno()
        # The staging pipe the source is spliced into (non-blocking, as large as a forwarder's).
        self.stage_r, self.stage_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe_sizes.source_fd = self.source_fd
        self.pipe_sizes.add(self.stage_w, set_pipe_size(self.stage_w, self.config.pipe_size), stage=True)
        if self.group is not None:  # a spare group's: its handlers and wake-up pipe serve every source
            wake_r = self.wake_fd = self.group.wake_r
        else:
            wake_r, wake_w = zerocopy.small_pipe()
            self.wake_fd = wake_r
            signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)  # the wake-up pipe tells the loop
            signal.signal(signal.SIGHUP, lambda *_: None)  # main's word that the destinations changed
        # --primary --framing resp: the primary's forwarder copies its replies to each mirror, which
        # compares them with its shadow's (mirrors.ReplyComparison): a pipe per mirror.
        self.evidence = {}
        if self.config.primary and self.config.framing == "resp":
            self.evidence = {index: os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for index in range(1, len(self.config.dests))}
            for _, evidence_w in self.evidence.values():  # a slot per reply: as many as a forwarder's pipe
                set_pipe_size(evidence_w, self.config.pipe_size)
        for index, dest in enumerate(self.config.dests):
            if self.group is not None:
                self.hand_pipe(index, dest)
            else:
                self.spawn_forwarder(index, dest)
        for evidence_r, evidence_w in self.evidence.values():
            os.close(evidence_r)
            os.close(evidence_w)
        if self.config.primary:
            # The primary's pipe last: it gets the chunk by splice (the others by tee), and never a drop.
            self.pipe_fds.append(self.pipe_fds.pop(0))
            if self.config.mirror_policy == "drop":
                self.droppable = set(self.pipe_fds[:-1])
            self.requests_link.forwarder_end.close()
            self.loop.watch(self.requests_link.receiver_end, select.POLLIN, self.take_primary)
        self.loop.watch(self.source, select.POLLIN, self.source_ready)
        self.loop.watch(self.lifeline_fd, select.POLLIN, self.main_going)
        self.loop.watch(wake_r, select.POLLIN, self.signalled)
        log.info("accepted; forwarders: %s", ", ".join(
            "%d -> %s" % (pid, dest) for pid, dest in self.forwarders.values()))

    def spawn_forwarder(self, index, dest, joined=False):
        """Fork one forwarder fed by a new pipe; the receiver keeps the write end only."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        size = set_pipe_size(write_fd, self.pipe_sizes.size_for_new())
        is_primary = self.config.primary and index == 0
        title = "socketproxy: forwarder %s -> %s%s" % (self.peer, dest, " (primary)" if is_primary else "")
        # A forwarder must not hold the source (else killing us would not close it) nor any
        # sibling's write end (else that pipe would never read EOF): it keeps its read end only.
        # The primary's keeps the source too, to send it the replies (the group dies together).
        keep = [read_fd, self.source.fileno(), self.requests_link.forwarder_end.fileno()] if is_primary else [read_fd]
        poke_fd = marks = None
        if is_primary:
            evidence = [evidence_w for _, evidence_w in self.evidence.values()]
            keep += evidence
        else:
            evidence = self.evidence[index][0] if index in self.evidence else None
            keep += [evidence] if evidence is not None else []
        if self.config.primary and not is_primary and self.config.framing == "none":
            # A mirror of a byte stream sends turn by turn (mirrors.Turns): where turns begin is in
            # memory it shares with us, and it does not batch.
            marks = mirrors.TurnMarks()
        elif self.config.primary and not is_primary and size >= mirrors.MIRROR_BATCH_MIN_PIPE:
            poke_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            keep.append(poke_fd)
        try:
            pid = forking.fork_child(title, self.run_forwarder, read_fd, index, dest, title, os.getpid(), poke_fd,
                                     marks, evidence, joined, keep=keep, close=[] if is_primary else [self.source])
        except OSError:
            for fd in (read_fd, write_fd):
                os.close(fd)
            if poke_fd is not None:
                os.close(poke_fd)
            raise
        if poke_fd is not None:
            self.pokes[write_fd] = [poke_fd, 0, size // PAGE // mirrors.MIRROR_POKE_SHARE]
        if marks is not None:
            self.turns[write_fd] = TurnState(marks)
        os.close(read_fd)
        self.add_pipe(index, dest, write_fd, size, pid, os.pidfd_open(pid))

    def add_pipe(self, index, dest, write_fd, size, pid, pidfd):
        """A forwarder's pipe is ours to write, and its pidfd ours to watch."""
        self.pipe_sizes.add(write_fd, size, 2 if endpoints.retains(endpoints.for_destination(self.config, dest)) else 1)
        self.pid_of[index] = pid
        self.dest_index[write_fd] = index
        os.set_blocking(write_fd, False)
        self.pipes[write_fd] = dest
        self.pipe_fds.append(write_fd)
        self.forwarders[pidfd] = (pid, dest)
        self.loop.watch(pidfd, select.POLLIN, self.check_forwarders)

    def run_forwarder(self, read_fd, index, dest, title, receiver_pid, poke_fd, marks, evidence, joined):
        counters = forwarding.serving(self.peer, dest, title, self.rows, index)
        source = self.source if self.config.primary and index == 0 else None
        config = endpoints.for_destination(self.config, dest)  # --config's settings for this destination
        tls_context = tls.context_for(self.tls_client, config) if dest.tls else None
        return forwarding.run_forwarder(read_fd, dest, config, receiver_pid, self.rows, index, counters, source,
                                       self.requests_link if source else None, poke_fd, marks, evidence, joined,
                                       self.proxy_header, tls_context)

    def publish(self):
        """Our counters to the shared table, and a title with our forwarders' states: on a timer,
        every second (every IDLE_TITLE_PERIOD_S once nothing changed), and only when something changed."""
        self.loop.set_timer("publish", self.title_period, self.publish)
        self.pipe_sizes.shrink_if_idle()
        now = time.monotonic()
        if now - self.checked_at >= TICK_S:  # a backstop only: pidfds report a forwarder's death at once
            self.checked_at = now
            self.check_forwarders()
        states = []
        for index, dest in enumerate(self.config.dests):
            if index in self.left:
                continue  # a reload removed it
            values = self.rows.forwarder_row(index).read()
            states.append("%s %s" % (dest, stats.state_text(values[stats.FWD_STATE], stats.since_of(values))))
        current = (self.received, self.primary_written, tuple(states))
        if current == self.published:
            self.title_period = IDLE_TITLE_PERIOD_S
            self.loop.set_timer("publish", self.title_period, self.publish)
            return
        self.title_period = TITLE_PERIOD_S
        self.published = current
        self.write_row()
        setproctitle.setproctitle("socketproxy: receiver %s | received %s%s" % (
            self.peer, stats.human(self.received), "; " + ", ".join(states) if states else ""))

    def write_row(self):
        self.rows.write_receiver(os.getpid(), self.received, self.primary_written, self.pipes_closed)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self):
        """Copy the source to every pipe until the source ends or we are told to stop.

        One loop (loop.Loop), in one of these states: READING (the source is watched), HELD (a pipe
        took only part of a chunk: the source waits for it; --send-timeout later a stopped forwarder
        counts as dead), STOPPING (told to stop: what was read goes out within STOP_FLUSH_S, then the
        forwarders still running are killed), ENDED (the source has ended and the pipes are closed:
        the forwarders flush and exit). The loop ends once every forwarder has.
        """
        self.last_data = time.monotonic()
        self.publish()
        if self.config.idle_timeout:
            self.loop.set_timer("idle", self.config.idle_timeout, self.idle_check)
        while self.forwarders and self.state != DONE:
            self.loop.run_once()
        self.publish()
        log.info("group ended: %s; received %d bytes from source", self.end_reason, self.received)
        return 0

    def source_ready(self, _event):
        if self.commands:
            self.read_commands()
        elif self.tls_context is not None:
            self.read_decrypted()
        else:
            self.read_source()

    def signalled(self, _event):
        received = set(os.read(self.wake_fd, 64))
        if signal.SIGHUP in received:
            self.reloaded = True
            self.reconcile()
            if not received & {signal.SIGTERM, signal.SIGINT}:
                return
        ended = {primary.ENDED_CLOSE: "the primary closed the session",
                 primary.ENDED_RESET: "the primary reset the session"}
        self.stop(ended.get(self.rows.session_end(), "told to stop"))

    def main_going(self, _event):
        """Main's end of the lifeline closes while main is still exiting, before its listener is
        closed for good: a source we closed now could reconnect (through a load balancer) to the
        dying port. We stop once main has gone entirely (MAIN_EXIT_WAIT_S at most)."""
        self.loop.unwatch(self.lifeline_fd)
        try:
            main_fd = os.pidfd_open(self.main_pid)
        except OSError:  # already gone
            self.stop("main process gone")
            return

        def main_gone(_event=None):
            self.loop.unwatch(main_fd)
            self.loop.cancel("main exit")
            os.close(main_fd)
            self.stop("main process gone")

        self.loop.watch(main_fd, select.POLLIN, main_gone)
        self.loop.set_timer("main exit", MAIN_EXIT_WAIT_S, main_gone)

    def idle_check(self):
        """--idle-timeout: a source that sent nothing this long is closed (not while it is held)."""
        if self.state != READING:
            if self.state == HELD:
                self.loop.set_timer("idle", self.config.idle_timeout, self.idle_check)
            return
        idle_left = self.config.idle_timeout - (time.monotonic() - self.last_data)
        if idle_left > 0:
            self.loop.set_timer("idle", idle_left, self.idle_check)
            return
        log.info("closing source: nothing received for %.1f s (idle timeout)", self.config.idle_timeout)
        self.source.shutdown(socket.SHUT_RDWR)
        self.end_source("idle timeout")

    def hold(self):
        """HELD: a pipe took only part of the chunk: read no more until every pipe has taken it."""
        if self.state != READING:
            return
        self.loop.unwatch(self.source_fd)
        self.state = HELD
        self.held_since = time.monotonic()
        self.loop.set_timer("held", self.config.send_timeout, self.held_too_long)
        if self.primary_fd is not None and self.primary_fd in self.pending:
            self.check_primary()

    def held_too_long(self):
        if self.state == HELD or self.pending:
            self.check_stopped_forwarders()
            self.loop.set_timer("held", self.config.send_timeout, self.held_too_long)

    def check_primary(self):
        """--primary, after the handover: requests wait for the primary's socket; the send-timeout
        rule (sockets.Progress) applies to it as to any destination."""
        if self.primary_fd not in self.pending:
            self.primary_progress.stop()
            return
        if self.primary_progress.stalled(self.primary_written - unsent_bytes(self.primary_fd)):
            self.primary_stalled()
            return
        self.loop.set_timer("primary", self.primary_progress.check_in(PROGRESS_POLL_S), self.check_primary)

    def take_primary(self, _event):
        """--primary: its forwarder has connected (or given up) and handed us its socket."""
        link = self.requests_link
        self.loop.unwatch(link.receiver_end)
        fd = link.take()
        if fd is None:
            return  # not reached: its forwarder resets the source and ends the group
        if self.pipes_closed:  # the pipes are closed already (the source has finished): nothing to write
            os.close(fd)
            return
        self.handed_fd = fd
        self.pipes[fd] = self.config.dests[0]  # closed with the pipes
        self.dest_index[fd] = 0

    def write_to_primary(self):
        """Between two chunks: once the primary's pipe is empty (its forwarder has sent on all we
        wrote there), the next chunks go straight into the primary's socket."""
        if self.handed_fd is not None and not self.pending and self.pipe_fds and not pipe_bytes(
                self.pipe_fds[-1]):
            self.pipe_fds[-1] = self.primary_fd = self.handed_fd
            self.handed_fd = None
            log.debug("requests go straight into the primary's socket from now on")

    def primary_stalled(self):
        """--primary, after the handover: the primary took none of the requests waiting for it for
        --send-timeout (the send-timeout rule, as for any destination). The session ends with a
        reset: what was waiting for it is dropped, and both ends see the end."""
        log.warning("the primary %s took no data for %.1f s while requests waited (send timeout): resetting the "
                    "source; its group ends", self.config.dests[0], self.config.send_timeout)
        fd = self.primary_fd
        self.lost(fd, self.chunk_len - self.pending.pop(fd))
        self.loop.unwatch(fd)
        with socket.socket(fileno=os.dup(fd)) as primary_sock:  # the forwarder's session sees the end
            primary_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                primary_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.source.fileno() >= 0:
            self.source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stop("the primary stalled")


    def after_chunk(self):
        """Every pipe has the chunk: read on, or, when stopping, close the pipes."""
        self.held_since = None
        self.loop.cancel("held", "primary")
        self.primary_progress.stop()
        self.view = None  # give the copy buffer back: a thousand slow sources must not keep 1 GiB
        if self.state in (READING, HELD) and self.source.fileno() >= 0:
            self.state = READING
            self.loop.watch(self.source, select.POLLIN, self.source_ready)
            self.read_pending_tls()
        else:
            self.close_pipes()

    def end_source(self, reason):
        """The source is done: close the pipes, so every forwarder flushes and exits."""
        self.end_reason = reason
        self.loop.unwatch(self.source_fd)
        if self.tls_context is not None and self.source.fileno() >= 0:
            tls.close_notify(self.source)  # a TLS source's end is answered with ours, as TLS asks
        self.source.close()
        if self.state in (READING, HELD):
            self.state = ENDED
        self.close_pipes()

    def stop(self, reason):
        """Stop reading; what was read goes out within STOP_FLUSH_S, then the group ends."""
        if self.state in (STOPPING, KILLING, DONE):
            return
        log.info("stopping: %s", reason)
        self.end_reason = reason
        self.state = STOPPING
        self.loop.set_timer("stop", STOP_FLUSH_S, self.stop_timed_out)
        if self.source.fileno() >= 0:
            if not self.pending:
                self.loop.unwatch(self.source_fd)
                self.close_pipes()
            self.source.close()

    def stop_timed_out(self):
        self.kill_forwarders("they did not finish within %.1f s" % STOP_FLUSH_S)

    def close_pipes(self):
        """End every forwarder's pipe (each then flushes and exits). Mirrors that took only part of a
        record get the rest first, for at most STOP_FLUSH_S: the loop goes on meanwhile."""
        if self.mirror_tails:
            if not self.pipes_closing:
                self.pipes_closing = True
                self.loop.set_timer("closing", STOP_FLUSH_S, self.close_pipes)
                return
            if self.loop.has_timer("closing"):
                return
            self.drop_mirror_tails()
        self.pipes_closing = False
        self.loop.cancel("closing")
        self.pipes_closed = True
        self.write_row()
        for fd in self.pipes:
            self.loop.unwatch(fd)
            self.pipe_sizes.remove(fd)
            os.close(fd)
        self.pipes.clear()
        self.pipe_fds = []

    # -- the forwarders ---------------------------------------------------------------------------

    def forwarder_procs(self):
        """psutil handles on the forwarders, made when needed (they are our children: no pid reuse)."""
        procs = []
        for pidfd, (pid, dest) in self.forwarders.items():
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            proc.pidfd, proc.dest = pidfd, dest
            procs.append(proc)
        return procs

    def check_forwarders(self, _event=None):
        """Collect exited forwarders; one that died before its pipe closed takes the group down."""
        gone, _ = psutil.wait_procs(self.forwarder_procs(), timeout=0)
        for proc in gone:
            self.loop.unwatch(proc.pidfd)
            if self.group is not None and self.group.owns(proc.pidfd):
                self.group.ended_member = True  # its pidfd is the group's
            else:
                os.close(proc.pidfd)
            del self.forwarders[proc.pidfd]
            if proc.returncode == 0 and (not self.pipes or proc.pid in self.leaving) or self.state == KILLING:
                continue  # finished after its pipe closed, as it should (or killed by us)
            how = ("killed by %s" % signal.Signals(-proc.returncode).name if proc.returncode < 0
                   else "exit status %d" % proc.returncode)
            log.error("group ended: forwarder %d to %s died (%s); received %d bytes from source",
                      proc.pid, proc.dest, how, self.received)
            self.kill_group()

    def check_stopped_forwarders(self):
        """The source has been held back for --send-timeout: a stopped forwarder counts as dead.

        A forwarder that runs deals with a stuck destination itself (it drops after --send-timeout);
        one that is stopped (SIGSTOP, a debugger) never will, and would hold the source and every
        other destination for as long as it stays stopped.
        """
        for proc in self.forwarder_procs():
            try:
                status = proc.status()
            except psutil.NoSuchProcess:
                continue
            if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                log.error("group ended: forwarder %d to %s is stopped and has held the source for %.1f s;"
                          " received %d bytes from source", proc.pid, proc.dest, self.config.send_timeout,
                          self.received)
                self.kill_group()

    def kill_forwarders(self, reason):
        """End the forwarders still running (SIGKILL); the loop collects them (KILL_WAIT_S at most)."""
        log.warning("killing %d forwarders: %s", len(self.forwarders), reason)
        for proc in self.forwarder_procs():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.state = KILLING  # the loop collects them as their pidfds say they are gone
        self.loop.set_timer("killing", KILL_WAIT_S, self.done)

    def done(self):
        self.state = DONE

    def kill_group(self):
        """SIGKILL the whole process group, this process included: fate sharing."""
        sys.stderr.flush()
        os.killpg(0, signal.SIGKILL)


def run_receiver(source, peer, config, lifeline_fd, table=None, slot=None, dests_fd=None, tls_contexts=(None, None)):
    """Body of the receiver process (see forking.fork_child)."""
    receiver = Receiver(source, peer, config, lifeline_fd, table, slot, dests_fd, tls_contexts)
    if not receiver.admit():
        return 0
    try:
        receiver.start()
    except OSError as exc:
        log.error("group ended: cannot start its forwarders: %s", exc.strerror or exc)
        receiver.kill_group()
    return receiver.run()
