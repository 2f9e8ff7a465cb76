"""Sessions: what a reconnected destination needs besides the bytes, what its replies say, and which
ends of a session are not warnings.

- With --framing resp a forwarder remembers the last state-setting command of each kind it has
  delivered (AUTH, HELLO, SELECT, CLIENT SETNAME, READONLY) and, on every connection after the first,
  sends them first and reads their replies before the stream resumes. An error reply to one of them
  makes the attempt a failed one: a WARNING line with the reply (-WRONGPASS ..., -NOAUTH ...), retried
  with backoff, and nothing of the stream is sent on that connection.
- With --framing resp a forwarder parses its destination's replies and counts the error replies:
  socketproxy_destination_error_replies_total{destination="HOST:PORT"}.
- Both hold for the mirrors of --primary with --framing resp.
- A session that ends the way its protocol ends it (with --primary, an HTTP/1.0 server closing after
  its reply, and the shadow closing with it) logs no WARNING.

Real servers (`make servers` installs them): redis-server started with `--requirepass` where a test
says so, killed -9 and restarted on the same port without persistence; nginx and ab. Each test is
skipped with the reason when its servers are missing.
"""
import collections
import re
import socket
import subprocess
import threading
import time

import pytest

from fakes.demo import die_with_parent
from fakes.mirror_demo import (RECONNECTED, Nginx, RespError, ab_ok, encode, end_process, find_tool, missing,
                               read_reply, run_ab, tail)
from support import connect_source, free_port, scaled, scrape, wait_for_log, wait_until

SECRET = "secret"
RETRY = ("--retry-interval", "0.5")
OUTAGE_S = 0.3  # a killed redis is restarted after this (the source keeps writing meanwhile)
ERROR_REPLIES = "socketproxy_destination_error_replies_total"
RECONNECTS = "socketproxy_destination_reconnects_total"
LEVEL = re.compile(r"^\S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[\d+\] ")

needs_redis = pytest.mark.skipif(bool(missing(("redis-server",))),
                                 reason="redis-server is not installed (`make servers` installs it)")
needs_http = pytest.mark.skipif(bool(missing(("nginx", "ab"))), reason="%s not installed (`make servers` installs "
                                "nginx and apache2-utils)" % ", ".join(missing(("nginx", "ab"))))


# -- a redis-server with or without a password --------------------------------------------------------

class Redis:
    """A redis-server child on a loopback port, no persistence, optionally with --requirepass; it can be
    killed -9 and restarted on the same port (with another password too). Every call of the test is
    made on a connection of its own, authenticated with the current password."""

    def __init__(self, name, port, workdir):
        self.name = name
        self.port = port
        self.dir = workdir / name
        self.dir.mkdir()
        self.log_path = workdir / ("%s.log" % name)
        self.password = None
        self.proc = None

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def start(self, password=None, timeout=20.0):
        """Start it (with requirepass when password is given) and wait until it answers PING."""
        argv = [find_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir)]
        if password:
            argv += ["--requirepass", password]
        self.password = password
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        wait_until(lambda: self.proc.poll() is not None or self.ping(), timeout,
                   message=lambda: "redis %s on %d did not start: %s" % (self.name, self.port, tail(self.log_path)))
        assert self.proc.poll() is None, "redis %s exited: %s" % (self.name, tail(self.log_path))
        return self

    def call(self, *args, db=None):
        """One command (after AUTH, and SELECT db when given) on a connection of its own; an error reply
        raises RespError."""
        commands = ([("AUTH", self.password)] if self.password else []) + ([("SELECT", db)] if db is not None
                                                                           else []) + [args]
        with socket.create_connection(("127.0.0.1", self.port), timeout=scaled(10)) as sock:
            sock.sendall(b"".join(encode(*command) for command in commands))
            buf = bytearray()
            replies = [read_reply(sock, buf) for _ in commands]
        return replies[-1]

    def ping(self):
        try:
            return self.call("PING") == b"PONG"
        except (OSError, RespError):
            return False

    def has(self, key, db=0):
        try:
            return self.call("EXISTS", key, db=db) == 1
        except (OSError, RespError):
            return False

    def dbsize(self, db=0):
        return self.call("DBSIZE", db=db)

    def contents(self, db=0):
        """{key: value} of a database (str both)."""
        keys = self.call("KEYS", "*", db=db)
        values = []
        for start in range(0, len(keys), 1000):
            values += self.call("MGET", *keys[start:start + 1000], db=db)
        return {k.decode(): (v.decode() if v is not None else None) for k, v in zip(keys, values)}

    def errorstats(self):
        """{error prefix: count} of the error replies it has sent since it started (INFO errorstats)."""
        info = self.call("INFO", "errorstats").decode()
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"^errorstat_(\S+?):count=(\d+)", info, re.M)}

    def state(self):
        """For a failure message: keys per database, error replies."""
        try:
            return "db0 %d keys, db5 %d keys, errorstats %s" % (self.dbsize(0), self.dbsize(5), self.errorstats())
        except (OSError, RespError) as exc:
            return "cannot read it: %r" % exc

    def kill(self):
        """kill -9, waited for; the time it was gone by."""
        self.proc.kill()
        self.proc.wait()
        return time.monotonic()

    def stop(self):
        if self.proc is not None:
            end_process(self.proc)


