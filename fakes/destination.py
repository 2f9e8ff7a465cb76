"""A fake destination: listen on HOST:PORT, accept any number of connections, print every line, tagged.

Usage:
  fake-destination --port PORT [--host HOST] [--strict-lines] [--echo]
  fake-destination (-h | --help)

Prints "<peer>: <line>" for each complete line, "connected: <peer>" and "disconnected: <peer> (<reason>)";
an unterminated tail left at disconnect is printed with " [partial]". --port 0 picks a free port.
On SIGTERM or SIGINT it first reads and prints what every connection has already delivered, then exits 0.

With --strict-lines every record must be a complete line as the fake source sends it ("<id> #<seq> <letters>
<crc32>", see fakes/lines.py). The first one that is not (a torn first record of a connection, a cut or altered
line, a line longer than 64 KiB) is reported in one line, "malformed record from <peer> ...: '<record>'", naming
its place in the connection and showing at most 60 characters of it; that connection is closed at once (what
followed it is not printed) and counted; the other connections carry on.

With --echo every complete line is also sent back to its peer as it is printed (a request/response
server for --primary: the replies reach the source through the proxy).

Options:
  --port PORT     port to listen on
  --host HOST     address to listen on [default: 127.0.0.1]
  --strict-lines  close a connection at its first record that is not a fake source's line
  --echo          send every complete line back to its peer
  -h --help       show this help
"""
import os
import selectors
import signal
import socket
import sys
import time

from .cli import checked_host, parse, say, usage_error
from .lines import parse_line

PROG = "fake-destination"
VALUE_OPTIONS = ("--port", "--host")
FLAG_OPTIONS = ("--strict-lines", "--echo")
ACCEPT_PAUSE_S = 0.1
MAX_LINE = 65536  # a longer unterminated run is printed as a partial line rather than buffered forever
SHOWN_BAD = 60  # characters of a malformed record shown
ECHO = False  # --echo


def parse_args(argv):
    """(host, port, strict, echo) from argv, or exit 2 naming what is wrong."""
    args = parse(PROG, __doc__, argv, VALUE_OPTIONS, FLAG_OPTIONS)
    text = args["--port"]
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        usage_error(PROG, "bad --port %r: expected 0-65535" % text)
    return checked_host(PROG, args["--host"]), int(text), args["--strict-lines"], args["--echo"]


def listen(host, port):
    """A non-blocking listening socket on host:port, or exit 1 with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as exc:
        sys.stderr.write("%s: cannot listen on %s:%s: %s\n" % (PROG, host, port, exc.strerror or exc))
        sys.exit(1)
    listener.setblocking(False)
    return listener


def show(peer, data, marker=""):
    say("%s: %s%s" % (peer, data.decode("utf-8", "backslashreplace"), marker))


def shorten(data):
    """A malformed record as text: its first SHOWN_BAD characters, escaped, and its length when cut."""
    text = data.decode("utf-8", "backslashreplace")
    return repr(text[:SHOWN_BAD]) + (" ... (%d bytes)" % len(data) if len(text) > SHOWN_BAD else "")


def is_record(line):
    """True when line (without its newline) is a whole line of a fake source."""
    try:
        return parse_line(line.decode("utf-8")) is not None
    except UnicodeDecodeError:
        return False


class Tally:
    """What --strict-lines found over all connections."""

    def __init__(self):
        self.malformed = 0


class Connection:
    """One accepted peer and the bytes of its unfinished line; tally is a Tally under --strict-lines, else None."""

    def __init__(self, sock, address, tally):
        self.sock = sock
        self.peer = "%s:%s" % address[:2]
        self.pending = b""
        self.tally = tally
        self.records = 0  # complete lines printed

    def receive(self, until_empty=False):
        """Print the complete lines that arrived (with until_empty, all the kernel holds); return why
        the connection is over, or None."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionResetError:
                return "reset by peer"
            except OSError as exc:
                return exc.strerror or str(exc)
            if not data:
                return "closed by peer"
            reason = self.take(data)
            if reason or not until_empty:
                return reason

    def take(self, data):
        """Print the complete lines of pending + data; with strict, stop at a malformed one and say so."""
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if self.tally and not is_record(line):
                return self.reject(line, "")
            show(self.peer, line if self.tally else line.rstrip(b"\r"))
            self.records += 1
            if ECHO:
                self.echo(line + b"\n")
        if len(self.pending) > MAX_LINE:
            if self.tally:
                return self.reject(self.pending, "; no newline in %d bytes" % len(self.pending))
            show(self.peer, self.pending, " [partial]")
            self.pending = b""
        return None

    def echo(self, data):
        """Send data back, waiting for room (a fake: one slow peer may hold the others)."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # its end is seen by the next receive
        finally:
            self.sock.setblocking(False)

    def reject(self, line, why):
        """Report the malformed record, count it, drop the rest: the connection is to be closed."""
        self.tally.malformed += 1
        self.pending = b""
        place = "the first record" if self.records == 0 else "record %d" % (self.records + 1)
        say("malformed record from %s (%s of the connection%s): %s; closing the connection "
            "(%d malformed so far)" % (self.peer, place, why, shorten(line), self.tally.malformed))
        return "closed: malformed record"

    def drain(self):
        """Read and print what the kernel already holds for this peer; return why it is over, or None."""
        return self.receive(until_empty=True)

    def close(self, reason):
        if self.pending:
            show(self.peer, self.pending, " [partial]")
        self.sock.close()
        say("disconnected: %s (%s)" % (self.peer, reason))


def accept(listener, selector, tally):
    """Accept one peer and watch it."""
    try:
        sock, address = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return
    except OSError as exc:  # out of descriptors: say so, pause, keep serving the others
        say("accept failed: %s" % (exc.strerror or exc))
        time.sleep(ACCEPT_PAUSE_S)
        return
    sock.setblocking(False)
    conn = Connection(sock, address, tally)
    selector.register(sock, selectors.EVENT_READ, conn)
    say("connected: %s" % conn.peer)


def serve(listener, wake_fd, tally):
    """Accept and print, one thread, until SIGTERM or SIGINT; then drain and close every peer; return the signal."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listener")
    selector.register(wake_fd, selectors.EVENT_READ, "wake")
    while True:
        for key, _ in selector.select():
            if key.data == "listener":
                accept(listener, selector, tally)
            elif key.data == "wake":
                stops = [num for num in os.read(wake_fd, 64) if num in (signal.SIGTERM, signal.SIGINT)]
                if stops:
                    return finish(selector, signal.Signals(stops[0]).name)
            else:
                reason = key.data.receive()
                if reason:
                    selector.unregister(key.fileobj)
                    key.data.close(reason)


def finish(selector, signame):
    """Print what every peer already delivered (its kernel acknowledged it), close them all; return signame."""
    for key in list(selector.get_map().values()):
        if isinstance(key.data, Connection):
            key.data.close(key.data.drain() or "destination stopping (%s)" % signame)
    return signame


def main(argv=None):
    global ECHO
    host, port, strict, ECHO = parse_args(sys.argv[1:] if argv is None else argv)
    # The handlers only record: the signal number reaches serve() through the wake-up pipe, so a stop never
    # lands in the middle of printing a line, and serve() still prints what was received before it closes.
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    listener = listen(host, port)
    say("listening on %s:%s" % listener.getsockname()[:2])
    tally = Tally() if strict else None
    signame = serve(listener, wake_r, tally)
    listener.close()
    say("stopped (%s)%s" % (signame, "; malformed records: %d (each closed its connection)" % tally.malformed
                                     if strict else ""))
    sys.exit(0)


if __name__ == "__main__":
    main()
