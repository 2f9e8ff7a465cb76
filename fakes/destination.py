"""A fake destination: listen on HOST:PORT, accept any number of connections, print every line, tagged.

Usage:
  fake-destination --port PORT [--host HOST]
  fake-destination (-h | --help)

Prints "<peer>: <line>" for each complete line, "connected: <peer>" and "disconnected: <peer> (<reason>)";
an unterminated tail left at disconnect is printed with " [partial]". --port 0 picks a free port.

Options:
  --port PORT  port to listen on
  --host HOST  address to listen on [default: 127.0.0.1]
  -h --help    show this help
"""
import selectors
import signal
import socket
import sys
import time

from fakes.cli import Stop, checked_host, handle_stop, parse, say, usage_error

PROG = "fake-destination"
VALUE_OPTIONS = ("--port", "--host")
ACCEPT_PAUSE_S = 0.1
MAX_LINE = 65536  # a longer unterminated run is printed as a partial line rather than buffered forever


def parse_args(argv):
    """(host, port) from argv, or exit 2 naming what is wrong."""
    args = parse(PROG, __doc__, argv, VALUE_OPTIONS)
    text = args["--port"]
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        usage_error(PROG, "bad --port %r: expected 0-65535" % text)
    return checked_host(PROG, args["--host"]), int(text)


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


class Connection:
    """One accepted peer and the bytes of its unfinished line."""

    def __init__(self, sock, address):
        self.sock = sock
        self.peer = "%s:%s" % address[:2]
        self.pending = b""

    def receive(self):
        """Print the complete lines that arrived; return why the peer is gone, or None."""
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
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            show(self.peer, line.rstrip(b"\r"))
        if len(self.pending) > MAX_LINE:
            show(self.peer, self.pending, " [partial]")
            self.pending = b""
        return None

    def close(self, reason):
        if self.pending:
            show(self.peer, self.pending, " [partial]")
        self.sock.close()
        say("disconnected: %s (%s)" % (self.peer, reason))


def serve(listener):
    """Accept and print, one thread, until a signal stops it."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                except OSError as exc:  # out of descriptors: say so, pause, keep serving the others
                    say("accept failed: %s" % (exc.strerror or exc))
                    time.sleep(ACCEPT_PAUSE_S)
                    continue
                sock.setblocking(False)
                conn = Connection(sock, address)
                selector.register(sock, selectors.EVENT_READ, conn)
                say("connected: %s" % conn.peer)
                continue
            reason = key.data.receive()
            if reason:
                selector.unregister(key.fileobj)
                key.data.close(reason)


def main(argv=None):
    host, port = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, handle_stop)
    signal.signal(signal.SIGINT, handle_stop)
    try:
        listener = listen(host, port)
        say("listening on %s:%s" % listener.getsockname()[:2])
        serve(listener)
    except Stop as stop:
        say("stopped (%s)" % stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