@pytest.fixture
def redis(tmp_path):
    """Factory: redis(name, password=None) starts a redis-server on a free port; all ended at teardown."""
    made = []

    def make(name, password=None):
        server = Redis(name, free_port(), tmp_path)
        made.append(server)
        return server.start(password)

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def nginx(tmp_path):
    made = []

    def make(name):
        server = Nginx(name, free_port(), tmp_path)
        made.append(server)
        return server.start(scaled(20))

    yield make
    for server in made:
        server.stop()


# -- the source ---------------------------------------------------------------------------------------

class Commands(threading.Thread):
    """A source: the prelude commands, then SET key:<i> <i> for i in range(count), paced so that command
    i goes out at start + seconds * i / count. Holds before command hold_at until release is set; ends
    early when stop is set. With replies (a client of --primary) it reads each command's reply before
    the next one, and an error reply ends it. Records when each SET was written."""

    def __init__(self, sock, prelude, count, seconds, hold_at=None, replies=False):
        super().__init__(daemon=True)
        self.sock = sock
        self.prelude = prelude
        self.count = count
        self.seconds = seconds
        self.hold_at = hold_at
        self.replies = replies
        self.buf = bytearray()
        self.times = [None] * count
        self.sent = 0  # SETs written
        self.release, self.holding, self.stop, self.done = (threading.Event() for _ in range(4))
        self.error = None

    def write(self, *command):
        self.sock.sendall(encode(*command))
        if self.replies:
            read_reply(self.sock, self.buf)

    def run(self):
        try:
            for command in self.prelude:
                self.write(*command)
            start = time.monotonic()
            for i in range(self.count):
                if self.stop.is_set():
                    break
                if i == self.hold_at and not self.release.is_set():
                    self.holding.set()
                    self.release.wait(scaled(120))
                    start = time.monotonic() - self.seconds * i / self.count
                delay = start + self.seconds * i / self.count - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing of the source, not a wait for a result
                self.times[i] = time.monotonic()
                self.write("SET", "key:%d" % i, i)
                self.sent = i + 1
        except (OSError, RespError) as exc:
            self.error = exc
        finally:
            self.done.set()

    def first_written_after(self, moment):
        """The first SET written after moment (count if none)."""
        for index, written in enumerate(self.times):
            if written is None or written >= moment:
                return index
        return self.count

    def finish(self, px):
        """Release it, wait for its end; it must have written everything without an error."""
        self.release.set()
        self.join(scaled(60))
        assert not self.is_alive(), "the source is stuck after %d of %d SETs\n%s" % (self.sent, self.count,
                                                                                       px.log()[-3000:])
        assert self.error is None, "the source's connection failed: %r\n%s" % (self.error, px.log()[-3000:])


def indices(contents):
    """The i of every key:<i> of a database's contents, sorted; other keys raise."""
    found = []
    for key in contents:
        match = re.fullmatch(r"key:(\d+)", key)
        assert match, "a key that was never sent: %r" % key
        found.append(int(match.group(1)))
    return sorted(found)


def span(numbers):
    return "none" if not numbers else "key:%d..key:%d" % (numbers[0], numbers[-1])


