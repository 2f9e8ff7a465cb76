"""What a forwarder keeps for its destination while it is down: the newest bytes, whole records.

Only the recovery path copies bytes through here (the healthy path splices the pipe to the socket),
so looking for record ends happens only where the stream is cut.
"""
import collections

from socketproxy_core import framing


class Backlog:
    """The newest `limit` bytes of a stream; with framing ("line" or "resp"), whole records only.

    Older bytes are dropped and counted (bytes, and records when framed). A record whose start was
    dropped is dropped whole: its remaining bytes are skipped as they arrive (`skipping`). What is
    kept always starts at a record boundary. It is held as the chunks that arrived, so dropping the
    oldest bytes frees them, and memory stays within the limit plus one chunk (one bytearray would be
    over-allocated by an eighth and copied whole whenever it grows after its front was dropped).
    """

    def __init__(self, limit, framing_mode="none"):
        self.limit = limit
        self.framing = framing_mode
        self.framed = framing_mode != "none"
        self.chunks = collections.deque()
        self.size = 0
        self.skip_scan = None  # framed: reading past the rest of a record whose start was dropped
        self.dropped = 0
        self.dropped_records = 0

    def __len__(self):
        return self.size

    @property
    def data(self):
        """Everything kept, as one bytes object (a copy)."""
        return b"".join(self.chunks)

    @property
    def skipping(self):
        return self.skip_scan is not None

    def scanner(self):
        """A scanner at the start of a record."""
        return framing.scanner(self.framing)

    def start_skipping(self, scan=None):
        """Drop what arrives up to the end of the record in progress; scan is a scanner placed in
        that record (a line scanner needs no place)."""
        self.skip_scan = scan or self.scanner()

    def add(self, chunk):
        """Keep chunk after what is kept; drop the oldest bytes beyond the limit."""
        if self.skipping:
            chunk = self.skip_partial_record(chunk)
        if not chunk:
            return
        self.chunks.append(bytes(chunk))
        self.size += len(chunk)
        if self.size > self.limit:
            self.drop_front(self.size - self.limit)

    def drop_front(self, count):
        """Drop at least count bytes from the front: up to the next record end when framed."""
        if count <= 0:
            return
        if self.framed:
            count = self.record_end_from(count)
        self.dropped += count
        self.size -= count
        while count and count >= len(self.chunks[0]):
            count -= len(self.chunks.popleft())
        if count:
            self.chunks[0] = self.chunks[0][count:]

    def record_end_from(self, count):
        """Where the first record ending at or after count ends (counting the records up to it); all
        that is kept, and skipping from there, when no record ends there yet."""
        scan = self.scanner()
        offset = 0
        for chunk in self.chunks:
            if count - offset > len(chunk):
                records, end = scan.scan(chunk)[0], -1
            else:
                records, end = scan.scan(chunk, until=max(count - offset, 0))
            self.dropped_records += records
            if end >= 0:
                return offset + end
            offset += len(chunk)
        self.skip_scan = scan  # the rest is the start of one record longer than what may be kept
        return self.size

    def take(self):
        """Everything kept, emptying the backlog (the drop counts stay)."""
        data = bytearray()
        while self.chunks:  # each chunk freed as it is copied: never the backlog twice
            data += self.chunks.popleft()
        self.size = 0
        return data

    def skip_partial_record(self, chunk):
        """While skipping, what of chunk follows the end of the skipped record (b"" if none yet).

        For a connection that must start at a record boundary when nothing could be kept.
        """
        if not self.skipping:
            return chunk
        chunk = bytes(chunk)  # a memoryview has no find (and this is the rare path)
        _, end = self.skip_scan.scan(chunk, until=0)
        if end < 0:
            self.dropped += len(chunk)
            return b""
        self.skip_scan = None
        self.dropped += end
        self.dropped_records += 1
        return chunk[end:]
