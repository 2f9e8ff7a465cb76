"""--primary: the first destination is the source's session, and its replies go back to the source.

The session (Session, run by the primary's forwarder on its loop) and the link that hands the
primary's socket to the receiver (RequestsLink) are here; how mirrors send and compare is in mirrors.py.

Requests reach the primary through its forwarder's pipe until the forwarder has connected and
handed the socket to the receiver (RequestsLink); from then on, once that pipe is empty, the receiver
splices them straight into the socket: a request wakes one process, not two. The pipe's end is still
the end of requests. The forwarder holds a copy of the source socket and splices the primary's
replies to it through a pipe of its own: no byte through Python either way. Nothing is retried: when
the primary cannot be reached, fails, resets or closes, the source is closed the same way (a reset
for a reset, a close for a close), the receiver is asked to end the group (through the shared flag,
then SIGTERM), and what the pipe still brings is counted as dropped. Half-closes pass both ways: the
source's end of requests becomes a FIN to the primary, whose remaining replies still reach the source
before its own FIN does. After the source's FIN, --fin-timeout bounds a session where nothing moves.
"""
import os
import select
import signal
import socket
import time

from socketproxy_core.proxylog import log
from socketproxy_core.sockets import reset
from socketproxy_core.stats import STATE_CLOSING, STATE_DONE
from socketproxy_core.zerocopy import SPLICE_FLAGS, pipe_bytes, pipe_hung_up, set_pipe_size, tee

CHUNK = 1 << 20
ENDED_CLOSE, ENDED_RESET = 1, 2  # how the primary ended the session (in its forwarder's row of the table)
STOP_WAIT_S = 5.0  # after asking the receiver to end the group: its stop takes 1 s, then it kills
ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class RequestsLink:
    """Between the receiver and the primary's forwarder: the connected socket, handed over once
    (SCM_RIGHTS). The receiver publishes the request bytes it writes into it in its row of the
    shared table."""

    def __init__(self):
        self.receiver_end, self.forwarder_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

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



