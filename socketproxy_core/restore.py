"""Restoring the session on a new destination connection, before the stream resumes on it.

The forwarder has connected again; before its stream goes on, the preamble (sessions.py) is sent and
answered: with --framing resp, one reply per command, and an error reply to a state-setting one
(a changed password: -WRONGPASS) makes the attempt a failed one. Without replies to read (a header
of --session-preamble), the preamble is restored once the destination has acknowledged all of it.
The stream starts only then, so its accounting (acknowledged bytes on the socket) never counts a
byte of the preamble.
"""
import select

from socketproxy_core.sockets import WOULD_BLOCK, describe, unsent_bytes

ACK_POLL_S = 0.02


class Restore:
    """One restoring of one connection, on the forwarder's loop: done(sock, host, what) when restored,
    failed(sock, reason) when not."""

    def __init__(self, loop, sock, preamble, replies, timeout, done, failed):
        self.loop = loop
        self.sock = sock
        self.data, self.expected, self.checked, self.what = preamble
        self.out = memoryview(self.data)
        self.replies = replies  # the forwarder's RespReplies (None without --framing resp)
        self.first_reply = replies.replies if replies is not None else 0
        self.done, self.failed = done, failed
        self.discard = bytearray(16384)
        loop.watch(sock, select.POLLIN | select.POLLOUT, self.ready)
        loop.set_timer("restore", timeout, self.timed_out)

    def ready(self, event):
        if event & select.POLLOUT and self.out:
            try:
                sent = self.sock.send(self.out)
            except WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self.fail(describe(exc))
                return
            self.out = self.out[sent:]
            if not self.out:
                self.loop.watch(self.sock, select.POLLIN, self.ready)
        if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
            if not self.read():
                return
        self.check()

    def read(self):
        """Read what the destination answered; False once the attempt has failed."""
        try:
            got = self.sock.recv_into(self.discard)
        except WOULD_BLOCK:
            return True
        except OSError as exc:
            self.fail(describe(exc))
            return False
        if not got:
            self.fail("closed by destination")
            return False
        if self.replies is None:
            return True
        for number, text in self.replies.feed(memoryview(self.discard)[:got]):
            if number - self.first_reply <= self.checked:
                self.fail("%s answered -%s" % (self.what.split(", ")[number - self.first_reply - 1], text))
                return False
        return True

    def check(self):
        """Restored once everything is sent, answered (or acknowledged, when nothing answers)."""
        if self.out:
            return
        if self.replies is not None and self.replies.replies - self.first_reply < self.expected:
            return
        if unsent_bytes(self.sock):
            self.loop.set_timer("restore-acks", ACK_POLL_S, self.check)
            return
        self.finish()
        self.done(self.sock, self.what)

    def timed_out(self):
        self.fail("no answer to the session's preamble within --connect-timeout")

    def fail(self, reason):
        self.finish()
        self.failed(self.sock, reason)

    def finish(self):
        self.loop.unwatch(self.sock)
        self.loop.cancel("restore", "restore-acks")

