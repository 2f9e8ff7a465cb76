"""What a forwarder keeps for its destination while it is down: the newest bytes, whole records.

Only the recovery path copies bytes through here (the healthy path splices the pipe to the socket),
so scanning for record ends happens only where the stream is cut.
"""


class Backlog:
    """The newest `limit` bytes of a stream; with framing, whole records only (ending with b"\\n").

    Older bytes are dropped and counted (bytes, and records when framed). A record whose start was
    dropped is dropped whole: its remaining bytes are skipped as they arrive (`skipping`).
    """

    def __init__(self, limit, framed):
        self.limit = limit
        self.framed = framed
        self.data = bytearray()
        self.skipping = False  # framed: discarding the rest of a record whose start was dropped
        self.dropped = 0
        self.dropped_records = 0

    def __len__(self):
        return len(self.data)

    def add(self, chunk):
        """Keep chunk after what is kept; drop the oldest bytes beyond the limit."""
        if self.skipping:
            chunk = bytes(chunk)  # a memoryview has no find (and this is the rare path)
            end = chunk.find(b"\n")
            if end < 0:
                self.dropped += len(chunk)
                return
            self.skipping = False
            self.dropped += end + 1
            self.dropped_records += 1
            chunk = chunk[end + 1:]
        self.data += chunk
        if len(self.data) > self.limit:
            self.drop_front(len(self.data) - self.limit)

    def drop_front(self, count):
        """Drop at least count bytes from the front: up to the next record end when framed."""
        if count <= 0:
            return
        if self.framed:
            end = self.data.find(b"\n", count - 1) if count else 0
            if end < 0:  # the rest is the start of one record longer than what may be kept
                self.skipping = True
                count = len(self.data)
                self.dropped_records += self.data.count(b"\n")
            else:
                count = end + 1
                self.dropped_records += self.data.count(b"\n", 0, count)
        self.dropped += count
        del self.data[:count]

    def take(self):
        """Everything kept, emptying the backlog (the drop counts stay)."""
        data, self.data = self.data, bytearray()
        return data

    def skip_partial_record(self, chunk):
        """While skipping, what of chunk follows the end of the skipped record (b"" if none yet).

        For a connection that must start at a record boundary when nothing could be kept.
        """
        if not self.skipping:
            return chunk
        chunk = bytes(chunk)
        end = chunk.find(b"\n")
        if end < 0:
            self.dropped += len(chunk)
            return b""
        self.skipping = False
        self.dropped += end + 1
        self.dropped_records += 1
        return chunk[end + 1:]
