"""--primary: the first destination is the source's session, and its replies go back to the source.

Requests reach the primary through its forwarder's pipe until the forwarder has connected and
handed the socket to the receiver (RequestsLink); from then on, once that pipe is empty, the receiver
splices them straight into the socket: a request wakes one process, not two. The pipe's end is still
the end of requests. The forwarder holds a copy of the source socket and splices the primary's
replies to it through a pipe of its own: no byte through Python either way. Nothing is retried: when the primary cannot be reached, fails, resets or closes,
the source is closed the same way (a reset for a reset, a close for a close), the receiver is asked
to end the group (through the shared flag, then SIGTERM), and what the pipe still brings is
counted as dropped. Half-closes pass both ways: the source's end of requests becomes a FIN to the
primary, whose remaining replies still reach the source before its own FIN does.
"""
import mmap
import os
import select
import signal
import socket
import struct

import time

from socketproxy_core import loop
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import reset
from socketproxy_core.zerocopy import pipe_bytes, pipe_hung_up, set_pipe_size

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
CHUNK = 1 << 20
ENDED_CLOSE, ENDED_RESET = 1, 2  # the shared flag (the receiver's clean_end[1]): how the primary ended
# A mirror of --primary sends in batches (a wake per request would take the CPU the primary needs):
# after a wake that moved under MIRROR_BATCH_BELOW (sent and replies read) it waits MIRROR_BATCH_S before it reads its pipe
# again, unless the receiver pokes it first (it has filled a sixteenth of the pipe's slots meanwhile,
# leaving the rest as slack for a mirror slow to be scheduled on a busy machine). Only with a pipe of
# MIRROR_BATCH_MIN_PIPE or more (64 slots: a poke every 4 writes at least).
MIRROR_BATCH_S = 0.02
MIRROR_BATCH_BELOW = 64 * 1024
MIRROR_BATCH_MIN_PIPE = 256 * 1024
MIRROR_POKE_SHARE = 16  # the receiver pokes a napping mirror once 1/16 of its pipe's slots are used
STOP_WAIT_S = 5.0  # after asking the receiver to end the group: its stop takes 1 s, then it kills
ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class RequestsLink:
    """Between the receiver and the primary's forwarder: the connected socket, handed over once
    (SCM_RIGHTS), and the count of request bytes the receiver wrote into it (shared memory)."""

    def __init__(self):
        self.receiver_end, self.forwarder_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.written = mmap.mmap(-1, 8)

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

    def publish_written(self, total):
        """Receiver: the request bytes written into the primary's socket so far (read once a second
        and at the end by the forwarder, for its counters)."""
        struct.pack_into("q", self.written, 0, total)

    def bytes_written(self):
        return struct.unpack_from("q", self.written)[0]


