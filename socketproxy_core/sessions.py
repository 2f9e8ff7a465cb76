"""What a destination connection needs besides the stream: the session's state, and its replies.

A connection made after the first starts in the middle of the source's session. The destination on
the other end is a fresh one (a restarted Redis knows nothing of the AUTH and SELECT it was sent
before), so the forwarder sends it the session's state first (a preamble) and only then resumes the
stream. What the state is depends on the framing:

  resp                the last state-setting command of each kind delivered so far (RespSession),
                      and the open transaction, if the cut fell inside MULTI ... EXEC
  line, none          the source's first N records (lines; bytes without framing), when the user
                      names such a header with --session-preamble N (FirstRecords)

Both learn from the delivered stream only (bytes the destination acknowledged and that will not be
sent again), in order: the retaining path feeds them as it releases acknowledged bytes.

RespReplies reads what a Redis destination answers, to count its error replies and to check the
preamble's replies.
"""
import re

from socketproxy_core import framing

# The state-setting commands kept, in the order they are sent again: AUTH first (a server with
# requirepass refuses everything before it, HELLO included unless it carries AUTH itself), then HELLO
# (the protocol version, which changes every reply's format), the connection's name (what operators
# see in CLIENT LIST), the database every later command runs in, and a cluster replica's READONLY.
STATE_ORDER = ("auth", "hello", "setname", "select", "readonly")
STATE_NAMES = {"auth": "AUTH", "hello": "HELLO", "setname": "CLIENT SETNAME", "select": "SELECT",
               "readonly": "READONLY"}
MAX_KEPT_COMMAND = 64 * 1024  # a state-setting command longer than this is not one (nor kept)
MAX_TRANSACTION = 1024 * 1024  # an open transaction kept to be sent again, at most
# The start of a command worth a look: its name, in an array of bulk strings or inline.
INTERESTING = re.compile(
    rb"(?:\*\d+\r\n\$\d+\r\n|[ \t]*)(auth|hello|select|client|readonly|readwrite|reset|multi|exec|discard)"
    rb"(?:\r\n|[ \t\r\n])", re.IGNORECASE)


class RespSession:
    """The Redis session state delivered to a destination (see the module docstring)."""

    replies_checked = True  # the preamble's replies say whether the state was restored

    def __init__(self):
        self.scan = framing.RespScanner()
        self.partial = bytearray()  # the command cut by the end of the last data fed, its start kept
        self.partial_long = False  # ... longer than MAX_KEPT_COMMAND (and not in a transaction)
        self.state = {}  # kind -> the command, as delivered
        self.transaction = None  # MULTI and the commands queued after it, while no EXEC or DISCARD came
        self.transaction_commands = 0
        self.commands = 0  # whole commands delivered
        self.wanted = {}  # command number -> the command, once delivered (for a reply that differs)

    def feed(self, data):
        """data continues the delivered stream (bytes or a bytearray)."""
        pos, size = 0, len(data)
        while pos < size:
            _, end = self.scan.scan(data, pos, until=pos)
            if end < 0:
                if not self.partial_long:
                    self.partial += data[pos:]
                    if len(self.partial) > MAX_KEPT_COMMAND and self.transaction is None:
                        self.partial_long, self.partial = True, bytearray()
                return
            self.commands += 1
            if self.partial or self.partial_long:
                command = None if self.partial_long else bytes(self.partial + data[pos:end])
                self.partial, self.partial_long = bytearray(), False
                if command is not None:
                    self.command(command)
                elif self.transaction is not None:
                    self.transaction = None  # too long to keep: the transaction cannot be sent again
            elif self.transaction is not None or INTERESTING.match(data, pos, min(end, pos + 64)):
                command = bytes(data[pos:end])
                self.command(command)
            else:
                command = None
            if self.wanted and self.commands in self.wanted:
                self.wanted[self.commands] = command if command is not None else bytes(data[pos:end])
            pos = end

    def at_boundary(self):
        """The stream goes on from a command's start (a cut command is sent again, or dropped whole)."""
        self.scan = framing.RespScanner()
        self.partial, self.partial_long = bytearray(), False

    def command(self, record):
        """One whole command delivered."""
        args = command_args(record)
        name = args[0].lower() if args else b""
        if self.transaction is not None:
            if len(self.transaction) + len(record) > MAX_TRANSACTION:
                self.transaction = None
            else:
                self.transaction += record
                self.transaction_commands += 1
                if name in (b"exec", b"discard"):
                    self.transaction = None
                return
        if name == b"multi":
            self.transaction, self.transaction_commands = bytearray(record), 1
        elif name in (b"auth", b"hello", b"select", b"readonly"):
            self.state[name.decode()] = record
        elif name == b"client" and len(args) > 1 and args[1].lower() == b"setname":
            self.state["setname"] = record
        elif name == b"readwrite":
            self.state.pop("readonly", None)
        elif name == b"reset":
            self.state.clear()

    def preamble(self):
        """(bytes to send first, how many replies they bring, how many of those must not be errors,
        what the checked ones are)."""
        kinds = [kind for kind in STATE_ORDER if kind in self.state]
        data = b"".join(self.state[kind] for kind in kinds)
        replies = checked = len(kinds)
        if self.transaction is not None:
            data += self.transaction
            replies += self.transaction_commands
        return data, replies, checked, ", ".join(describe_state(kind, self.state[kind]) for kind in kinds)

    def hungry(self):
        return True


