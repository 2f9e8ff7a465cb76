"""A forwarder's byte counts: the one owner of sent and dropped; nothing else adjusts them.

Every byte the pipe brings ends up either sent (acknowledged by the destination, counted once however
often it was resent) or dropped (it never reached the destination), so at the end of a group
received = sent + dropped for each destination. Neither count ever goes down: a scrape never sees
a counter reset. Bytes sent again that the destination had acknowledged before (to resend a cut
record whole) are counted apart, as resent.
"""
from socketproxy_core.sockets import unsent_bytes


class Counts:
    """sent, dropped and resent, and the state of the current connection they are computed from."""

    def __init__(self):
        self.sent = 0  # acknowledged on the connections that have ended
        self.dropped = 0
        self.resent = 0  # acknowledged again, having been acknowledged on an earlier connection
        self.outage_dropped = 0  # of dropped, during the current outage (for its log lines)
        self.conn_sent = 0  # bytes of the current connection's stream handed to its socket
        self.conn_floor = 0  # bytes at the start of that stream delivered on an earlier connection
        self.acked_front = 0  # bytes at the backlog's front delivered already (kept to resend a record whole)
        self.extra_sent = None  # --primary: a function giving what the receiver wrote into the primary

    def start_connection(self):
        """A new connection: its stream starts with the backlog, whose front may be delivered already."""
        self.conn_sent = 0
        self.conn_floor, self.acked_front = self.acked_front, 0

    def handed(self, count):
        self.conn_sent += count

    def delivered(self, sock=None):
        """sent as the title and the metrics show it, the live connection (sock) included."""
        if self.extra_sent is not None:  # --primary: handed to the primary's socket (never resent)
            return self.conn_sent + self.extra_sent()
        if sock is None:
            return self.sent
        acknowledged = self.conn_sent - unsent_bytes(sock)
        return self.sent + max(0, acknowledged - self.conn_floor)

    def settle(self, unacknowledged):
        """The connection ends with unacknowledged bytes that no longer will be: what it delivered
        joins sent. Returns the bytes handed to it that no connection delivered (dropped, unless
        they are kept to be resent)."""
        # A tls:// connection's send queue holds ciphertext, more than the plaintext it carries: taken
        # as unsent plaintext it errs toward dropped, never toward sent (and never beyond what was handed).
        unacknowledged = min(unacknowledged, self.conn_sent)
        acknowledged = self.conn_sent - unacknowledged
        self.sent += max(0, acknowledged - self.conn_floor)
        self.resent += min(acknowledged, self.conn_floor)
        lost = max(0, self.conn_sent - max(acknowledged, self.conn_floor))
        self.conn_sent = self.conn_floor = 0
        return lost

    def resend(self, count):
        """count bytes delivered on an earlier connection sent again outside the stream (the
        session's preamble on a new connection)."""
        self.resent += count

    def drop(self, count):
        """count bytes that never reached the destination."""
        self.dropped += count
        self.outage_dropped += count

    def drop_kept(self, count):
        """count bytes let go from the backlog's front: those delivered already are not dropped."""
        credit = min(count, self.acked_front)
        self.acked_front -= credit
        self.drop(count - credit)

    def settle_primary(self):
        """--primary, at the end: take what the receiver wrote into the primary's socket for good."""
        if self.extra_sent is not None:
            self.conn_sent += self.extra_sent()
            self.extra_sent = lambda: 0
