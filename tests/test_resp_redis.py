"""--framing resp: one Redis command a record, checked against real Redis servers.

A source streams SET and INCR commands (values full of b"\\r\\n" and of text that reads as a command
when parsed from the wrong place) to two redis-servers through the proxy, written in pieces cut at
random offsets, while one of them is killed -9 and restarted five times. The untouched one must hold
exactly what was sent. The restarted one keeps no data across a kill (no persistence), so each of its
lives must hold exactly what running a suffix of the command stream on an empty database gives: the
proxy restarts every connection at a command boundary and resends all the killed one had not
acknowledged plus what was sent while it was down, so a torn command (which would create a key named
"injected", another stray key, a wrong value, a gap, or at least an error reply counted in Redis's
INFO stats) never reaches it.

The restart test needs redis-server on PATH (`make servers` installs it) and is skipped without it;
the invalid-stream test uses a recording fake destination.
"""
import random
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from support import connect_source, free_port, scaled, sees_close, wait_for_log, wait_until

FRAMING = "resp"
RETRY = "0.5"
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server is not on PATH (`make servers` installs it)")

RESTARTS = 5
KILL_AT = (0.12, 0.27, 0.42, 0.57, 0.72)  # fraction of the stream sent before each kill
HOLD_AT = 0.9  # the sender waits here until the last restart is done, so commands follow it
STREAM_SECONDS = 13.0
COMMANDS = 9000
INJECTIONS = (  # pieces of values that parse as commands (or break the parse) when read out of place
    b"\r\n", b"\n", b"\r\r\n", b"\r\nINCR injected\r\n", b"\r\nSET injected torn\r\n",
    b"*3\r\n$3\r\nSET\r\n$8\r\ninjected\r\n$4\r\ntorn\r\n", b"\r\n*2\r\n$4\r\nINCR\r\n$8\r\ninjected\r\n",
    b"$3\r\nSET\r\n", b"*2\r\n", b"\r\n$8\r\n",
)


class RespError(Exception):
    """An error reply from Redis, or a reply this client cannot read."""


def encode_command(*args):
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class RespClient:
    """A minimal Redis client over a socket: binary-safe bulk replies, read by length."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout))
        self.buf = bytearray()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            self._fill()

    def _exact(self, size):
        while len(self.buf) < size + 2:
            self._fill()
        data = bytes(self.buf[:size])
        if self.buf[size:size + 2] != b"\r\n":
            raise RespError("bulk reply of %d bytes not followed by CRLF" % size)
        del self.buf[:size + 2]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exact(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RespError("unexpected reply %r" % line)

    def pipeline(self, commands):
        """Send every command at once; their replies in order (an error reply raises)."""
        self.sock.sendall(b"".join(encode_command(*command) for command in commands))
        replies = [self._reply() for _ in commands]
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    def call(self, *args):
        return self.pipeline([args])[0]

    def error_replies(self):
        """Error replies this Redis has sent since it started: a torn command that reaches it makes one
        (an unknown command, a wrong number of arguments, a protocol error), even when it changes no key."""
        info = self.call(b"INFO", b"stats")
        return int(re.search(rb"total_error_replies:(\d+)", info).group(1))

    def dump(self):
        """Every key of the database and its value: {key: value}."""
        keys = self.call(b"KEYS", b"*")
        values = []
        for start in range(0, len(keys), 1000):
            values += self.call(b"MGET", *keys[start:start + 1000])
        return dict(zip(keys, values))


class RedisServer:
    """A redis-server child on a loopback port without persistence, that can be killed -9 and restarted."""

    def __init__(self, port, workdir, name):
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / ("%s.log" % name)
        self.proc = None

    def start(self):
        """Start it and wait until it answers PING."""
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.workdir)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or self.ping(), 20,
                   message=lambda: "redis-server on %d did not start:\n%s" % (self.port, self.log_tail()))
        assert self.proc.poll() is None, "redis-server on %d exited:\n%s" % (self.port, self.log_tail())

    def ping(self):
        try:
            client = RespClient(self.port, timeout=1.0)
        except OSError:
            return False
        try:
            return client.call(b"PING") == b"PONG"
        except (OSError, RespError):
            return False
        finally:
            client.close()

    def kill(self):
        """kill -9, waited for; the time it was gone by."""
        self.proc.kill()
        self.proc.wait()
        return time.monotonic()

    def stop(self):
        """terminate, then kill; always waited for."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(5))
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def client(self):
        return RespClient(self.port)

    def trouble(self, stream):
        """For a failure message: its error replies and keys that were never sent."""
        try:
            with self.client() as client:
                state = client.dump()
                return "%d error replies, %d keys, never sent: %s" % (
                    client.error_replies(), len(state), sorted(set(state) - stream.names)[:10])
        except (OSError, RespError) as exc:
            return "cannot read it: %r" % exc

    def log_tail(self):
        return self.log_path.read_text(errors="replace")[-2000:]