class FirstRecords:
    """The source's first N records (lines with --framing line, bytes without framing)."""

    replies_checked = False

    def __init__(self, count, framing_mode):
        self.count = count
        self.lines = framing_mode == "line"
        self.kept = bytearray()
        self.records = 0

    def feed(self, data):
        if not self.hungry():
            return
        if not self.lines:
            self.kept += data[:self.count - len(self.kept)]
            return
        pos = 0
        while self.records < self.count:
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.kept += data[pos:]
                return
            self.kept += data[pos:newline + 1]
            self.records += 1
            pos = newline + 1

    def at_boundary(self):
        if self.lines and self.records < self.count:
            del self.kept[len(self.kept) - len(self.kept.split(b"\n")[-1]):]  # a cut line is sent again

    def hungry(self):
        return (self.records if self.lines else len(self.kept)) < self.count

    def preamble(self):
        data = bytes(self.kept[:self.kept.rfind(b"\n") + 1]) if self.lines else bytes(self.kept)
        what = "%d %s" % (self.records if self.lines else len(data), "lines" if self.lines else "bytes")
        return data, 0, 0, "the first %s of the stream" % what


def session_memory(config):
    """What a forwarder keeps of the session for its next connections (None: nothing)."""
    if config.framing == "resp":
        return RespSession()
    if getattr(config, "session_preamble", 0):
        return FirstRecords(config.session_preamble, config.framing)
    return None


def command_args(record):
    """The arguments of one whole command (an array of bulk strings, or an inline command)."""
    if record[:1] != b"*":
        return record.split()
    args, pos = [], record.find(b"\r\n") + 2
    while pos < len(record) and record[pos:pos + 1] == b"$":
        newline = record.find(b"\r\n", pos)
        length = int(record[pos + 1:newline])
        args.append(record[newline + 2:newline + 2 + length])
        pos = newline + 4 + length
    return args


def show_command(record, limit=120):
    """A command as a log shows it: its arguments, AUTH's and HELLO's hidden."""
    if record is None:
        return "?"
    args = command_args(record)
    if args and args[0].lower() in (b"auth", b"hello"):
        args = args[:1] + [b"..."]
    text = " ".join(arg.decode(errors="replace") for arg in args)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_state(kind, record):
    """How a kept command shows in the log: AUTH without its password, SELECT with its number."""
    args = command_args(record)
    if kind == "select" and len(args) > 1:
        return "SELECT %s" % args[1].decode(errors="replace")
    if kind == "hello" and len(args) > 1:
        return "HELLO %s" % args[1].decode(errors="replace")
    return STATE_NAMES[kind]


# -- replies ---------------------------------------------------------------------------------------

