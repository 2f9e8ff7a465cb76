"""Spare groups (--spare-groups): a receiver and its forwarders forked before their source, and kept
for the next source once theirs ended cleanly, as Apache's prefork keeps spare servers.

What runs in such a group is what runs in a group forked for its source (a receiver.Receiver and a
forwarding.Forwarder per destination, made afresh for every source); only the start and the end
differ:

- main hands a source to a waiting group through the group's control socket (SCM_RIGHTS), with its
  slot in the shared table; the receiver admits it, then hands each forwarder its new pipe the same
  way, and a forwarder connects only then (nothing of a refused source reaches a destination).
- a forwarder whose pipe ended cleanly says DONE instead of exiting; a receiver whose source ended
  (closed, reset, idle) and all of whose forwarders said DONE says FREE to main, and waits again.
- anything else ends the group as a group forked for its source ends: a member's death kills the
  whole group (fate sharing); a stop, a reload, a forwarder that exited, or MAX_SOURCES_PER_GROUP
  sources end it once its source is done.

While it waits, a group holds no connection and no pipe of the budget, and its titles say "spare".
"""
import json
import os
import select
import signal
import socket

import setproctitle

from socketproxy_core import endpoints
from socketproxy_core import forking
from socketproxy_core import forwarding
from socketproxy_core import proxylog
from socketproxy_core import receiver as receiver_module
from socketproxy_core import stats
from socketproxy_core import tls
from socketproxy_core import zerocopy
from socketproxy_core.loop import Loop, Poller
from socketproxy_core.proxylog import log

MAX_SOURCES_PER_GROUP = 1000  # then the group ends and main forks another (Apache's MaxConnectionsPerChild)
FREE = b"free"  # receiver -> main: the source has ended and every forwarder is done
DONE = b"done"  # forwarder -> receiver: the pipe ended, the destination's connection is closed
MESSAGE_MAX = 8192
PEER_MAX = 1024  # characters of a source's name (a TLS client's subject may be long) a message carries
SPARE_TITLE = "socketproxy: receiver (spare)"


def control_pair():
    """A control socket: messages keep their bounds, and neither end survives an exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send_with_fd(sock, fields, fd):
    socket.send_fds(sock, [json.dumps(fields).encode()], [fd])


def receive_with_fd(sock):
    """(fields, fd) of the next message; None when the other end has closed (or sent no descriptor)."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, MESSAGE_MAX, 1)
    except OSError:
        return None
    if not data or not fds or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), fds[0]


class Waiting:
    """One wait of a spare's loop: until one of its descriptors says something (see wait)."""

    def __init__(self):
        self.loop = Loop()
        self.outcome = None

    def on(self, fd, handler):
        self.loop.watch(fd, select.POLLIN, lambda _event: self.settle(handler))

    def settle(self, handler):
        if self.outcome is not None:
            return  # the first outcome of a batch stands; what else came waits (a source stays queued)
        self.outcome = handler()

    def wait(self):
        while self.outcome is None:
            self.loop.run_once()
        return self.outcome


class Group:
    """A receiver's side: its forwarders, forked once, each with its control socket and pidfd."""

    def __init__(self, control, config, lifeline_fd, table, dests_fd, tls_contexts):
        self.control = control  # to main
        self.config = config
        self.lifeline_fd = lifeline_fd
        self.table, self.dests_fd, self.tls_contexts = table, dests_fd, tls_contexts
        self.members = []  # per destination index: (pid, pidfd, control socket)
        self.ended_member = False  # a forwarder exited (however cleanly): this group serves no other source
        self.wake_r = None
        self.pending = set()  # signals that came while we waited: they concern the next source

    def start(self):
        """Our own process group, the signals every source of ours sees alike, one forwarder per destination."""
        try:
            os.setpgid(0, 0)
        except OSError:
            pass  # main already made us a group leader
        self.wake_r, wake_w = zerocopy.small_pipe()
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wake-up pipe tells the loop
        _, tls_client = self.tls_contexts
        for index, dest in enumerate(self.config.dests):
            mine, theirs = control_pair()
            config = endpoints.for_destination(self.config, dest)
            tls_context = tls.context_for(tls_client, config) if dest.tls else None
            title = "socketproxy: forwarder (spare) -> %s" % dest
            try:
                pid = forking.fork_child(title, run_forwarder, theirs, index, dest, config, os.getpid(), self.table,
                                         tls_context, keep=[theirs.fileno()])
            finally:
                theirs.close()
            self.members.append((pid, os.pidfd_open(pid), mine))

    def hand_pipe(self, index, read_fd, fields):
        """A new source's pipe to forwarder index; its (pid, pidfd, control socket)."""
        member = self.members[index]
        send_with_fd(member[2], dict(fields, peer=fields["peer"][:PEER_MAX]), read_fd)
        return member

    def owns(self, pidfd):
        return any(member[1] == pidfd for member in self.members)

    def said_done(self, control):
        """A forwarder's word on its control socket: whether it is DONE with its source (else it is
        exiting, and its pidfd tells how)."""
        try:
            return control.recv(64) == DONE
        except OSError:
            return False

    def wait_for_source(self):
        """Waiting: (source, peer, slot) once main hands one, None when the group is to end."""
        setproctitle.setproctitle(SPARE_TITLE)
        proxylog.set_connection("")
        waiting = Waiting()
        waiting.on(self.control, self.taken)
        waiting.on(self.lifeline_fd, lambda: False)  # main is going: so are we
        waiting.on(self.wake_r, self.signalled)
        for pid, pidfd, control in self.members:
            waiting.on(pidfd, self.member_died)
            waiting.on(control, self.member_died)  # its end of the control socket closes as it dies
        return waiting.wait() or None

    def signalled(self):
        """SIGTERM or SIGINT: we end. Not SIGHUP: a reload's main ends its waiting groups itself, by
        closing their control sockets, after any source it sent them (which must not be lost); a
        SIGHUP is for the source main has just sent us (it is a receiver of main's already), which
        reconciles once it has its pipes (see run_group)."""
        received = set(os.read(self.wake_r, 64))
        self.pending |= received
        return False if received & {signal.SIGTERM, signal.SIGINT} else None

    def apply_pending(self, receiver):
        """What came while we waited, for the source we took: a reload, or a stop."""
        pending, self.pending = self.pending, set()
        if signal.SIGHUP in pending:
            receiver.reloaded = True
            receiver.reconcile()
        if pending & {signal.SIGTERM, signal.SIGINT}:
            receiver.stop("told to stop")

    def taken(self):
        message = receive_with_fd(self.control)
        if message is None:
            return False  # main closed our control socket: it has spares enough, or is going
        fields, fd = message
        return socket.socket(fileno=fd), fields["peer"], fields["slot"]

    def member_died(self):
        log.error("a spare group's forwarder died: the group is killed")
        os.killpg(0, signal.SIGKILL)

    def reusable(self, receiver):
        """Whether, its source served, this group may wait for another."""
        return (receiver.state == receiver_module.ENDED and not receiver.reloaded and not self.ended_member
                and not receiver.forwarders)

    def free(self):
        """Tell main we wait for the next source; False when we must not (something waits to be
        handled: a member's end, a signal, main's end; main would hand us a source we then lose) or
        main no longer listens to us (an upgrade)."""
        poller = Poller()
        for fd in [self.wake_r, self.lifeline_fd] + [fd for _, pidfd, control in self.members for fd in (pidfd, control)]:
            poller.watch(fd, select.POLLIN)
        if next(poller.events(0), None):
            return False
        try:
            self.control.send(FREE)
        except OSError:
            return False
        return True