@pytest.fixture
def redis_server(tmp_path):
    """Factory: redis_server(name) starts a redis-server on a free port; all are ended at teardown."""
    made = []

    def make(name):
        workdir = tmp_path / name
        workdir.mkdir()
        server = RedisServer(free_port(), workdir, name)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


def random_value(rng):
    """Random bytes with pieces that look like RESP or inline commands spliced in."""
    value = bytearray(rng.randbytes(rng.randint(0, 250)))
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, len(value))
        value[at:at] = rng.choice(INJECTIONS)
    return bytes(value)


class Stream:
    """The whole command stream, built before it is sent.

    Command i is either SET key:<i> <random value> or INCR counter:<i // 100>, the INCRs half as
    RESP arrays, half inline. The first and the last command are SETs.
    """

    def __init__(self, seed, count=COMMANDS):
        rng = random.Random(seed)
        self.commands = []  # (kind, key, value)
        self.offsets = []  # where each command starts in data
        parts, offset = [], 0
        for i in range(count):
            if i in (0, count - 1) or rng.random() < 0.8:
                key, value = b"key:%d" % i, random_value(rng)
                self.commands.append(("set", key, value))
                data = encode_command(b"SET", key, value)
            else:
                key = b"counter:%d" % (i // 100)
                self.commands.append(("incr", key, None))
                data = b"INCR %s\r\n" % key if rng.random() < 0.5 else encode_command(b"INCR", key)
            self.offsets.append(offset)
            parts.append(data)
            offset += len(data)
        self.data = b"".join(parts)
        self.names = {key for _, key, _ in self.commands}

    def is_set(self, index):
        return self.commands[index][0] == "set"

    def set_index(self, key):
        """The command index of a SET key:<i>, or None for any other key."""
        match = re.fullmatch(rb"key:(\d+)", key)
        if match and int(match.group(1)) < len(self.commands) and self.is_set(int(match.group(1))):
            return int(match.group(1))
        return None

    def first_set_from(self, index):
        """The first SET at or after command index."""
        while not self.is_set(index):
            index += 1
        return index

    def state_after(self, start):
        """The database an empty Redis holds after running commands[start:]."""
        state = {}
        for kind, key, value in self.commands[start:]:
            if kind == "set":
                state[key] = value
            else:
                state[key] = b"%d" % (int(state.get(key, b"0")) + 1)
        return state


class Sender(threading.Thread):
    """Writes the stream to a source connection in pieces of 1..3000 bytes cut at random offsets,
    paced over STREAM_SECONDS, holding at HOLD_AT until release is set; records when each command's
    first byte was written (just before the write that carries it)."""

    def __init__(self, sock, stream, rng, release):
        super().__init__(daemon=True)
        self.sock = sock
        self.stream = stream
        self.rng = rng
        self.release = release
        self.sent = 0
        self.times = [None] * len(stream.commands)
        self.error = None
        self.done = threading.Event()

    def run(self):
        data, offsets = self.stream.data, self.stream.offsets
        total, offset, command = len(data), 0, 0
        start = time.monotonic()
        try:
            while offset < total:
                if offset >= HOLD_AT * total and not self.release.is_set():
                    self.release.wait(scaled(120))
                    start = time.monotonic() - STREAM_SECONDS * offset / total
                end = min(total, offset + self.rng.randint(1, 3000))
                now = time.monotonic()
                while command < len(offsets) and offsets[command] < end:
                    self.times[command] = now
                    command += 1
                self.sock.sendall(data[offset:end])
                offset = self.sent = end
                delay = start + STREAM_SECONDS * offset / total - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing of the source, not a wait for a result
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()

    def first_written_after(self, moment):
        """The first command whose first byte was written after moment (len(commands) if none)."""
        for index, written in enumerate(self.times):
            if written is None or written >= moment:
                return index
        return len(self.times)


def natural(key):
    name, _, number = key.rpartition(b":")
    return (name, int(number)) if number.isdigit() else (key, -1)


def describe(actual, expected, limit=6):
    """What differs between a database and the state it should hold."""
    missing = sorted(set(expected) - set(actual), key=natural)
    extra = sorted(set(actual) - set(expected), key=natural)
    wrong = sorted((k for k in expected if k in actual and actual[k] != expected[k]), key=natural)
    return "missing %d %s; unexpected %d %s; wrong value %d %s" % (
        len(missing), missing[:limit], len(extra), extra[:limit], len(wrong),
        [(k, actual[k][:40], expected[k][:40]) for k in wrong[:limit]])


def check_life(stream, state, latest_start, final, what):
    """The victim's database must be commands[s:p] run on an empty one, for one command boundary s no
    later than latest_start (p: up to where it got; the whole stream when final). Returns s.

    Mid-stream only the SET keys are compared (counters change under the reads)."""
    stray = sorted(set(state) - stream.names, key=natural)
    assert not stray, "%s: keys that were never sent (a torn command ran): %s" % (what, stray[:20])
    present = sorted(i for i in map(stream.set_index, state) if i is not None)
    assert present, "%s: no key at all" % what
    first, last = present[0], present[-1]
    if final:
        assert last == len(stream.commands) - 1, "%s: the last command is missing" % what
    assert first <= stream.first_set_from(latest_start), (
        "%s: starts at command %d, but command %d was written after the previous kill: %s"
        % (what, first, latest_start, describe(state, stream.state_after(latest_start))))
    previous_set = max([i for i in range(first) if stream.is_set(i)], default=-1)
    for start in range(previous_set + 1, first + 1):  # the INCRs just before the first SET may have run
        expected = stream.state_after(start)
        if not final:
            expected = {k: v for k, v in expected.items() if k.startswith(b"key:") and stream.set_index(k) <= last}
            got = {k: v for k, v in state.items() if k.startswith(b"key:")}
        else:
            got = state
        if got == expected:
            return start
    raise AssertionError("%s: not the result of commands %d.. on an empty database (a torn, lost or repeated "
                         "command): %s" % (what, first, describe(got, expected)))


@needs_redis
@pytest.mark.timeout(300)
def test_redis_killed_and_restarted_never_runs_a_torn_command(proxy, redis_server):
    """Two redis-servers behind --framing resp; one is killed -9 and restarted five times while the
    source streams: the untouched one ends with exactly what was sent, and every life of the restarted
    one holds exactly what the commands from some boundary on give, that boundary no later than the
    first command written after the kill before it; no stray key ("injected"), no wrong value, no gap,
    no error reply from either."""
    steady = redis_server("steady")
    victim = redis_server("victim")
    px = proxy(["127.0.0.1:%d" % steady.port, "127.0.0.1:%d" % victim.port], "--framing", FRAMING,
               "--buffer", "4M", "--retry-interval", RETRY)
    rng = random.Random(20261203)
    stream = Stream(seed=rng.random())
    total = len(stream.data)
    release = threading.Event()
    sock = connect_source(px.port)
    sender = Sender(sock, stream, random.Random(rng.random()), release)
    sender.start()
    kills, starts = [], [0]  # kill times; for each life, the first command it must hold
    try:
        for life in range(RESTARTS):
            fraction = KILL_AT[life]
            wait_until(lambda: sender.sent >= fraction * total or sender.done.is_set(), 60,
                       message=lambda: "the source sent only %d of %d bytes" % (sender.sent, total))
            assert sender.error is None, "the source's connection failed: %r\n%s" % (sender.error, px.log()[-3000:])
            # This life has got commands written since its start (the proxy is connected to it) ...
            marker = b"key:%d" % stream.first_set_from(starts[life])
            with victim.client() as client:
                wait_until(lambda: client.call(b"EXISTS", marker) == 1, 30,
                           message=lambda: "victim life %d never got %r (%s):\n%s"
                           % (life, marker, victim.trouble(stream), px.log()[-3000:]))
                # ... and holds a run of whole commands from a boundary no later than that, all of which
                # it ran without an error.
                check_life(stream, client.dump(), starts[life], False, "victim life %d" % life)
                assert client.error_replies() == 0, "victim life %d: a torn command reached it (%s)" % (
                    life, victim.trouble(stream))
            kills.append(victim.kill())
            time.sleep(rng.uniform(0.3, 1.0))  # the outage (the source keeps writing)
            victim.start()
            starts.append(sender.first_written_after(kills[-1]))
        release.set()
        sender.join(scaled(120))
        assert not sender.is_alive(), "the source is stuck after %d of %d bytes" % (sender.sent, total)
        assert sender.error is None, "the source's connection failed: %r\n%s" % (sender.error, px.log()[-3000:])
        assert starts[-1] < len(stream.commands), "nothing was written after the last kill"
    finally:
        release.set()
        sender.join(scaled(30))
        sock.close()
    last = b"key:%d" % (len(stream.commands) - 1)
    for server in (steady, victim):
        with server.client() as client:
            wait_until(lambda: client.call(b"EXISTS", last) == 1, 60,
                       message=lambda: "redis on %d never got the last command (%s):\n%s"
                       % (server.port, server.trouble(stream), px.log()[-3000:]))
    done = wait_for_log(px.log_path, r"dst=127.0.0.1:(\d+) forwarder done: sent (\d+) bytes, dropped (\d+) bytes",
                        timeout=30, count=2)
    with steady.client() as client:
        state = client.dump()
    assert state == stream.state_after(0), "the untouched redis: %s" % describe(state, stream.state_after(0))
    with victim.client() as client:
        state = client.dump()
    assert victim.proc.poll() is None and steady.proc.poll() is None
    check_life(stream, state, starts[-1], True, "victim after the last restart")
    for server in (steady, victim):
        with server.client() as client:
            assert client.error_replies() == 0, "redis on %d: a torn command reached it (%s)" % (
                server.port, server.trouble(stream))
    counts = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in done}
    assert counts[steady.port] == (total, 0), counts
    assert counts[victim.port][1] == 0, "the victim's forwarder dropped commands: %s" % (counts,)
    assert "not valid RESP" not in px.log()