def check_suffix(contents, count, latest_start, what):
    """contents must be key:j..key:<count-1>, every key once, value its index, j <= latest_start."""
    present = indices(contents)
    assert present, "%s: no key at all" % what
    first = present[0]
    gaps = sorted(set(range(first, count)) - set(present))
    assert not gaps, "%s: not a contiguous suffix: holds %s, %d missing: %s" % (what, span(present), len(gaps),
                                                                                  gaps[:10])
    assert first <= latest_start, "%s: starts at key:%d, but key:%d was written after its last restart" % (
        what, first, latest_start)
    wrong = [(k, v) for k, v in contents.items() if v != k.split(":")[1]]
    assert not wrong, "%s: values that are not their key's index: %s" % (what, wrong[:10])


def metric(port, name, address):
    """A destination's sample of a scrape, None when the scrape has no such sample."""
    return scrape(port).get((name, (("destination", address),)))


class Progress:
    """Whether a redis database stopped growing while the source can send nothing more (it holds or
    has ended): then a key it lacks will not come."""

    def __init__(self, server, source, db, quiet_s=2.0):
        self.server, self.source, self.db, self.quiet_s = server, source, db, scaled(quiet_s)
        self.size, self.changed = None, time.monotonic()

    def stalled(self):
        size = self.server.dbsize(self.db)
        if size != self.size:
            self.size, self.changed = size, time.monotonic()
        idle = self.source.holding.is_set() or self.source.done.is_set()
        return idle and time.monotonic() - self.changed > self.quiet_s


def group_gone(metrics_port):
    """Every group has ended and been folded into the totals."""
    try:
        return scrape(metrics_port).get(("socketproxy_sources_active", ())) == 0
    except OSError:
        return False


# -- the tests ----------------------------------------------------------------------------------------

COMMANDS = 3000
STREAM_S = 5.0  # the 3,000 SETs go out over this long: one every 1.7 ms
KILL_AT = (0.20, 0.45, 0.70)  # B is killed once it has run this fraction of the SETs (in this life)
HOLD_AT = 0.90  # the source waits here until B's last restart is done, so SETs follow it


@needs_redis
@pytest.mark.timeout(120)
def test_a_restarted_redis_with_a_password_gets_auth_and_select_again(proxy, redis):
    """Fan-out --framing resp to two redis-server with requirepass: the source sends AUTH, SELECT 5 and
    3,000 SETs, B is killed -9 and restarted three times meanwhile. A ends with the 3,000 keys in db 5;
    B with a contiguous suffix of them in db 5 (every SET from its last restart on), nothing in db 0 and
    not one error reply (no NOAUTH: AUTH and SELECT were sent first on each new connection); the error
    replies counter is 0 for both, and the log shows three reconnects to B."""
    a, b = redis("a", SECRET), redis("b", SECRET)
    metrics_port = free_port()
    px = proxy([a.address, b.address], "--framing", "resp", *RETRY, "--metrics", "127.0.0.1:%d" % metrics_port)
    sock = connect_source(px.port)
    source = Commands(sock, [("AUTH", SECRET), ("SELECT", 5)], COMMANDS, STREAM_S, hold_at=int(HOLD_AT * COMMANDS))
    source.start()
    kills = []
    try:
        for life, fraction in enumerate(KILL_AT):
            marker = "key:%d" % int(fraction * COMMANDS)
            progress = Progress(b, source, 5)
            wait_until(lambda: b.has(marker, db=5) or progress.stalled(), 60,
                       message=lambda: "B never ran %s: %s\n%s" % (marker, b.state(), px.log()[-3000:]))
            assert b.has(marker, db=5), (
                "B (%s) never ran %s in db 5 though the source has written %d SETs; B holds %s\n%s" % (
                    "before its first kill" if not life else "restarted %d times" % life, marker, source.sent,
                    b.state(), px.log()[-3000:]))
            assert not b.errorstats(), "B (life %d) sent error replies: %s" % (life, b.state())
            kills.append(b.kill())
            time.sleep(OUTAGE_S)  # the outage, while the source goes on writing
            b.start(SECRET)
        latest_start = source.first_written_after(kills[-1])
        source.finish(px)
        assert latest_start < COMMANDS, "nothing was written after B's last restart"
    finally:
        source.release.set()
        source.stop.set()
        source.join(scaled(10))
        sock.close()
    wait_for_log(px.log_path, r"group ended", timeout=60)
    last = "key:%d" % (COMMANDS - 1)
    for server in (a, b):
        wait_until(lambda: server.has(last, db=5) or server.has(last, db=0), 30,
                   message=lambda: "redis %s never ran the last SET: %s\n%s" % (server.name, server.state(),
                                                                               px.log()[-3000:]))
    assert a.dbsize(0) == 0, "A's db 0 has keys: %s" % a.state()
    a_keys = a.contents(5)
    check_suffix(a_keys, COMMANDS, 0, "A's db 5")
    assert len(a_keys) == COMMANDS
    assert b.dbsize(0) == 0, "B's db 0 holds %s: SETs ran there after a restart (SELECT 5 not sent again): %s" % (
        span(indices(b.contents(0))), b.state())
    check_suffix(b.contents(5), COMMANDS, latest_start, "B's db 5 after its last restart")
    errors = b.errorstats()
    assert "NOAUTH" not in errors, "B got SETs before AUTH after its last restart: %s" % errors
    assert not errors, "B sent error replies after its last restart: %s" % errors
    reconnects = re.findall(RECONNECTED % b.port, px.log())
    assert len(reconnects) == 3, "%d reconnects to B in the log, 3 expected:\n%s" % (len(reconnects),
                                                                                     px.log()[-3000:])
    wait_until(lambda: group_gone(metrics_port), 30, message="the group is still counted as active")
    for server in (a, b):
        value = metric(metrics_port, ERROR_REPLIES, server.address)
        assert value == 0, "%s for %s: %r" % (ERROR_REPLIES, server.name, value)
    assert metric(metrics_port, RECONNECTS, b.address) == 3
    assert metric(metrics_port, RECONNECTS, a.address) == 0