MAX_CAPTURED = 16 * 1024 * 1024  # a reply held for a comparison, at most
SIMPLE = frozenset(b"+-:,_#(")  # one line each (- is an error)
BULK = frozenset(b"$=!")  # a length line, then that many bytes and \r\n (! is an error)
AGGREGATE = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2}  # elements per count
# Lines that all start with + or : and hold none of these are simple replies (+OK, :1, +QUEUED):
# counted without parsing.
NOT_PLAIN = re.compile(rb"[-$=!*~>%|,_#(]|\n(?=[^+:])")


class RespReplies:
    """Reads a Redis server's replies (RESP2 and RESP3) as they come, in chunks cut anywhere: counts
    the whole replies and the errors among them (an error inside an array, as EXEC returns, counts too)."""

    def __init__(self):
        self.replies = 0  # whole top-level replies read
        self.errors = 0
        self.stack = []  # elements left in each open aggregate
        self.line = b""  # a line cut by the end of the last chunk
        self.body = 0  # bytes left of a bulk string, \r\n included
        self.body_error = False  # that bulk string is an error (!): its text is the body
        self.error_text = b""
        self.broken = False  # not RESP: nothing more is read
        self.last_errors = []  # (reply number, text) of the errors of the last feed
        self.capture = None  # a list to append whole replies to (see ReplyComparison)
        self.carry = bytearray()  # the start of a reply cut by the end of the last chunk, when capturing

    def feed(self, data):
        """Read a chunk; returns the errors it ended as (top-level reply number, text) pairs. With
        capture (a list), each whole reply is appended to it as bytes."""
        self.last_errors = []
        if self.broken:
            return self.last_errors
        data = bytes(data)
        pos, size = 0, len(data)
        capture = self.capture
        if not (self.stack or self.line or self.body):  # the common case, at C speed
            plain_end = data.rfind(b"\n") + 1
            if plain_end and data[0] in b"+:" and not NOT_PLAIN.search(data, 0, plain_end):
                self.replies += data.count(b"\n", 0, plain_end)
                pos = plain_end
                if capture is not None:
                    capture.extend(data[:plain_end].splitlines(keepends=True))
        reply_start = pos  # of the reply being read, in data (its earlier bytes are in carry)
        while pos < size:
            replies = self.replies
            if self.body:
                take = min(self.body, size - pos)
                if self.body_error:
                    self.error_text += data[pos:pos + take]
                self.body -= take
                pos += take
                if not self.body:
                    self.element_done(self.body_error, self.error_text[:-2])
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self.line += data[pos:]
                    if len(self.line) > framing.MAX_LINE:
                        self.broken = True
                    break
                line = self.line + data[pos:newline + 1] if self.line else data[pos:newline + 1]
                self.line = b""
                pos = newline + 1
                self.header(line)
                if self.broken:
                    return self.last_errors
            if capture is not None and self.replies > replies:
                capture.append(bytes(self.carry) + data[reply_start:pos] if self.carry else data[reply_start:pos])
                self.carry = bytearray()
                reply_start = pos
        if capture is not None and reply_start < size:
            self.carry += data[reply_start:size]
            if len(self.carry) > MAX_CAPTURED:
                self.broken = True  # a reply too large to hold for a comparison
        return self.last_errors

    def header(self, line):
        kind = line[0] if line else 0
        if kind in SIMPLE:
            self.element_done(kind == 45, line[1:].rstrip(b"\r\n"))  # 45: -
            return
        try:
            count = int(line[1:].rstrip(b"\r\n"))
        except ValueError:
            self.broken = True
            return
        if kind in BULK:
            if count < 0:
                self.element_done(False, b"")
            else:
                self.body, self.body_error, self.error_text = count + 2, kind == 33, b""  # 33: !
        elif kind in AGGREGATE or kind == 124:  # 124: | (attributes, then the reply they describe)
            elements = count * AGGREGATE.get(kind, 2) + (kind == 124)
            if elements <= 0:
                self.element_done(False, b"")
            else:
                self.stack.append(elements)
        else:
            self.broken = True

    def restart(self):
        """A new connection: its replies start afresh (the counts stay)."""
        self.stack, self.line, self.body, self.broken = [], b"", 0, False
        self.carry = bytearray()

    def element_done(self, error, text):
        if error:
            self.errors += 1
        stack = self.stack
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
        if error:
            self.last_errors.append((self.replies + 1, text.decode(errors="replace")))
        if not stack:
            self.replies += 1
