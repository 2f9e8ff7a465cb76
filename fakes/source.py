"""A fake source: connect to HOST:PORT and send one random tagged line every interval, forever.

Usage:
  fake-source --port PORT [--host HOST] [--interval SEC] [--id NAME]
  fake-source (-h | --help)

Each line is "<id> #<seq> <8-20 random lowercase letters> <crc32>", seq counting up from 1 and growing across
reconnects (so a gap at a destination shows), the crc32 (8 hex digits) of the text before it (so a torn line
shows); see fakes/lines.py.
Waits (retrying every interval) until it can connect, and reconnects whenever the connection drops.

Options:
  --port PORT     port to connect to
  --host HOST     host to connect to [default: 127.0.0.1]
  --interval SEC  seconds between lines, and between connect attempts [default: 0.5]
  --id NAME       tag on every line [default: src-PID]
  -h --help       show this help
"""
import itertools
import math
import os
import select
import signal
import socket
import sys
import time

from .cli import Stop, checked_host, handle_stop, parse, say, usage_error
from .lines import make_line

PROG = "fake-source"
VALUE_OPTIONS = ("--port", "--host", "--interval", "--id")
CONNECT_TIMEOUT_S = 3.0
WAIT_REPORT_S = 5.0  # while waiting for the destination, say so again this often


def number(text, kind, option, expected, valid):
    """text as kind when valid(value), else exit 2 naming the value as typed."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        usage_error(PROG, "bad %s %r: expected %s" % (option, text, expected))
    return value


def parse_args(argv):
    """(host, port, interval_s, source_id) from argv, or exit 2 naming what is wrong."""
    args = parse(PROG, __doc__, argv, VALUE_OPTIONS)
    port = number(args["--port"], int, "--port", "1-65535", lambda n: 1 <= n <= 65535)
    interval_s = number(args["--interval"], float, "--interval", "seconds > 0", lambda n: 0 < n < math.inf)
    source_id = "src-%d" % os.getpid() if args["--id"] == "src-PID" else args["--id"]
    if not source_id or not source_id.isprintable() or any(ch.isspace() for ch in source_id):
        usage_error(PROG, "bad --id %r: expected printable text without spaces" % source_id)
    return checked_host(PROG, args["--host"]), port, interval_s, source_id


def connect(host, port, interval_s):
    """A socket connected to host:port, retrying every interval; reports the wait, not every attempt."""
    waiting_since = reported_at = None
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            return sock
        except OSError as exc:
            reason = exc.strerror or str(exc)
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = reported_at = now
            say("waiting for %s:%s (%s); retrying every %g s" % (host, port, reason, interval_s))
        elif now - reported_at >= WAIT_REPORT_S:
            reported_at = now
            say("still waiting for %s:%s after %.0f s (%s)" % (host, port, now - waiting_since, reason))
        time.sleep(interval_s)


def stream(sock, source_id, sequence, interval_s):
    """Send a line every interval until the connection drops; return why it dropped."""
    next_send = time.monotonic()
    while True:
        # The proxy never answers, so readability between sends means EOF or a reset.
        remaining = next_send - time.monotonic()
        if remaining > 0 and select.select([sock], [], [], remaining)[0]:
            try:
                if not sock.recv(4096):
                    return "closed by peer"
            except OSError as exc:
                return exc.strerror or str(exc)
            continue
        line = make_line(source_id, next(sequence))
        try:
            sock.sendall(line.encode())
        except OSError as exc:
            return exc.strerror or str(exc)
        print("sent: " + line, end="", flush=True)
        next_send = time.monotonic() + interval_s


def run(host, port, interval_s, source_id):
    """Connect, stream, reconnect, forever."""
    sequence = itertools.count(1)
    while True:
        sock = connect(host, port, interval_s)
        try:
            say("connected: %s:%s from %s:%s" % (host, port, *sock.getsockname()[:2]))
            reason = stream(sock, source_id, sequence, interval_s)
        finally:
            sock.close()
        say("connection lost: %s; reconnecting" % reason)


def main(argv=None):
    host, port, interval_s, source_id = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, handle_stop)
    signal.signal(signal.SIGINT, handle_stop)
    try:
        say("%s: sending to %s:%s every %g s" % (source_id, host, port, interval_s))
        run(host, port, interval_s, source_id)
    except Stop as stop:
        say("stopped (%s)" % stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