def run_group(control, first, config, lifeline_fd, table, dests_fd, tls_contexts):
    """Body of a spare group's receiver process (see forking.fork_child). first: (source, peer, slot)
    when main forked us for a source, else None (we wait for one)."""
    group = Group(control, config, lifeline_fd, table, dests_fd, tls_contexts)
    try:
        group.start()
    except OSError as exc:
        log.error("a spare group cannot start its forwarders: %s", exc.strerror or exc)
        os.killpg(0, signal.SIGKILL)
    served = 0
    code = 0
    while True:
        taken = first or group.wait_for_source()
        first = None
        if taken is None:
            return 0
        source, peer, slot = taken
        setproctitle.setproctitle("socketproxy: receiver %s" % peer)
        served += 1
        receiver = receiver_module.Receiver(source, peer, config, lifeline_fd, table, slot, dests_fd, tls_contexts,
                                            group=group)
        reusable = True  # a refused source: it was closed, and nothing else happened
        if receiver.admit():
            try:
                receiver.start()
            except OSError as exc:
                log.error("group ended: cannot hand its forwarders their pipes: %s", exc.strerror or exc)
                receiver.kill_group()
            group.apply_pending(receiver)
            code = receiver.run()
            reusable = group.reusable(receiver)
        receiver.release()
        receiver = source = None  # nothing of this source stays while we wait
        # FREE only when we will wait for the next: a source main sends a group that then exits is lost.
        why = ("its source did not end cleanly, or a reload or a forwarder's end came" if not reusable else
               "it has served %d sources" % served if served >= MAX_SOURCES_PER_GROUP else
               None if group.free() else "something came to handle, or main no longer listens")
        if why:
            log.debug("the group ends after this source: %s", why)
            return code


def run_forwarder(control, index, dest, config, receiver_pid, table, tls_context):
    """Body of a spare group's forwarder: a forwarding.Forwarder per pipe the receiver hands us."""
    zerocopy.return_large_blocks()
    wake_r = forwarding.record_signals()
    spare_title = "socketproxy: forwarder (spare) -> %s" % dest
    while True:
        waiting = Waiting()
        waiting.on(control, lambda: receive_with_fd(control) or False)
        waiting.on(wake_r, lambda: forward_stop(wake_r, receiver_pid))
        message = waiting.wait()
        if not message:
            return 0  # the receiver closed our control socket (its group ends) or died
        fields, pipe_fd = message
        title = "socketproxy: forwarder %s -> %s" % (fields["peer"], dest)
        setproctitle.setproctitle(title)
        rows = stats.GroupRows(table, fields["slot"], config.columns)
        counters = forwarding.serving(fields["peer"], dest, title, rows, index)
        os.set_blocking(pipe_fd, False)
        fwd = forwarding.Forwarder(pipe_fd, dest, config, receiver_pid, rows, index, counters,
                                   proxy_header=bytes.fromhex(fields["proxy_header"]), tls_context=tls_context)
        fwd.watch_signals(wake_r)
        code = fwd.run()
        again = fwd.release()
        fwd = None
        if code or not again:
            return code
        try:
            control.send(DONE)
        except OSError:
            return 0
        setproctitle.setproctitle(spare_title)
        proxylog.set_connection("")


def forward_stop(wake_r, receiver_pid):
    """SIGTERM or SIGINT while waiting: the receiver ends the group (as a forwarder of a source asks it)."""
    received = set(os.read(wake_r, 64))
    if received & {signal.SIGTERM, signal.SIGINT}:
        try:
            os.kill(receiver_pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
    return None