def test_invalid_resp_closes_the_source_and_is_logged_once(proxy, recorder):
    """A source whose stream is not RESP (an array whose second element is not a bulk string) is
    closed by the proxy, logged once as "not valid RESP" however much more it writes, and no piece of
    the invalid command reaches the destination; the proxy goes on serving, and the next source's
    commands reach the destination byte for byte."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--framing", FRAMING, "--retry-interval", RETRY)
    bad = connect_source(px.port)
    before = encode_command(b"SET", b"before", b"1")
    bad.sendall(before + b"*2\r\n$3\r\nGET\r\nXYZ\r\n")
    for _ in range(20):  # more of the same while the connection lasts: still one log line
        try:
            bad.sendall(b"XYZ\r\n*9\r\n$1\r\n" * 100)
        except OSError:
            break
        time.sleep(0.02)  # pacing of the writes, not a wait for a result
    wait_until(lambda: sees_close(bad), 10, message=lambda: "the invalid source is still open:\n" + px.log())
    bad.close()
    wait_for_log(px.log_path, r"not valid RESP")
    good = connect_source(px.port)
    commands = b"".join(encode_command(b"SET", b"k%d" % i, b"v\r\n*1\r\n%d" % i) for i in range(200))
    commands += b"INCR inline\r\n" + encode_command(b"PING")
    good.sendall(commands)
    good.close()
    wait_until(lambda: commands in dest.streams(), 20,
               message=lambda: "the valid source's commands did not arrive: %r\n%s" % (dest.streams(), px.log()))
    wait_until(lambda: dest.closed_count() == len(dest.streams()), 20,
               message=lambda: "destination connections still open: %r" % dest.streams())
    assert px.proc.poll() is None, px.log()
    assert px.log().count("not valid RESP") == 1, px.log()
    # The whole command before the invalid one may be passed on, never a piece of the invalid one.
    others = [stream for stream in dest.streams() if stream != commands]
    assert all(stream in (b"", before) for stream in others), others


def test_a_bulk_string_one_byte_short_closes_the_source(proxy, recorder):
    """A command whose bulk string is one byte shorter than its length ($4 then "GET"), sent whole
    with a valid command after it: the source is closed, and no byte of it reaches the destination."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--framing", FRAMING, "--retry-interval", RETRY)
    bad = connect_source(px.port)
    bad.sendall(b"*1\r\n$4\r\nGET\r\n" + encode_command(b"PING"))
    wait_until(lambda: sees_close(bad), 20, message=lambda: "the invalid source is still open; the destination "
               "got %r\n%s" % (dest.streams(), px.log()))
    bad.close()
    wait_for_log(px.log_path, r"closing source: not valid RESP \(a bulk string not followed by \\r\\n\)")
    wait_until(lambda: dest.streams() and dest.closed_count() == len(dest.streams()), 20,
               message=lambda: "destination connections still open: %r" % dest.streams())
    assert dest.streams() == [b""], dest.streams()
    assert px.proc.poll() is None, px.log()
