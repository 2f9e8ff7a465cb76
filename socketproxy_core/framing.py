"""Where records end in a byte stream: lines, or Redis commands (RESP).

A scanner reads a stream forward from a record boundary and reports record ends as offsets just
after them. Lines need no state (one C-level search finds an end anywhere); a Redis command can only
be found by reading from the start of the command before it (a bulk string may hold b"\\r\\n"), so
the RESP scanner keeps its place between calls, and only the recovery path of a forwarder and the
receiver's validation feed it.
"""

MAX_LINE = 64 * 1024  # an inline command or a header longer than this is not RESP (Redis's own limit)
MAX_ITEMS = 1024 * 1024  # bulk strings in one command
MAX_BULK = 512 * 1024 * 1024  # bytes in one bulk string (Redis's proto-max-bulk-len)


class NotRecords(ValueError):
    """The stream is not in the framing's format; the message says what is wrong."""


class LineScanner:
    """Records end with b"\\n"."""

    def scan(self, data, start=0, stop=None, until=None):
        """Read data[start:stop]. Returns (records ended, offset after the last record end or -1).

        With until, stop at the first record end at or after until: its offset is returned instead.
        """
        stop = len(data) if stop is None else stop
        if until is not None:
            newline = data.find(b"\n", max(until - 1, start), stop)
            if newline < 0:
                return data.count(b"\n", start, stop), -1
            return data.count(b"\n", start, newline + 1), newline + 1
        newline = data.rfind(b"\n", start, stop)
        return data.count(b"\n", start, stop), (newline + 1 if newline >= 0 else -1)

    def copy(self):
        return self


class RespScanner:
    """Records are Redis commands: an array of bulk strings (*N, then $LEN and LEN bytes, each line
    ended by \\r\\n), or an inline command (a line not starting with *). Raises NotRecords."""

    def __init__(self):
        self.items = 0  # bulk strings left in the command being read (0: at a command's start)
        self.body = 0  # bytes left of the bulk string being read, its \r\n included
        self.line = b""  # the start of a line cut by the end of the data

    def copy(self):
        twin = RespScanner()
        twin.items, twin.body, twin.line = self.items, self.body, self.line
        return twin

    def scan(self, data, start=0, stop=None, until=None):
        """As LineScanner.scan; data must be bytes or a bytearray."""
        stop = len(data) if stop is None else stop
        pos, records, last = start, 0, -1
        while pos < stop:
            if not (self.items or self.line):  # at a command's start: most are read whole, at once
                end = whole_command(data, pos, stop)
                if end > 0:
                    pos = last = end
                    records += 1
                    if until is not None and pos >= until:
                        return records, last
                    continue
            if self.body:
                take = min(self.body, stop - pos)
                if self.body - take < 2:  # the bulk string's closing \r\n is (partly) in this part
                    self.check_crlf(data, pos, take)
                pos += take
                self.body -= take
                if self.body or not self.end_item():
                    continue
            else:
                newline = data.find(b"\n", pos, stop)
                if newline < 0:
                    self.line += bytes(data[pos:stop])
                    if len(self.line) > MAX_LINE:
                        raise NotRecords("a line of more than %d bytes" % MAX_LINE)
                    break
                line = self.line + bytes(data[pos:newline]) if self.line else bytes(data[pos:newline])
                self.line = b""
                pos = newline + 1
                if len(line) > MAX_LINE:
                    raise NotRecords("a line of more than %d bytes" % MAX_LINE)
                if not self.header(line):
                    continue
            records += 1
            last = pos
            if until is not None and pos >= until:
                return records, last
        return records, (-1 if until is not None else last)

    def header(self, line):
        """A complete line outside a bulk string; whether it ends a command."""
        if self.items:
            self.body = number(line, b"$", "a bulk string length", 0, MAX_BULK) + 2
            return False
        if line[:1] != b"*":
            return True  # an inline command (an empty line is one Redis ignores)
        count = number(line, b"*", "a command length", -1, MAX_ITEMS)
        if count <= 0:
            return True  # an empty command: Redis reads and ignores it
        self.items = count
        return False

    def end_item(self):
        """A bulk string is complete; whether it ends the command."""
        self.items -= 1
        return not self.items

    def check_crlf(self, data, pos, take):
        """The bytes taken that are the bulk string's final \r\n must be exactly that."""
        for left, expected in ((2, 13), (1, 10)):
            if self.body >= left > self.body - take and data[pos + self.body - left] != expected:
                raise NotRecords("a bulk string not followed by \\r\\n")


def whole_command(data, pos, stop):
    """The end of the well-formed array command that starts at pos and ends before stop; -1 for
    anything else (a command cut by stop, an inline one, an error: the step by step reading sees it)."""
    if data[pos] != 42:  # *
        return -1
    newline = data.find(b"\r\n", pos, stop)
    digits = data[pos + 1:newline]
    if newline < 0 or not digits.isdigit() or len(digits) > 6:
        return -1
    pos = newline + 2
    for _ in range(int(digits)):
        if pos >= stop or data[pos] != 36:  # $
            return -1
        newline = data.find(b"\r\n", pos, stop)
        digits = data[pos + 1:newline]
        if newline < 0 or not digits.isdigit() or len(digits) > 9:
            return -1
        pos = newline + 4 + int(digits)
        if pos > stop or data[pos - 2] != 13 or data[pos - 1] != 10:
            return -1
    return pos


def number(line, marker, what, low, high):
    """The integer of a header line such as b"$12\\r"; raises NotRecords."""
    if line[:1] != marker:
        raise NotRecords("expected %s (%r), got %r" % (what, marker.decode(), bytes(line[:20])))
    if not line.endswith(b"\r"):
        raise NotRecords("%s line not ended by \\r\\n" % what)
    digits = line[1:-1]
    negative = digits[:1] == b"-"
    if not (digits[1:] if negative else digits).isdigit():
        raise NotRecords("%s that is not a number: %r" % (what, bytes(digits[:20])))
    value = int(digits)
    if not low <= value <= high:
        raise NotRecords("%s out of range: %d" % (what, value))
    return value


def scanner(framing):
    """A scanner for --framing (none has no records: None)."""
    return {"line": LineScanner, "resp": RespScanner}.get(framing, lambda: None)()
