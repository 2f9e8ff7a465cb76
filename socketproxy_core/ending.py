"""How a forwarder's connection ends: DRAINING (every byte acknowledged, then our FIN), CLOSING
(waiting briefly for the destination's FIN), and ABANDONED (a mirror of --primary without framing
whose session was cut: the rest of it is dropped).

A mixin of forwarding.Forwarder: the state is the forwarder's, these are its handlers in those states.
"""
import select
import socket
import ssl

from socketproxy_core import tls
from socketproxy_core.proxylog import log
from socketproxy_core.sockets import WOULD_BLOCK, reset, unsent_bytes
from socketproxy_core.stats import STATE_ABANDONED, STATE_CLOSING, STATE_DONE, STATE_DRAINING

DRAINING, CLOSING, DONE, ABANDONED = STATE_DRAINING, STATE_CLOSING, STATE_DONE, STATE_ABANDONED
CLOSE_LINGER_S = 1.0  # after our FIN, how long to wait for the destination's
ACK_POLL_S = 0.02  # while waiting for the last bytes to be acknowledged
POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Ending:
    """The forwarder's handlers once its connection is ending (see the module docstring)."""

    def start_draining(self):
        """After the last byte: wait until the destination has acknowledged everything (as long as it
        makes progress: the same --send-timeout rule as while streaming), then send FIN.

        The FIN goes out once every byte is acknowledged: a FIN puts the receiver in delayed-ACK
        mode, and a destination that reads the last bytes and resets before that ACK leaves them
        unacknowledged here (an RST's acknowledgement is not processed): counted dropped, though read.
        """
        self.leave_up()
        self.enter(DRAINING)
        self.loop.watch(self.sock, select.POLLIN, self.socket_draining)
        self.check_acknowledged()

    def check_acknowledged(self):
        queued = unsent_bytes(self.sock)
        if not queued:
            self.send_fin()
        elif self.progress.stalled(self.counts.conn_sent - queued):
            self.give_up_sending(queued, "it took no data for %.1f s after the source finished" % self.config.send_timeout)
        else:
            self.loop.set_timer("acks", ACK_POLL_S, self.check_acknowledged)

    def socket_draining(self, _event):
        """DRAINING: replies are discarded; the destination's end means it takes no more."""
        if not self.destination_ended():
            return
        self.loop.cancel("acks")
        queued = unsent_bytes(self.sock)
        if queued:
            self.give_up_sending(queued, "it ended the connection before taking the last bytes")
        else:
            self.send_fin()

    def give_up_sending(self, queued, why):
        """What the destination never took is counted as dropped and the connection reset."""
        self.loop.cancel("acks")
        self.loop.unwatch(self.sock)
        self.progress.stop()
        lost = reset(self.sock)
        if self.framed and self.retainer is not None and lost:
            self.backlog.dropped_records += self.retainer.records_in_last(lost)
        self.counts.drop(self.counts.settle(lost))
        self.sock = None
        if lost:
            log.warning("closed connection to %s: %s; %d unsent bytes dropped", self.dest, why, lost)
        else:
            log.info("closed connection to %s: source finished (the last bytes acknowledged as it was reset)",
                     self.dest)
        self.enter(DONE)

    def send_fin(self):
        """DRAINING -> CLOSING: every byte is acknowledged; our FIN goes out, and we wait briefly for
        the destination's, reading replies (closing with unread replies queued would send a reset
        that can discard unread data)."""
        self.progress.stop()
        self.counts.settle(0)
        if isinstance(self.sock, ssl.SSLSocket):
            tls.close_notify(self.sock)
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.enter(CLOSING)
        self.loop.watch(self.sock, select.POLLIN, self.socket_closing)
        self.loop.set_timer("linger", CLOSE_LINGER_S, self.closed)

    def socket_closing(self, _event):
        if self.destination_ended():
            self.closed()

    def destination_ended(self):
        """Read and discard one buffer of replies; whether the destination ended the connection."""
        try:
            got = self.sock.recv_into(self.discard)
        except WOULD_BLOCK:
            return False
        except OSError:
            return True
        if got and self.replies is not None:
            self.replies.feed(memoryview(self.discard)[:got])
            if self.comparison is not None:
                self.comparison.compare()
        return not got

    def closed(self):
        self.loop.cancel("linger")
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.sock = None
        log.info("closed connection to %s: source finished", self.dest)
        self.enter(DONE)

    # -- ABANDONED (a mirror of --primary without framing) ----------------------------------------

    def abandon(self, reason):
        """A mirror's session cannot be resumed on another connection: what it holds and what comes
        until the pipe ends is dropped. The shadow closing the connection itself (as a server that
        closes after its reply does) ends its session the way its protocol does: not a warning."""
        self.leave_up()
        lost = 0
        if self.retainer is not None:  # the backlog being resent and not yet handed: never delivered
            lost = self.retainer.unsent_replay()
            self.retainer.retained_bytes()
            self.retainer.drop_backlog()
        lost += self.counts.settle(reset(self.sock))
        self.sock = None
        self.counts.drop(lost)
        self.enter(ABANDONED)
        if reason == "closed by destination" and not lost:  # as the primary may: the session's end, if nothing follows
            log.info("the shadow %s closed the connection", self.dest)
            self.abandoned_why = "it closed the connection"
        else:
            self.mirror_abandoned(reason, lost)
        if self.pipe_eof:
            self.enter(DONE)
        else:
            self.loop.watch(self.pipe_fd, POLL_IN, self.pipe_abandoned)

    def pipe_abandoned(self, _event):
        dropped = self.counts.dropped
        self.drain_dropping()
        if self.abandoned_why and self.counts.dropped > dropped:  # the session went on without it
            self.mirror_abandoned(self.abandoned_why, self.counts.dropped - dropped)
        if self.pipe_eof:
            self.enter(DONE)

    def mirror_abandoned(self, reason, lost):
        """Count and say once that this session is not mirrored to the end."""
        self.abandoned_why = None
        self.stats.abandoned += 1
        log.warning("abandoned mirroring this session to %s: %s in the middle of the session, which without "
                    "framing cannot be resumed on a new connection; %d bytes and the rest of the session dropped",
                    self.dest, reason, lost)