MIRROR_COMMANDS = 800
MIRROR_STREAM_S = 3.2  # one SET every 4 ms (each waits for its reply)
SHADOW_KILL_AT = 0.35
MIRROR_HOLD_AT = 0.75


@needs_redis
@pytest.mark.timeout(120)
def test_a_restarted_shadow_gets_select_again(proxy, redis):
    """--primary --framing resp --mirror-policy wait, a primary and a shadow redis: a client sends
    SELECT 5 and 800 SETs (reading each reply), the shadow is killed -9 and restarted once. The primary
    ends with the 800 keys in db 5; the shadow with nothing in db 0 and, in db 5, a contiguous suffix
    of the SETs that holds at least every one written after its restart."""
    primary, shadow = redis("primary"), redis("shadow")
    px = proxy([primary.address, shadow.address], "--primary", "--framing", "resp", "--mirror-policy", "wait",
               *RETRY)
    sock = connect_source(px.port)
    client = Commands(sock, [("SELECT", 5)], MIRROR_COMMANDS, MIRROR_STREAM_S,
                      hold_at=int(MIRROR_HOLD_AT * MIRROR_COMMANDS), replies=True)
    client.start()
    try:
        marker = "key:%d" % int(SHADOW_KILL_AT * MIRROR_COMMANDS)
        progress = Progress(shadow, client, 5)
        wait_until(lambda: shadow.has(marker, db=5) or progress.stalled(), 60,
                   message=lambda: "the shadow never ran %s: %s" % (marker, shadow.state()))
        assert shadow.has(marker, db=5), "the shadow never ran %s in db 5 (client at %d SETs, %r): %s\n%s" % (
            marker, client.sent, client.error, shadow.state(), px.log()[-3000:])
        killed = shadow.kill()
        time.sleep(OUTAGE_S)  # the outage, while the client goes on
        shadow.start()
        latest_start = client.first_written_after(killed)
        client.finish(px)
    finally:
        client.release.set()
        client.stop.set()
        client.join(scaled(10))
        sock.close()
    wait_for_log(px.log_path, r"group ended", timeout=60)
    last = "key:%d" % (MIRROR_COMMANDS - 1)
    wait_until(lambda: shadow.has(last, db=5) or shadow.has(last, db=0), 30,
               message=lambda: "the shadow never ran the last SET: %s\n%s" % (shadow.state(), px.log()[-3000:]))
    assert primary.dbsize(0) == 0, primary.state()
    primary_keys = primary.contents(5)
    check_suffix(primary_keys, MIRROR_COMMANDS, 0, "the primary's db 5")
    assert len(primary_keys) == MIRROR_COMMANDS
    assert shadow.dbsize(0) == 0, (
        "the shadow's db 0 holds %s: the SETs after its restart ran there (SELECT 5 not sent again); "
        "db 5 holds %s; %s" % (span(indices(shadow.contents(0))), span(indices(shadow.contents(5))),
                               shadow.state()))
    check_suffix(shadow.contents(5), MIRROR_COMMANDS, latest_start, "the shadow's db 5 after its restart")
    assert not shadow.errorstats(), shadow.state()


def wrongpass_warning(log, dest):
    """The WARNING lines of the log that name dest, carry its WRONGPASS reply and say it is retried."""
    return [line for line in log.splitlines()
            if LEVEL.match(line) and LEVEL.match(line).group(1) == "WARNING" and dest.address in line
            and re.search(r"WRONGPASS|invalid username-password", line)
            and re.search(r"reconnect|retry", line, re.I)]


@needs_redis
@pytest.mark.timeout(120)
def test_a_refused_auth_is_a_failed_attempt_retried_until_the_password_is_back(proxy, redis):
    """Fan-out --framing resp to two redis with requirepass secret; the source sends AUTH secret and
    SETs. B is restarted with another password: the proxy logs a WARNING naming B with its WRONGPASS
    reply and that it retries, attempts again (B sees AUTH refused twice at least), and B gets nothing
    unauthenticated (no key, no NOAUTH). B restarted with secret again gets the stream again (its keys
    grow, no error reply); A gets every SET throughout."""
    a, b = redis("a", SECRET), redis("b", SECRET)
    px = proxy([a.address, b.address], "--framing", "resp", *RETRY)
    sock = connect_source(px.port)
    source = Commands(sock, [("AUTH", SECRET)], 100000, 200.0)  # one SET every 2 ms until stopped
    source.start()
    try:
        wait_until(lambda: b.dbsize() >= 200 or source.done.is_set(), 30, message=lambda: b.state())
        assert source.error is None, source.error
        b.kill()
        b.start("other")
        wait_until(lambda: wrongpass_warning(px.log(), b), 15,
                   message=lambda: "no WARNING naming B with WRONGPASS and a retry; B (password other): %s; "
                   "log:\n%s" % (b.state(), px.log()[-3000:]))
        wait_until(lambda: b.errorstats().get("WRONGPASS", 0) >= 2, 15,
                   message=lambda: "the refused AUTH was not attempted again: %s\n%s" % (b.state(), px.log()[-3000:]))
        assert b.dbsize() == 0, "B got SETs while AUTH is refused: %s" % b.state()
        assert "NOAUTH" not in b.errorstats(), "SETs were sent to B without AUTH: %s" % b.state()
        b.kill()
        b.start(SECRET)
        wait_until(lambda: b.dbsize() > 0, 15,
                   message=lambda: "B with the password back got nothing: %s\n%s" % (b.state(), px.log()[-3000:]))
        size = b.dbsize()
        wait_until(lambda: b.dbsize() > size, 15, message=lambda: "B's keys do not grow: %s" % b.state())
        assert not b.errorstats(), b.state()
        assert source.error is None and not source.done.is_set(), source.error
        source.stop.set()
        source.join(scaled(10))
    finally:
        source.stop.set()
        source.join(scaled(10))
        sock.close()
    wait_for_log(px.log_path, r"group ended", timeout=60)
    wait_until(lambda: a.dbsize() == source.sent, 30,
               message=lambda: "A holds %d keys of the %d SETs: %s" % (a.dbsize(), source.sent, a.state()))


@needs_redis
@pytest.mark.timeout(120)
def test_error_replies_are_counted_per_destination(proxy, redis, recorder):
    """Fan-out --framing resp to a redis and a fake destination that never replies: SET s abc, then
    five INCR s (each answered -ERR by redis). The error replies counter of the redis reaches 5 while
    the source is connected; once the group has ended it is 5 for the redis and 0 for the fake."""
    server = redis("r")
    fake = recorder()
    metrics_port = free_port()
    px = proxy([server.address, "127.0.0.1:%d" % fake.port], "--framing", "resp", *RETRY,
               "--metrics", "127.0.0.1:%d" % metrics_port)
    wait_until(lambda: "serving metrics" in px.log())
    sock = connect_source(px.port)
    commands = encode("SET", "s", "abc") + encode("INCR", "s") * 5 + encode("PING")
    sock.sendall(commands)
    wait_until(lambda: server.errorstats().get("ERR") == 5, 20, message=server.state)
    try:
        wait_until(lambda: metric(metrics_port, ERROR_REPLIES, server.address) == 5, 20,
                   message=lambda: "%s for the redis: %r (redis sent %s)\n%s" % (
                       ERROR_REPLIES, metric(metrics_port, ERROR_REPLIES, server.address), server.errorstats(),
                       px.log()[-2000:]))
    finally:
        sock.close()
    wait_until(lambda: group_gone(metrics_port), 30, message="the group is still counted as active")
    wait_until(lambda: fake.streams() == [commands] and fake.closed_count() == 1, 20,
               message=lambda: "the fake destination got %r" % fake.streams())
    assert metric(metrics_port, ERROR_REPLIES, server.address) == 5
    assert metric(metrics_port, ERROR_REPLIES, "127.0.0.1:%d" % fake.port) == 0


AB_REQUESTS, AB_CONCURRENCY = 2000, 10


@needs_http
@pytest.mark.timeout(120)
def test_http10_sessions_through_the_primary_log_no_warning(proxy, nginx):
    """nginx as primary and shadow, --primary --mirror-policy wait; ab -n 2000 -c 10 without -k (HTTP/1.0:
    the server closes after each reply, and the shadow closes with it): every request succeeds, and once
    every group has ended the proxy's log has no line at WARNING or above."""
    primary, shadow = nginx("primary"), nginx("shadow")
    px = proxy(["127.0.0.1:%d" % primary.port, "127.0.0.1:%d" % shadow.port], "--primary", "--mirror-policy",
               "wait", *RETRY)
    result = run_ab("http://127.0.0.1:%d/index.html" % px.port, AB_REQUESTS, AB_CONCURRENCY, scaled(90),
                    keepalive=False)
    assert ab_ok(result, AB_REQUESTS), "%s\n%s" % (result, px.log()[-3000:])
    wait_until(lambda: len(primary.requests()) == AB_REQUESTS, 20,
               message=lambda: "the primary logged %d requests" % len(primary.requests()))
    wait_for_log(px.log_path, r"receiver \d+ for \S+ ended", timeout=60, count=AB_REQUESTS)
    lines = px.log().splitlines()
    bad = [line for line in lines if not LEVEL.match(line) or LEVEL.match(line).group(1) not in ("DEBUG", "INFO")]
    kinds = collections.Counter(re.sub(r"\d+", "N", LEVEL.sub("", line).split(" ", 1)[-1])[:120] for line in bad)
    assert not bad, "%d of %d log lines at WARNING or above (or not log lines), %d kinds: %s\nfirst ones:\n%s" % (
        len(bad), len(lines), len(kinds), kinds.most_common(5), "\n".join(bad[:6]))


@needs_redis
@pytest.mark.timeout(120)
def test_a_shadow_reply_that_differs_from_the_primary_is_counted_and_logged_with_its_command(proxy, redis):
    """--primary --framing resp, a shadow where one key was set beforehand to another value: of 20 SETs
    and 20 GETs through the proxy, only GET key:7 is answered differently; the mirror counts one mismatch
    (socketproxy_mirror_reply_mismatches_total) and logs it with the command and both replies."""
    primary, shadow = redis("primary"), redis("shadow")
    shadow.call("SET", "other:7", "shadow's own")
    metrics_port = free_port()
    px = proxy([primary.address, shadow.address], "--primary", "--framing", "resp", "--mirror-policy", "wait",
               "--metrics", "127.0.0.1:%d" % metrics_port, *RETRY)
    wait_until(lambda: "serving metrics" in px.log())
    with connect_source(px.port) as sock:
        # both connected first: the comparison's commands are then read as the shadow acknowledges them
        # (a mirror that connects late resends what it kept, and may log a mismatch's command as "?")
        sock.sendall(encode("PING"))
        buf = bytearray()
        assert read_reply(sock, buf) == b"PONG"
        wait_for_log(px.log_path, r"connected to %s" % re.escape(shadow.address))
        for i in range(20):
            sock.sendall(encode("SET", "key:%d" % i, i))
            assert read_reply(sock, buf) == b"OK"
        for i in range(20):
            sock.sendall(encode("GET", "other:%d" % i if i == 7 else "key:%d" % i))
            assert read_reply(sock, buf) == (None if i == 7 else str(i).encode())
        wait_until(lambda: metric(metrics_port, "socketproxy_mirror_reply_mismatches_total", shadow.address) == 1, 20,
                   message=lambda: "mismatches: %r\n%s" % (metric(metrics_port, "socketproxy_mirror_reply_mismatches_total",
                                                                  shadow.address), px.log()[-3000:]))
    wait_for_log(px.log_path, r"reply 29 of %s differs from the primary's: command GET other:7; the primary answered "
                 r"\$-1\\r\\n, the shadow \$12\\r\\nshadow's own\\r\\n" % re.escape(shadow.address))
    wait_until(lambda: group_gone(metrics_port), 30, message="the group is still counted as active")
    assert metric(metrics_port, "socketproxy_mirror_reply_mismatches_total", shadow.address) == 1


@needs_redis
@pytest.mark.timeout(120)
def test_a_transaction_cut_by_a_restart_is_sent_again_from_its_multi(proxy, redis):
    """Fan-out --framing resp: the source sends SELECT 3, MULTI and three queued SETs, then waits; B is
    killed -9 and restarted (its queued transaction is lost with its connection). Then EXEC: B runs the
    whole transaction in db 3 (the new connection got SELECT, MULTI and the queued commands again), with
    no error reply (no EXEC without MULTI)."""
    a, b = redis("a"), redis("b")
    px = proxy([a.address, b.address], "--framing", "resp", *RETRY)
    with connect_source(px.port) as sock:
        sock.sendall(encode("SELECT", 3) + encode("MULTI") + b"".join(encode("SET", "t:%d" % i, i) for i in range(3)))
        wait_until(lambda: re.search(r"multi=3 ", b.call("CLIENT", "LIST").decode()), 20,
                   message=lambda: "B has not queued the transaction: %s" % b.call("CLIENT", "LIST"))
        b.kill()
        time.sleep(OUTAGE_S)  # the outage
        b.start()
        wait_for_log(px.log_path, r"connected to %s after \d+ attempts; restored the session \(SELECT 3\)"
                     % re.escape(b.address), timeout=30)
        sock.sendall(encode("EXEC") + encode("SET", "after", 1))
        for server in (a, b):
            wait_until(lambda server=server: server.has("after", db=3), 20, message=server.state)
    for server in (a, b):
        assert server.contents(3) == {"t:0": "0", "t:1": "1", "t:2": "2", "after": "1"}, server.state()
        assert not server.errorstats(), server.state()


@pytest.mark.timeout(60)
def test_a_line_framed_destination_gets_the_first_lines_again_on_every_new_connection(proxy, recorder):
    """--framing line --session-preamble 2: a CSV header of two lines, then rows; the destination closes
    its connection twice mid-stream. Each new connection starts with the two header lines, then the rows
    from where the last connection's delivered rows end (no row lost, none twice across connections)."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--framing", "line", "--session-preamble", "2", *RETRY)
    header = b"# feed v1\nname,count\n"
    with connect_source(px.port) as sock:
        sock.sendall(header)
        row = 0
        for cut in range(2):
            sock.sendall(b"".join(b"row%d,%d\n" % (i, i) for i in range(row, row + 50)))
            row += 50
            wait_until(lambda: dest.streams() and dest.streams()[-1].endswith(b"row%d,%d\n" % (row - 1, row - 1)), 20,
                       message=lambda: "the destination has %r" % dest.streams()[-1:])
            with dest.lock:
                dest.connections[-1]["sock"].shutdown(socket.SHUT_RDWR)
            wait_until(lambda cut=cut: len(dest.streams()) == cut + 2, 20,
                       message=lambda: "no new connection: %s" % px.log()[-2000:])
        sock.sendall(b"".join(b"row%d,%d\n" % (i, i) for i in range(row, row + 50)))
        row += 50
        wait_until(lambda: dest.streams()[-1].endswith(b"row%d,%d\n" % (row - 1, row - 1)), 20,
                   message=lambda: "the destination has %r" % dest.streams()[-1:])
    streams = dest.streams()
    assert len(streams) == 3
    rows = []
    for stream in streams:
        assert stream.startswith(header), stream[:80]
        rows += stream[len(header):].splitlines()
    assert rows == [b"row%d,%d" % (i, i) for i in range(row)]
    assert re.search(r"restored the session \(the first 2 lines of the stream\)", px.log())