class PrimarySession:
    """Requests pipe -> primary, replies primary -> source, until one side ends the session."""

    def __init__(self, fwd, source, link):
        self.fwd = fwd
        self.source = source
        self.link = link
        self.returned = 0  # reply bytes delivered to the source

    def run(self):
        fwd = self.fwd
        connected = fwd.connect(hold_pipe=True)
        if connected:
            self.link.hand_over(fwd.sock)
        else:
            self.link.refuse()
        if not connected:
            if fwd.pipe_eof:  # the source finished before the primary answered: nothing to deliver
                self.source.close()
                return
            self.end_session(ENDED_RESET, "cannot reach the primary %s within --connect-timeout" % fwd.dest)
            return
        try:
            self.pump()
        except OSError as exc:  # from the primary's socket (the source's are handled in pump)
            self.end_session(ENDED_RESET, "the primary %s failed (%s)" % (fwd.dest, exc.strerror or exc))

    def pump(self):
        """Event by event, one splice each: a request still in our pipe costs one splice; a reply
        costs two (primary -> our reply pipe -> source), and a poll for the source only when it
        does not take the reply at once. The end of our pipe is the end of requests.

        Only what we wait for is watched: the primary's socket for replies while our reply pipe has
        room (and for room while requests wait), the source for room while replies wait. An end of
        the primary's connection (POLLHUP) is reported at every poll while its socket is watched, so
        it is watched for nothing once its replies have ended. After the source's FIN the session
        ends when nothing moves either way for --fin-timeout.
        """
        fwd = self.fwd
        sock, pipe_fd, source_fd = fwd.sock, fwd.pipe_fd, self.source.fileno()
        sock_fd = sock.fileno()
        reply_r, reply_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        capacity = set_pipe_size(reply_w, fwd.config.pipe_size)
        splice = os.splice
        queued = 0  # reply bytes waiting in our reply pipe for the source to take them
        requests_open = replies_open = True
        socket_full = False
        fin_timeout = fwd.config.fin_timeout
        moved_at = 0.0  # after the source's FIN: when a byte last moved either way
        poller = loop.Poller()
        poller.watch(pipe_fd, select.POLLIN)
        poller.watch(sock_fd, select.POLLIN)
        if fwd.receiver_pidfd is not None:
            poller.watch(fwd.receiver_pidfd, select.POLLIN)
        while True:
            timeout_s = fwd.publish_due()
            if not requests_open and fin_timeout:
                idle_left = moved_at + fin_timeout - time.monotonic()
                if idle_left <= 0:
                    self.fin_timed_out(queued)
                    return
                timeout_s = idle_left if timeout_s is None else min(timeout_s, idle_left)
            for fd, event in poller.events(timeout_s):
                if fd == pipe_fd:
                    try:
                        moved = splice(pipe_fd, sock_fd, CHUNK, flags=SPLICE_FLAGS)
                    except BlockingIOError:  # the pipe has data (POLLIN): the primary's socket is full
                        moved = -1
                    if moved > 0:
                        fwd.piped += moved
                    elif moved == 0:  # the source has finished sending: the primary gets our FIN
                        fwd.end_of_pipe()
                        requests_open = False
                        moved_at = time.monotonic()
                        poller.unwatch(pipe_fd)
                        shutdown(sock, socket.SHUT_WR)  # a failed primary: the next splice says how
                    elif not pipe_bytes(pipe_fd) and pipe_hung_up(pipe_fd):
                        continue  # EOF is seen by the next splice
                    else:
                        socket_full = True
                        poller.unwatch(pipe_fd)
                elif fd == sock_fd:
                    if event & select.POLLOUT and socket_full:
                        socket_full = False
                        poller.watch(pipe_fd, select.POLLIN)
                    if replies_open and queued < capacity and event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                        try:
                            moved = splice(sock_fd, reply_w, capacity - queued, flags=SPLICE_FLAGS)
                        except BlockingIOError:
                            moved = -1
                        if moved == 0:
                            replies_open = False
                        elif moved > 0:
                            queued += moved
                            moved_at = time.monotonic()
                elif fd == fwd.receiver_pidfd:
                    fwd.receiver_died()
            fwd.publish_if_due()
            if queued:  # hand the replies to the source now; poll for it only when it is full
                try:
                    moved = splice(reply_r, source_fd, queued, flags=SPLICE_FLAGS)
                    queued -= moved
                    self.returned += moved
                    moved_at = time.monotonic()
                except BlockingIOError:
                    pass
                except ERRORS as exc:
                    self.source_gone(exc)
                    return
            if not replies_open and not queued:
                self.primary_closed(requests_open)
                return
            sock_events = (select.POLLIN if replies_open and queued < capacity else 0) | (
                select.POLLOUT if socket_full else 0)
            if sock_events:
                poller.watch(sock_fd, sock_events)
            else:
                poller.unwatch(sock_fd)
            if queued:
                poller.watch(source_fd, select.POLLOUT)
            else:
                poller.unwatch(source_fd)

    def fin_timed_out(self, queued):
        """--fin-timeout: the source has finished and nothing moved either way since: both ends are
        closed (the source after the replies it already took)."""
        fwd = self.fwd
        log.info("closing the session: nothing moved for %.1f s after the source finished (--fin-timeout); "
                 "%d bytes of replies reached the source%s", fwd.config.fin_timeout, self.returned,
                 ", %d more were waiting for it" % queued if queued else "")
        reset(fwd.sock)
        fwd.sock = None
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()

    def primary_closed(self, requests_open):
        """The primary sent its FIN and every reply reached the source: the source gets ours."""
        fwd = self.fwd
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()
        fwd.sock.close()
        fwd.sock = None
        if requests_open:  # mid-session: the group ends
            self.end_session(ENDED_CLOSE, "the primary %s closed the connection" % fwd.dest)
        else:
            log.info("closed connection to %s: source finished, and the primary's %d bytes of replies reached it",
                     fwd.dest, self.returned)

    def source_gone(self, exc):
        """The source went away while replies were on their way: the primary's connection is reset."""
        fwd = self.fwd
        log.info("the source is gone (%s): resetting the connection to the primary %s", exc.strerror or exc, fwd.dest)
        reset(fwd.sock)
        fwd.sock = None
        self.source.close()
        self.stop_group(ENDED_CLOSE)

    def end_session(self, how, why):
        """The primary ended the session: the source is closed the same way, the group ends."""
        fwd = self.fwd
        if how == ENDED_RESET:
            reset(self.source)  # linger 0: the last close of the source (the receiver's) sends a reset
            if fwd.sock is not None:
                reset(fwd.sock)
                fwd.sock = None
        log.warning("%s: %s the source; its group ends (%d bytes of replies reached it)", why,
                    "resetting" if how == ENDED_RESET else "closing", self.returned)
        self.stop_group(how)

    def stop_group(self, how):
        """Tell the receiver how the session ended and ask it to stop; count what the pipe still
        brings as dropped, until the receiver closes it."""
        fwd = self.fwd
        if fwd.clean_end is not None:
            fwd.clean_end[1] = how
        if fwd.receiver_pidfd is not None:
            try:
                signal.pidfd_send_signal(fwd.receiver_pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        while not fwd.pipe_eof and time.monotonic() < deadline:
            fwd.publish_if_due()
            select.select([fwd.pipe_fd], [], [], min(fwd.publish_due(), deadline - time.monotonic()))
            fwd.drain()
        if not fwd.pipe_eof:
            log.warning("the receiver did not end the group within %.1f s: exiting", STOP_WAIT_S)


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def gather(fwd):
    """A mirror of --primary that moved little at its last wake lets its pipe gather more
    before it looks again: one wake per batch, not per request, leaves the CPU to the primary.
    The receiver pokes it when the pipe fills faster (so a burst is never dropped for a nap)."""
    moved = fwd.conn_sent + fwd.replies_read
    if moved - fwd.moved_at_wake < MIRROR_BATCH_BELOW:
        if select.select([fwd.poke_fd], [], [], MIRROR_BATCH_S)[0]:
            os.eventfd_read(fwd.poke_fd)
            log.debug("woken before the batch's end: the pipe fills fast")
    fwd.moved_at_wake = moved