class Session:
    """Requests pipe -> primary, replies primary -> source, until one side ends the session: the
    handlers of the primary's forwarder while it is UP, then CLOSING until the receiver ends the group.

    Only what the session waits for is watched: the primary's socket for replies while the reply
    pipe has room (and for room while requests wait), the source for room while replies wait. An
    ended connection (POLLHUP) is reported at every poll while its socket is watched, so a socket is
    watched for nothing once nothing is expected of it.
    """

    def __init__(self, fwd, source, link, evidence=()):
        self.fwd = fwd
        self.loop = fwd.loop
        self.source = source
        self.evidence = list(evidence)  # --framing resp: a pipe per mirror that compares our replies
        self.link = link
        # Requests the receiver writes into the primary's socket, from its row of the shared table.
        fwd.counts.extra_sent = fwd.rows.primary_written if fwd.rows is not None else (lambda: 0)
        self.returned = 0  # reply bytes delivered to the source
        self.queued = 0  # reply bytes waiting in our reply pipe for the source to take them
        self.requests_open = self.replies_open = True
        self.socket_full = False
        self.sock_events = None  # what the primary's socket is watched for now
        self.source_full = None  # whether the source is watched for room now
        self.moved_at = 0.0  # when a byte last moved either way (for --fin-timeout)
        self.reply_r = self.reply_w = None
        self.capacity = 0
        self.turns = 0  # replies passed on so far (wakes that moved reply bytes): the receiver marks turns by it

    def start(self, sock):
        """Connected: hand the socket to the receiver, and serve."""
        fwd = self.fwd
        self.link.hand_over(sock)
        self.sock, self.sock_fd, self.source_fd = sock, sock.fileno(), self.source.fileno()
        self.reply_r, self.reply_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = set_pipe_size(self.reply_w, fwd.config.pipe_size)
        self.loop.watch(fwd.pipe_fd, select.POLLIN, self.requests)
        self.watch()

    def unreachable(self):
        """The connection attempt failed: the source is reset, the group ends."""
        fwd = self.fwd
        self.link.refuse()
        if fwd.pipe_eof:  # the source finished before the primary answered: nothing to deliver
            self.source.close()
            fwd.enter(STATE_DONE)
            return
        self.end_session(ENDED_RESET, "cannot reach the primary %s within --connect-timeout" % fwd.dest)

    def requests(self, _event):
        """Our pipe has requests (or its end, which becomes our FIN to the primary)."""
        fwd = self.fwd
        try:
            moved = os.splice(fwd.pipe_fd, self.sock_fd, CHUNK, flags=SPLICE_FLAGS)
        except BlockingIOError:  # the pipe has data (POLLIN): the primary's socket is full
            if not pipe_bytes(fwd.pipe_fd) and pipe_hung_up(fwd.pipe_fd):
                return  # EOF is seen by the next splice
            self.socket_full = True
            self.loop.unwatch(fwd.pipe_fd)
            self.watch()
            return
        except OSError as exc:
            self.failed(exc)
            return
        if moved:
            fwd.counts.handed(moved)
            return
        fwd.end_of_pipe()  # the source has finished sending: the primary gets our FIN
        self.requests_open = False
        self.moved_at = time.monotonic()
        shutdown(self.sock, socket.SHUT_WR)  # a failed primary: the next splice says how
        if fwd.config.fin_timeout:
            self.loop.set_timer("fin", fwd.config.fin_timeout, self.fin_check)

    def primary_ready(self, event):
        """The primary's socket: replies to pass on, room for requests, or its end."""
        if event & select.POLLOUT and self.socket_full:
            self.socket_full = False
            self.loop.watch(self.fwd.pipe_fd, select.POLLIN, self.requests)
        if self.replies_open and (not self.queued if self.evidence else self.queued < self.capacity) and event & (
                select.POLLIN | select.POLLERR | select.POLLHUP):
            try:
                moved = os.splice(self.sock_fd, self.reply_w, self.capacity - self.queued, flags=SPLICE_FLAGS)
            except BlockingIOError:
                moved = -1
            except OSError as exc:
                self.failed(exc)
                return
            if moved == 0:
                self.replies_open = False
            elif moved > 0:
                if self.evidence:
                    self.copy_replies(moved)
                self.queued += moved
                self.moved_at = time.monotonic()
                self.turns += 1
                if self.fwd.rows is not None:  # before the source can see them (see fanout.mark_turn)
                    self.fwd.rows.note_replies(self.turns)
        self.pass_replies()

    def copy_replies(self, moved):
        """The reply pipe holds just the moved bytes (it is read into only when empty, see watch):
        copy them (tee) into every mirror's evidence pipe. A mirror whose pipe cannot take a whole
        copy reads its end instead (and compares no more)."""
        for fd in list(self.evidence):
            try:
                copied = tee(self.reply_r, fd, moved, os.SPLICE_F_NONBLOCK)
            except (BlockingIOError, BrokenPipeError):
                copied = 0
            if copied < moved:
                self.evidence.remove(fd)
                os.close(fd)

    def source_ready(self, _event):
        self.pass_replies()

    def pass_replies(self):
        """Hand the replies to the source now; it is watched only when it is full."""
        if self.queued:
            try:
                moved = os.splice(self.reply_r, self.source_fd, self.queued, flags=SPLICE_FLAGS)
                self.queued -= moved
                self.returned += moved
                self.moved_at = time.monotonic()
            except BlockingIOError:
                pass
            except ERRORS as exc:
                self.source_gone(exc)
                return
        if not self.replies_open and not self.queued:
            self.primary_closed()
            return
        self.watch()

    def watch(self):
        """Watch what the session waits for now (the loop is told only of a change: this runs at
        every request and reply)."""
        room = not self.queued if self.evidence else self.queued < self.capacity  # (see copy_replies)
        sock_events = (select.POLLIN if self.replies_open and room else 0) | (
            select.POLLOUT if self.socket_full else 0)
        if sock_events != self.sock_events:
            self.sock_events = sock_events
            if sock_events:
                self.loop.watch(self.sock_fd, sock_events, self.primary_ready)
            else:
                self.loop.unwatch(self.sock_fd)
        source_full = bool(self.queued)
        if source_full != self.source_full:
            self.source_full = source_full
            if source_full:
                self.loop.watch(self.source_fd, select.POLLOUT, self.source_ready)
            else:
                self.loop.unwatch(self.source_fd)

    def fin_check(self):
        """--fin-timeout after the source's FIN: the session ends once nothing moved for that long."""
        idle_left = self.moved_at + self.fwd.config.fin_timeout - time.monotonic()
        if idle_left > 0:
            self.loop.set_timer("fin", idle_left, self.fin_check)
            return
        fwd = self.fwd
        log.info("closing the session: nothing moved for %.1f s after the source finished (--fin-timeout); "
                 "%d bytes of replies reached the source%s", fwd.config.fin_timeout, self.returned,
                 ", %d more were waiting for it" % self.queued if self.queued else "")
        self.leave()
        reset(self.sock)
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()
        fwd.enter(STATE_DONE)

    def leave(self):
        """Stop watching what the session watched."""
        fwd = self.fwd
        for fd in (fwd.pipe_fd, self.sock_fd, self.source_fd):
            self.loop.unwatch(fd)
        self.sock_events, self.source_full = 0, False
        self.loop.cancel("fin")
        fwd.sock = None

    def failed(self, exc):
        """An error on the primary's socket."""
        self.end_session(ENDED_RESET, "the primary %s failed (%s)" % (self.fwd.dest, exc.strerror or exc))

    def primary_closed(self):
        """The primary sent its FIN and every reply reached the source: the source gets ours."""
        fwd = self.fwd
        requests_open = self.requests_open
        self.leave()
        shutdown(self.source, socket.SHUT_WR)
        self.source.close()
        self.sock.close()
        if requests_open:  # mid-session: the group ends
            self.end_session(ENDED_CLOSE, "the primary %s closed the connection" % fwd.dest)
        else:
            log.info("closed connection to %s: source finished, and the primary's %d bytes of replies reached it",
                     fwd.dest, self.returned)
            fwd.enter(STATE_DONE)

    def source_gone(self, exc):
        """The source went away while replies were on their way: the primary's connection is reset."""
        fwd = self.fwd
        log.info("the source is gone (%s): resetting the connection to the primary %s", exc.strerror or exc, fwd.dest)
        self.leave()
        reset(self.sock)
        self.source.close()
        self.stop_group(ENDED_CLOSE)

    def end_session(self, how, why):
        """The primary ended the session: the source is closed the same way, the group ends. A close
        is a normal end (a server that closes after its reply); a reset or a failure is a warning."""
        fwd = self.fwd
        if how == ENDED_RESET:
            reset(self.source)  # linger 0: the last close of the source (the receiver's) sends a reset
            if fwd.sock is not None:
                self.leave()
                reset(self.sock)
        (log.warning if how == ENDED_RESET else log.info)(
            "%s: %s the source; its group ends (%d bytes of replies reached it)", why,
            "resetting" if how == ENDED_RESET else "closing", self.returned)
        self.stop_group(how)

    def stop_group(self, how):
        """CLOSING: tell the receiver how the session ended and ask it to stop; count what the pipe
        still brings as dropped, until the receiver closes it (STOP_WAIT_S at most)."""
        fwd = self.fwd
        fwd.session_end = how
        fwd.publish()  # the receiver reads how the session ended from our row
        if fwd.receiver_pidfd is not None:
            try:
                signal.pidfd_send_signal(fwd.receiver_pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
        fwd.enter(STATE_CLOSING)
        if fwd.pipe_eof:
            fwd.enter(STATE_DONE)
            return
        self.loop.watch(fwd.pipe_fd, POLL_IN, self.drain_until_end)
        self.loop.set_timer("stop", STOP_WAIT_S, self.receiver_too_slow)

    def drain_until_end(self, _event):
        fwd = self.fwd
        fwd.drain()
        if fwd.pipe_eof:
            self.loop.cancel("stop")
            fwd.enter(STATE_DONE)

    def receiver_too_slow(self):
        log.warning("the receiver did not end the group within %.1f s: exiting", STOP_WAIT_S)
        self.loop.unwatch(self.fwd.pipe_fd)
        self.fwd.enter(STATE_DONE)


def shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass
