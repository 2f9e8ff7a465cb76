"""The mirror demo: socketproxy --primary in front of real servers, side by side with no proxy at all.

  python -m fakes.mirror_demo [--requests N] [--keep-logs]     (make mirror-demo)

Redis (redis-server and redis-benchmark): a primary and a shadow redis-server on loopback ports, the proxy
`--primary --mirror-policy drop 127.0.0.1:PRIMARY 127.0.0.1:SHADOW` in front of them, and
`redis-benchmark -t set,incr -n N -c 20 -q` (N = 100000):

  1. straight to the primary, then through the proxy: SET and INCR requests per second and their ratio
     (target >= 0.7x, printed with its verdict but not failing the demo), no error line, and the shadow's
     DEBUG DIGEST equal to the primary's once it has caught up, or else the bytes dropped for the shadow in
     the proxy's log (under --mirror-policy drop a mirror that falls a pipe behind on a saturated machine
     loses whole requests; a loss must never go unseen);
  2. through the proxy with the shadow killed -9 a quarter into the run and restarted a second later: no
     error line, the shadow reconnected, requests per second >= 0.8x the no-fault run;
  3. through the proxy with the shadow SIGSTOPped a quarter into the run (SIGCONT after it): the same;
  4. the primary killed -9 while 10 idle clients (each got +PONG for a PING) and a benchmark are connected:
     every client sees its connection closed within 1 s, the proxy's main still accepts, and a new source
     is reset since the primary is gone.

HTTP (nginx, ab from apache2-utils, curl): a primary and a shadow nginx serving a small static file, each
with its own configuration in a temporary directory; a few curl requests and `ab -k -n 2000 -c 10` straight
to the primary and through the proxy: every request answered (0 failed, 0 non-2xx), requests per second side
by side, and every request of the primary's access log also in the shadow's, or else the bytes dropped
for the shadow in the proxy's log.

A part whose servers are missing is skipped with one line (`make servers` installs them; without any of
them the demo says so and exits 0). Every check prints PASS or FAIL, then a side-by-side summary; the exit
status is 1 if a required check failed (the 0.7x performance target alone never fails it). Every process
the demo starts is ended by its pid, also on Ctrl-C. Logs stay in a temporary directory with --keep-logs or
when a check fails.

The server helpers here (RedisServer, Nginx, Benchmark, run_ab, ...) are also used by
tests/test_mirror_servers.py.
"""
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

from .demo import LIBC, PR_SET_CHILD_SUBREAPER, Narration, Stop, die_with_parent, free_ports, on_signal, running
from .demo import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = float(os.environ.get("SOCKETPROXY_TEST_TIMEOUT_SCALE", "1"))
REQUESTS = 100000  # per redis-benchmark test (SET, INCR)
CLIENTS = 20  # redis-benchmark -c
IDLE_CLIENTS = 10
AB_REQUESTS, AB_CONCURRENCY = 2000, 10
CURL_REQUESTS = 5
PROXIED_VS_DIRECT = 0.7  # the brief's target for redis-benchmark through the proxy (informational here)
FAULT_VS_CLEAN = 0.8  # with a shadow fault, requests per second of the no-fault proxied run
CLOSED_WITHIN_S = 1.0  # every client of a killed primary sees its connection end within this
FAULT_AT = 0.25  # the shadow's fault comes once it has run this fraction of the SETs
OUTAGE_S = 1.0  # a killed shadow is restarted after this
PROXY_OPTIONS = ("--primary", "--mirror-policy", "drop", "--retry-interval", "1")
REDIS_TOOLS = ("redis-server", "redis-benchmark")
HTTP_TOOLS = ("nginx", "ab", "curl")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
STATIC = b"".join(b"mirror demo line %04d\n" % i for i in range(48))  # the file nginx serves (1 KiB)
BENCH_RESULT = re.compile(r"^([A-Z_]+)(?: \([^)]*\))?: ([\d.]+) requests per second")
BENCH_PROGRESS = re.compile(r"^[A-Z_]+(?: \([^)]*\))?: rps=")
RECONNECTED = r"dst=127\.0\.0\.1:%d connected to \S+ after (\d+) attempts"


def find_tool(name):
    """The path of a command, also where /usr/sbin is not on PATH (nginx), or None."""
    found = shutil.which(name)
    return found or next((os.path.join(d, name) for d in SBIN if os.access(os.path.join(d, name), os.X_OK)), None)


def missing(names):
    """The commands of names that are not installed."""
    return [name for name in names if not find_tool(name)]


def end_process(proc, grace=5.0):
    """End a process we started, by its pid: SIGCONT (a stopped one cannot act on SIGTERM), SIGTERM, then
    SIGKILL after grace seconds; always waited for. Returns its exit status."""
    if proc.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def tail(path, size=2000):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# -- redis ------------------------------------------------------------------------------------------------

class RespError(Exception):
    """An error reply, or a reply this client cannot read."""


def encode(*args):
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def read_reply(sock, buf):
    """One reply from sock (buf: a bytearray of what was read and not used yet)."""
    def line():
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the connection was closed")
            buf.extend(chunk)
        end = buf.index(b"\r\n")
        text = bytes(buf[:end])
        del buf[:end + 2]
        return text

    head = line()
    kind, rest = head[:1], head[1:]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RespError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        while len(buf) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the connection was closed")
            buf.extend(chunk)
        data = bytes(buf[:size])
        del buf[:size + 2]
        return data
    if kind == b"*":
        return [read_reply(sock, buf) for _ in range(int(rest))]
    raise RespError("unexpected reply %r" % head)


def redis_call(port, *args, timeout=10.0):
    """One command on a connection of its own; its reply (an error reply raises RespError)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode(*args))
        return read_reply(sock, bytearray())


class RedisServer:
    """A redis-server child on a loopback port, no persistence, DEBUG enabled; can be killed -9, stopped
    and restarted. Its output goes to NAME.log in workdir."""

    def __init__(self, name, port, workdir):
        self.name = name
        self.port = port
        self.workdir = os.path.join(str(workdir), name)
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(str(workdir), name + ".log")
        self.proc = None
        self.paused = False

    def argv(self):
        argv = [find_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.workdir]
        if redis_major() >= 7:  # DEBUG is enabled by default before 7, and the option unknown there
            argv += ["--enable-debug-command", "yes"]
        return argv

    def start(self, timeout=20.0):
        """Start it and wait until it answers PING (RuntimeError if it exits or does not answer)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self.paused = False
        if not wait_for(lambda: self.proc.poll() is not None or self.ping(), timeout) or self.proc.poll() is not None:
            raise RuntimeError("redis-server %s on 127.0.0.1:%d did not start: %s" % (
                self.name, self.port, tail(self.log_path, 600)))
        return self

    def ping(self):
        try:
            return redis_call(self.port, "PING", timeout=1.0) == b"PONG"
        except (OSError, RespError):
            return False

    def call(self, *args, timeout=10.0):
        return redis_call(self.port, *args, timeout=timeout)

    def digest(self):
        return self.call("DEBUG", "DIGEST").decode()

    def dbsize(self):
        return self.call("DBSIZE")

    def calls(self, command):
        """How many times it has run command since it started (INFO commandstats)."""
        info = self.call("INFO", "commandstats").decode()
        found = re.search(r"^cmdstat_%s:calls=(\d+)" % command.lower(), info, re.M)
        return int(found.group(1)) if found else 0

    def kill(self):
        """kill -9, waited for; the time it was gone by."""
        self.proc.kill()
        self.proc.wait()
        self.paused = False
        return time.monotonic()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self):
        if self.proc is not None:
            end_process(self.proc)
            self.paused = False


_REDIS_MAJOR = []


def redis_major():
    if not _REDIS_MAJOR:
        out = subprocess.run([find_tool("redis-server"), "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v=(\d+)\.", out)
        _REDIS_MAJOR.append(int(found.group(1)) if found else 7)
    return _REDIS_MAJOR[0]


class Benchmark:
    """redis-benchmark -t TESTS -n N -c CLIENTS -q against a port, in the background, output to a file.

    finish() waits for it (a redis-benchmark that cannot reach its server may spin forever: it is killed by
    pid at the deadline) and parses its output: requests per second per test, and every other line, which
    is an error line (a -q run prints only the progress and one result line per test)."""

    def __init__(self, port, requests, log_path, clients=CLIENTS, tests="set,incr"):
        self.argv = [find_tool("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-t", tests,
                     "-n", str(requests), "-c", str(clients), "-q"]
        self.log_path = log_path
        self.returncode = None
        self.timed_out = False
        self.rps = {}
        self.errors = []
        with open(log_path, "wb") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        self.seconds = None

    def running(self):
        return self.proc.poll() is None

    def finish(self, timeout):
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.proc.kill()
            self.returncode = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        for line in re.split(r"[\r\n]+", text):
            line = line.strip()
            result = BENCH_RESULT.match(line)
            if result:
                self.rps[result.group(1)] = float(result.group(2))
            elif line and not BENCH_PROGRESS.match(line):
                self.errors.append(line)
        return self

    @property
    def ok(self):
        return self.returncode == 0 and not self.timed_out and not self.errors and set(self.rps) >= {"SET", "INCR"}

    def problem(self):
        """What went wrong, in one line ('' when ok)."""
        if self.ok:
            return ""
        return "exit %s%s, results %s, %d error lines%s" % (
            self.returncode, " (killed at the deadline)" if self.timed_out else "", self.rps or "none",
            len(self.errors), (": " + " | ".join(self.errors[:3])) if self.errors else "")


def idle_clients(port, count, timeout=10.0):
    """count connections to port, each of which sent PING and read +PONG (OSError or RespError if not)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            socks.append(sock)
            sock.sendall(encode("PING"))
            reply = read_reply(sock, bytearray())
            if reply != b"PONG":
                raise RespError("PING answered %r" % reply)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def watch_closes(socks, since, timeout):
    """For each socket, seconds from since until it was closed (EOF) or reset, None if still open at timeout;
    and how each ended ('closed', 'reset' or None)."""
    when, how = [None] * len(socks), [None] * len(socks)
    for sock in socks:
        sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while None in when and time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if when[i] is not None:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                when[i], how[i] = time.monotonic() - since, "reset"
                continue
            if not data:
                when[i], how[i] = time.monotonic() - since, "closed"
        time.sleep(0.005)
    return when, how


def fate_of_new_source(port, timeout):
    """Connect to the proxy and send a PING: ('accepted', how it ended: 'reset', 'closed', 'answered' or
    'still open', seconds) or ('refused', error, 0)."""
    started = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return "refused", str(exc), 0.0
    with sock:
        try:
            sock.sendall(encode("PING"))
        except OSError:
            return "accepted", "reset", time.monotonic() - started
        sock.settimeout(timeout)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return "accepted", "still open", time.monotonic() - started
        except OSError:
            return "accepted", "reset", time.monotonic() - started
        return "accepted", "answered %r" % data if data else "closed", time.monotonic() - started


# -- nginx, ab, curl --------------------------------------------------------------------------------------

class Nginx:
    """An nginx in the foreground (daemon off, master_process off) on a loopback port, with its own
    configuration, access log (one line per request: method, URI, status), error log and pid file in
    workdir/NAME, serving STATIC as /index.html."""

    def __init__(self, name, port, workdir):
        self.name = name
        self.port = port
        self.dir = os.path.join(str(workdir), name)
        self.access_log = os.path.join(self.dir, "access.log")
        self.error_log = os.path.join(self.dir, "error.log")
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.proc = None
        os.makedirs(os.path.join(self.dir, "www"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "temp"), exist_ok=True)
        with open(os.path.join(self.dir, "www", "index.html"), "wb") as f:
            f.write(STATIC)
        temp = os.path.join(self.dir, "temp")
        with open(self.conf, "w") as f:
            f.write("\n".join([
                "daemon off;",
                "master_process off;",
                "worker_processes 1;",
                "user root;" if os.geteuid() == 0 else "",  # as root: serve as root (the files are ours)
                "pid %s;" % os.path.join(self.dir, "nginx.pid"),
                "error_log %s info;" % self.error_log,
                "events { worker_connections 1024; }",
                "http {",
                "  log_format mirror '$request_method $request_uri $status';",
                "  access_log %s mirror;" % self.access_log,
                "  keepalive_requests 100000;",
                "  " + " ".join("%s_temp_path %s;" % (kind, temp)
                                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
                "  server {",
                "    listen 127.0.0.1:%d;" % port,
                "    root %s;" % os.path.join(self.dir, "www"),
                "    location / { }",
                "  }",
                "}", ""]))

    def start(self, timeout=20.0):
        """Start it and wait until it serves /index.html (RuntimeError if it exits or does not)."""
        argv = [find_tool("nginx"), "-e", self.error_log, "-p", self.dir, "-c", self.conf]
        with open(os.path.join(self.dir, "stderr.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)

        def serving():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return True
            except OSError:
                return False

        if not wait_for(lambda: self.proc.poll() is not None or serving(), timeout) or self.proc.poll() is not None:
            raise RuntimeError("nginx %s on 127.0.0.1:%d did not start: %s %s" % (
                self.name, self.port, tail(os.path.join(self.dir, "stderr.log"), 600), tail(self.error_log, 600)))
        return self

    def requests(self):
        """The access log's lines ('GET /index.html 200'), in order."""
        try:
            with open(self.access_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def stop(self):
        if self.proc is not None:
            end_process(self.proc)


def run_ab(url, requests, concurrency, timeout, keepalive=True):
    """ab [-k] -n N -c C URL: a dict of complete, failed, non_2xx, rps, returncode (and output when it failed)."""
    argv = [find_tool("ab")] + (["-k"] if keepalive else []) + ["-s", "30", "-n", str(requests), "-c",
                                                                str(concurrency), url]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:  # subprocess.run kills it (by its pid) and waits
        return {"returncode": None, "complete": 0, "failed": None, "non_2xx": None, "rps": None,
                "output": "ab did not finish within %.0f s" % timeout}

    def field(name):
        found = re.search(r"^%s:\s+([\d.]+)" % re.escape(name), done.stdout, re.M)
        return float(found.group(1)) if found else None

    result = {"returncode": done.returncode, "complete": int(field("Complete requests") or 0),
              "failed": int(field("Failed requests")) if field("Failed requests") is not None else None,
              "non_2xx": int(field("Non-2xx responses") or 0), "rps": field("Requests per second")}
    if done.returncode or result["failed"] != 0 or result["complete"] != requests:
        result["output"] = (done.stdout + done.stderr)[-1500:]
    return result


def ab_ok(result, requests):
    return (result["returncode"] == 0 and result["complete"] == requests and result["failed"] == 0
            and result["non_2xx"] == 0)


def curl_get(url, timeout=20.0):
    """(status, body) of a GET by curl; (None, error text) when curl fails."""
    argv = [find_tool("curl"), "-sS", "--max-time", str(int(timeout)), "-o", "-", "-w", "\n%{http_code}", url]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 5,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return None, "curl did not finish"
    if done.returncode:
        return None, done.stderr.decode(errors="replace").strip() or "exit %d" % done.returncode
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def log_gaps(primary_lines, shadow_lines):
    """The requests of primary_lines that shadow_lines lacks (a Counter of 'METHOD URI'), compared as
    multisets of method and URI (the status is left out: a shadow whose reply nobody reads may log
    another one; the shadow may also have more requests)."""
    def requests(lines):
        return collections.Counter(" ".join(line.split()[:2]) for line in lines)

    return requests(primary_lines) - requests(shadow_lines)


def dropped_for(log_text, port):
    """Bytes the proxy's log says it dropped for the destination 127.0.0.1:port (its forwarders' done
    lines): under --mirror-policy drop a mirror that cannot keep up loses whole requests, and says so."""
    pattern = re.compile(r"dst=127\.0\.0\.1:%d forwarder done: sent \d+ bytes, dropped (\d+) bytes" % port)
    return sum(int(found.group(1)) for found in pattern.finditer(log_text))


# -- the proxy --------------------------------------------------------------------------------------------

class Proxy:
    """socketproxy.py --listen-host 127.0.0.1 --listen-port PORT OPTIONS DEST..., its log in log_path."""

    def __init__(self, port, dests, options, log_path, timeout=20.0):
        self.port = port
        self.log_path = log_path
        self.argv = [sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-host", "127.0.0.1",
                     "--listen-port", str(port), *options, *("127.0.0.1:%d" % d for d in dests)]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        if not wait_for(lambda: self.proc.poll() is not None or self.listening(), timeout) or \
                self.proc.poll() is not None:
            raise RuntimeError("the proxy did not start: %s" % self.log()[-1500:])

    def listening(self):
        """Whether main listens on its port (seen without connecting: a connection would be a source)."""
        try:
            conns = psutil.Process(self.proc.pid).net_connections("tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns)

    def log(self, since=0):
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace")

    def mark(self):
        return os.path.getsize(self.log_path)

    def command(self):
        return "python socketproxy.py " + " ".join(self.argv[2:])

    def stop(self):
        """SIGTERM to main (it ends its tree within 3 s), then SIGKILL to whatever is left, by pid."""
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        end_process(self.proc)
        for proc in running(procs):
            try:
                proc.kill()
            except psutil.Error:
                pass
        wait_for(lambda: not running(procs), 5)


# -- the demo ---------------------------------------------------------------------------------------------

def fmt(value, spec="%.0f"):
    return "-" if value is None else spec % value


def ratio(a, b):
    return a / b if a and b else None


class MirrorDemo(Narration):
    def __init__(self, requests, keep_logs):
        self.requests = requests
        self.keep_logs = keep_logs
        self.dir = tempfile.mkdtemp(prefix="socketproxy-mirror-")
        self.results = []  # (heading, passed, detail, required)
        self.things = []  # everything with a stop(), ended at cleanup in reverse order
        self.bench = {}  # redis runs: name -> Benchmark
        self.http = {}  # figures of the nginx part
        self.kill = {}  # figures of the primary's kill
        self.skipped = []
        self.fault_sets = {}  # what wait_fault_point saw (SETs at the shadow when the fault came)
        self.cleaned = False

    def own(self, thing):
        self.things.append(thing)
        return thing

    # -- redis ----------------------------------------------------------------------------------------
    def benchmark(self, name, port, fault=None):
        """One redis-benchmark run against port; fault(bench) runs while it does. Shows its figures."""
        bench = Benchmark(port, self.requests, os.path.join(self.dir, "bench-%s.log" % name))
        if fault:
            fault(bench)
        bench.finish(600 * SCALE)
        self.bench[name] = bench
        self.say("%-26s SET %8s req/s   INCR %8s req/s   %.1f s%s" % (
            name + ":", fmt(bench.rps.get("SET")), fmt(bench.rps.get("INCR")), bench.seconds,
            "" if bench.ok else "   PROBLEM: " + bench.problem()))
        return bench

    def flush(self, *servers):
        for server in servers:
            server.call("FLUSHALL")
            server.call("CONFIG", "RESETSTAT")  # so INFO commandstats counts this run only

    def redis_part(self):
        p_port, s_port, x_port = free_ports(3)
        primary = self.own(RedisServer("redis-primary", p_port, self.dir)).start()
        shadow = self.own(RedisServer("redis-shadow", s_port, self.dir)).start()
        proxy = self.own(Proxy(x_port, (p_port, s_port), PROXY_OPTIONS, os.path.join(self.dir, "proxy-redis.log")))
        self.say("started redis-server primary pid %d on 127.0.0.1:%d, shadow pid %d on 127.0.0.1:%d (--save '' "
                 "--appendonly no --enable-debug-command yes)" % (primary.proc.pid, p_port, shadow.proc.pid, s_port))
        self.say("started the proxy, main pid %d: %s" % (proxy.proc.pid, proxy.command()))

        self.banner("1. redis-benchmark -t set,incr -n %d -c %d -q: straight to the primary, then through the proxy"
                    % (self.requests, CLIENTS),
                    "Both servers are emptied before each run. Through the proxy the primary answers and the shadow",
                    "gets the same commands (its replies discarded); once it has caught up its DEBUG DIGEST must be",
                    "the primary's.")
        self.flush(primary, shadow)
        direct = self.benchmark("straight to the primary", p_port)
        self.flush(primary, shadow)
        clean_mark = proxy.mark()
        clean = self.benchmark("through --primary", x_port)
        self.record("redis-benchmark through the proxy: exit 0, no error line", clean.ok, clean.problem() or
                    "SET and INCR done, %d requests each" % self.requests)
        for test in ("SET", "INCR"):
            value = ratio(clean.rps.get(test), direct.rps.get(test))
            self.record("%s through --primary >= %.1fx direct" % (test, PROXIED_VS_DIRECT),
                        value is not None and value >= PROXIED_VS_DIRECT,
                        "%sx (%s vs %s req/s)" % (fmt(value, "%.2f"), fmt(clean.rps.get(test)),
                                                  fmt(direct.rps.get(test))),
                        required=False)

        def same():
            try:
                return primary.dbsize() == shadow.dbsize() and primary.digest() == shadow.digest()
            except (OSError, RespError):
                return False

        t0 = time.monotonic()
        caught_up = wait_for(same, 60 * SCALE, 0.2)
        digest, counter = primary.digest(), primary.call("GET", "counter:__rand_int__")
        dropped = dropped_for(proxy.log(clean_mark), s_port)
        self.record("DEBUG DIGEST of the shadow equals the primary's, or the proxy logged what it dropped for it",
                    bool(caught_up) or dropped > 0,
                    "%s on both, %d keys, counter:__rand_int__ = %s (%.1f s after the run)" % (
                        digest, primary.dbsize(), counter.decode() if counter else None, time.monotonic() - t0)
                    if caught_up else "primary %s (%d keys), shadow %s (%d keys) after %.0f s; the proxy logged %d "
                    "bytes dropped for the shadow (--mirror-policy drop: a mirror that falls a pipe behind on a "
                    "saturated machine loses whole requests)" % (
                        digest, primary.dbsize(), shadow.digest(), shadow.dbsize(), 60 * SCALE, dropped))

        self.banner("2. the same through the proxy, the shadow killed -9 a quarter into the run",
                    "It is restarted %.0f s later (empty: no persistence); its forwarders reconnect with backoff "
                    "(--retry-interval 1)." % OUTAGE_S,
                    "The primary's clients must not notice: no error line, >= %.1fx the no-fault run." % FAULT_VS_CLEAN)
        self.flush(primary, shadow)
        mark = proxy.mark()
        events = {}

        def kill_shadow(bench):
            self.wait_fault_point(shadow, bench)
            events["killed"] = shadow.kill()
            events["killed_while_running"] = bench.running()
            self.say("killed -9 the shadow (pid %d) after %d SETs reached it" % (
                shadow.proc.pid, events.get("sets", 0)))
            time.sleep(OUTAGE_S)  # the outage, while the benchmark goes on
            shadow.start()
            events["restarted_while_running"] = bench.running()
            self.say("restarted the shadow: pid %d on 127.0.0.1:%d" % (shadow.proc.pid, s_port))

        self.fault_sets = events
        killed = self.benchmark("shadow killed -9", x_port, kill_shadow)
        self.record("redis-benchmark with the shadow killed -9 mid-run: exit 0, no error line",
                    killed.ok and events.get("killed_while_running"),
                    killed.problem() or ("the kill came mid-run" if events.get("killed_while_running") else
                                         "the benchmark had ended before the kill: no fault was tested"))
        reconnected = wait_for(lambda: re.findall(RECONNECTED % s_port, proxy.log(mark)) or (
            shadow.ping() and shadow.dbsize() > 0), 30 * SCALE, 0.2)
        attempts = re.findall(RECONNECTED % s_port, proxy.log(mark))
        self.record("the restarted shadow is reconnected", bool(reconnected),
                    "%d forwarders logged 'connected to 127.0.0.1:%d after N attempts' (N = %s); the shadow holds "
                    "%d keys, ran %d SETs and %d INCRs since its restart" % (
                        len(attempts), s_port, ",".join(sorted(set(attempts), key=int)) or "-", shadow.dbsize(),
                        shadow.calls("set"), shadow.calls("incr")))
        self.fault_ratio("shadow killed -9", killed, clean)

        self.banner("3. the same through the proxy, the shadow SIGSTOPped a quarter into the run",
                    "--mirror-policy drop: the shadow's commands are dropped while it cannot keep up; SIGCONT after "
                    "the run.")
        self.flush(primary, shadow)
        events = {}

        def stop_shadow(bench):
            self.wait_fault_point(shadow, bench)
            shadow.pause()
            events["while_running"] = bench.running()
            self.say("SIGSTOP to the shadow (pid %d) after %d SETs reached it" % (
                shadow.proc.pid, events.get("sets", 0)))

        self.fault_sets = events
        stopped = self.benchmark("shadow SIGSTOPped", x_port, stop_shadow)
        shadow.resume()
        self.say("SIGCONT to the shadow; it answers PING: %s" % wait_for(shadow.ping, 10 * SCALE))
        self.record("redis-benchmark with the shadow SIGSTOPped mid-run: exit 0, no error line",
                    stopped.ok and events.get("while_running"),
                    stopped.problem() or ("the stop came mid-run" if events.get("while_running") else
                                          "the benchmark had ended before the stop: no fault was tested"))
        self.fault_ratio("shadow SIGSTOPped", stopped, clean)

        self.banner("4. the primary killed -9 with %d idle clients and a benchmark connected" % IDLE_CLIENTS,
                    "Each idle client sent PING and got +PONG through the proxy. Every one must see its connection",
                    "closed within %.0f s of the kill; main keeps accepting, and a new source is reset (no primary)."
                    % CLOSED_WITHIN_S)
        self.flush(primary, shadow)
        clients = idle_clients(x_port, IDLE_CLIENTS)
        try:
            self.say("%d clients connected through the proxy, each got +PONG" % len(clients))
            bench = Benchmark(x_port, self.requests * 10, os.path.join(self.dir, "bench-primary-killed.log"))
            wait_for(lambda: primary.calls("set") > 1000 or not bench.running(), 30 * SCALE)
            killed_at = primary.kill()
            self.say("killed -9 the primary (pid %d)" % primary.proc.pid)
            when, how = watch_closes(clients, killed_at, 10 * SCALE)
        finally:
            for sock in clients:
                sock.close()
        bench.finish(30 * SCALE)
        slowest = max(when) if None not in when else None
        self.kill = {"slowest": slowest, "when": when, "how": collections.Counter(how)}
        self.record("every idle client sees its connection end within %.0f s of the kill" % CLOSED_WITHIN_S,
                    slowest is not None and slowest <= CLOSED_WITHIN_S,
                    "%s; the slowest after %s ms" % (
                        ", ".join("%d %s" % (n, h or "still open") for h, n in sorted(
                            collections.Counter(how).items(), key=str)), fmt(slowest and slowest * 1000)))
        self.say("the benchmark running at the kill: %s after %.1f s (%s)" % (
            "exit %s" % bench.returncode if not bench.timed_out else "killed at the deadline", bench.seconds,
            " | ".join(bench.errors[:2]) or "no error line"))
        outcome, end, seconds = fate_of_new_source(x_port, 15 * SCALE)
        self.kill["new_source"] = (outcome, end, seconds)
        self.record("main still accepts; a new source is reset or closed (no primary)",
                    outcome == "accepted" and end in ("reset", "closed") and proxy.proc.poll() is None,
                    "a new connection was %s, then %s after %.0f ms; main pid %d %s" % (
                        outcome, end, seconds * 1000, proxy.proc.pid,
                        "running" if proxy.proc.poll() is None else "EXITED %s" % proxy.proc.returncode))
        tracebacks = proxy.log().count("Traceback")
        self.record("no traceback in the proxy's log", tracebacks == 0,
                    "%d tracebacks (%s)" % (tracebacks, proxy.log_path) if tracebacks else "none")
        for thing in (proxy, shadow, primary):
            thing.stop()

    def wait_fault_point(self, shadow, bench):
        """Wait until the shadow has run FAULT_AT of the SETs (or the benchmark ended)."""
        wait_for(lambda: not bench.running() or shadow.calls("set") >= FAULT_AT * self.requests, 120 * SCALE, 0.02)
        try:
            self.fault_sets["sets"] = shadow.calls("set")
        except (OSError, RespError):
            pass

    def fault_ratio(self, name, run, clean):
        for test in ("SET", "INCR"):
            value = ratio(run.rps.get(test), clean.rps.get(test))
            self.record("%s, %s >= %.1fx the no-fault run" % (name, test, FAULT_VS_CLEAN),
                        value is not None and value >= FAULT_VS_CLEAN,
                        "%sx (%s vs %s req/s)" % (fmt(value, "%.2f"), fmt(run.rps.get(test)), fmt(clean.rps.get(test))))

    # -- nginx ----------------------------------------------------------------------------------------
    def http_part(self):
        p_port, s_port, x_port = free_ports(3)
        primary = self.own(Nginx("nginx-primary", p_port, self.dir)).start()
        shadow = self.own(Nginx("nginx-shadow", s_port, self.dir)).start()
        proxy = self.own(Proxy(x_port, (p_port, s_port), PROXY_OPTIONS, os.path.join(self.dir, "proxy-nginx.log")))
        self.banner("5. nginx: ab -k -n %d -c %d straight to the primary, then curl and ab through the proxy"
                    % (AB_REQUESTS, AB_CONCURRENCY),
                    "Each nginx has its own configuration (daemon off, master_process off) and access log in %s;"
                    % self.dir,
                    "every request in the primary's log after the direct run must also be in the shadow's.")
        self.say("started nginx primary pid %d on 127.0.0.1:%d, shadow pid %d on 127.0.0.1:%d" % (
            primary.proc.pid, p_port, shadow.proc.pid, s_port))
        self.say("started the proxy, main pid %d: %s" % (proxy.proc.pid, proxy.command()))
        timeout = 300 * SCALE
        direct = run_ab("http://127.0.0.1:%d/index.html" % p_port, AB_REQUESTS, AB_CONCURRENCY, timeout)
        self.say("ab straight to the primary:  %s req/s, %d complete, %s failed, %s non-2xx" % (
            fmt(direct["rps"]), direct["complete"], direct["failed"], direct["non_2xx"]))
        p_mark, s_mark = len(primary.requests()), len(shadow.requests())
        answers = [curl_get("http://127.0.0.1:%d/index.html?curl=%d" % (x_port, i)) for i in range(CURL_REQUESTS)]
        good = sum(1 for status, body in answers if status == 200 and body == STATIC)
        self.record("curl through the proxy: %d requests answered 200 with the file" % CURL_REQUESTS,
                    good == CURL_REQUESTS, "%d of %d%s" % (good, CURL_REQUESTS, "" if good == CURL_REQUESTS else
                                                           ": %r" % [(s, b[:80]) for s, b in answers]))
        proxied = run_ab("http://127.0.0.1:%d/index.html" % x_port, AB_REQUESTS, AB_CONCURRENCY, timeout)
        self.say("ab through --primary:        %s req/s, %d complete, %s failed, %s non-2xx" % (
            fmt(proxied["rps"]), proxied["complete"], proxied["failed"], proxied["non_2xx"]))
        self.record("ab -k -n %d -c %d through the proxy: all complete, 0 failed, 0 non-2xx" % (
            AB_REQUESTS, AB_CONCURRENCY), ab_ok(proxied, AB_REQUESTS),
            "%d complete, %s failed, %s non-2xx%s" % (proxied["complete"], proxied["failed"], proxied["non_2xx"],
                                                      "" if ab_ok(proxied, AB_REQUESTS) else
                                                      "\n" + proxied.get("output", "")))
        t0 = time.monotonic()
        complete = wait_for(lambda: not log_gaps(primary.requests()[p_mark:], shadow.requests()[s_mark:]),
                            60 * SCALE, 0.2)
        wanted, got = primary.requests()[p_mark:], shadow.requests()[s_mark:]
        gaps = log_gaps(wanted, got)
        self.http = {"direct": direct, "proxied": proxied, "primary_lines": len(wanted), "shadow_lines": len(got),
                     "missing": sum(gaps.values())}
        dropped = dropped_for(proxy.log(), s_port)
        self.record("the shadow's access log has every request of the primary's, or the proxy logged what it "
                    "dropped for it", bool(complete) or dropped > 0,
                    "primary %d requests, shadow %d (%d distinct URIs), %.1f s after ab ended" % (
                        len(wanted), len(got), len(set(got)), time.monotonic() - t0) if complete else
                    "primary %d, shadow %d, missing %d: %s; the proxy logged %d bytes dropped for the shadow "
                    "(--mirror-policy drop)" % (len(wanted), len(got), sum(gaps.values()),
                                                dict(gaps.most_common(5)), dropped))
        tracebacks = proxy.log().count("Traceback")
        self.record("no traceback in the proxy's log (nginx)", tracebacks == 0,
                    "%d tracebacks (%s)" % (tracebacks, proxy.log_path) if tracebacks else "none")
        for thing in (proxy, shadow, primary):
            thing.stop()

    # -- the whole --------------------------------------------------------------------------------------
    def run(self):
        print("Mirror demo: socketproxy --primary in front of real servers, %d CPUs, load average %.2f" % (
            os.cpu_count(), os.getloadavg()[0]), flush=True)
        redis_missing, http_missing = missing(REDIS_TOOLS), missing(HTTP_TOOLS)
        if redis_missing:
            self.skipped.append("redis part skipped: %s not installed (make servers)" % ", ".join(redis_missing))
            self.say(self.skipped[-1])
        else:
            self.redis_part()
        if http_missing:
            self.skipped.append("nginx part skipped: %s not installed (make servers)" % ", ".join(http_missing))
            self.say(self.skipped[-1])
        else:
            self.http_part()
        return self.summary()

    def summary(self):
        self.banner("SIDE BY SIDE")
        b = self.bench
        clean = b.get("through --primary")
        direct = b.get("straight to the primary")
        if b:
            print("  %-48s %9s  %10s  %7s  %7s" % ("redis-benchmark -t set,incr -n %d -c %d -q" % (
                self.requests, CLIENTS), "SET req/s", "INCR req/s", "SET x", "INCR x"))
            for name, ref, what in (("straight to the primary", None, ""), ("through --primary", direct, "direct"),
                                    ("shadow killed -9", clean, "no-fault"), ("shadow SIGSTOPped", clean, "no-fault")):
                run = b.get(name)
                if run is None:
                    continue
                print("  %-48s %9s  %10s  %7s  %7s  %s%s" % (
                    name if name.startswith(("straight", "through")) else "through --primary, " + name,
                    fmt(run.rps.get("SET")), fmt(run.rps.get("INCR")),
                    fmt(ref and ratio(run.rps.get("SET"), ref.rps.get("SET")), "%.2f"),
                    fmt(ref and ratio(run.rps.get("INCR"), ref.rps.get("INCR")), "%.2f"),
                    ("(x %s)" % what) if what else "", "" if run.ok else "  PROBLEM: " + run.problem()))
        if self.kill:
            print("  primary killed -9: %d idle clients, all closed after %s ms at most (%s); new source: %s, %s" % (
                IDLE_CLIENTS, fmt(self.kill["slowest"] and self.kill["slowest"] * 1000),
                ", ".join("%d %s" % (n, h or "still open") for h, n in sorted(self.kill["how"].items(), key=str)),
                *self.kill["new_source"][:2]))
        if self.http:
            d, p = self.http["direct"], self.http["proxied"]
            print("  %-48s %9s  %10s  %7s" % ("ab -k -n %d -c %d (nginx)" % (AB_REQUESTS, AB_CONCURRENCY),
                                                "req/s", "failed", "non-2xx"))
            print("  %-48s %9s  %10s  %7s" % ("straight to the primary", fmt(d["rps"]), d["failed"], d["non_2xx"]))
            print("  %-48s %9s  %10s  %7s  %.2fx direct" % ("through --primary", fmt(p["rps"]), p["failed"],
                                                           p["non_2xx"], ratio(p["rps"], d["rps"]) or 0))
            print("  shadow access log: %d of the primary's %d requests (%d missing)" % (
                self.http["primary_lines"] - self.http["missing"], self.http["primary_lines"], self.http["missing"]))
        for line in self.skipped:
            print("  " + line)
        failed_required = [r for r in self.results if r[3] and not r[1]]
        passed = sum(1 for r in self.results if r[1])
        self.banner("SUMMARY: %d of %d checks passed%s" % (
            passed, len(self.results), "" if not failed_required else ", %d required FAILED" % len(failed_required)))
        for heading, ok, _, required in self.results:
            print("  %-4s  %s%s" % ("PASS" if ok else "FAIL", heading,
                                    "" if required else "   (target; informational, does not fail the demo)"),
                  flush=True)
        return 1 if failed_required else 0

    def cleanup(self, keep_logs):
        """End every server and proxy we started (by pid, SIGCONT first), then SIGKILL whatever is left of
        our descendants (orphans we adopted as subreaper included)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.cleaned:
            return True
        self.cleaned = True
        for thing in reversed(self.things):
            try:
                thing.stop()
            except (OSError, psutil.Error, subprocess.SubprocessError):
                pass

        def all_ended():
            left = running(psutil.Process().children(recursive=True))
            for proc in left:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                except psutil.Error:
                    pass
            return not left

        ok = bool(wait_for(all_ended, 10))
        self.say("%s every process it started" % ("ended" if ok else "COULD NOT END"))
        if keep_logs:
            self.say("logs kept in %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return ok


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    requests, keep = REQUESTS, False
    try:
        while args:
            arg = args.pop(0)
            if arg == "--keep-logs":
                keep = True
            elif arg == "--requests":
                requests = int(args.pop(0))
                assert requests > 0
            else:
                raise ValueError(arg)
    except (ValueError, IndexError, AssertionError):
        sys.stderr.write(__doc__)
        sys.exit(2)
    if missing(REDIS_TOOLS) and missing(HTTP_TOOLS):
        print("mirror-demo: %s not installed (make servers installs them): the demo is skipped" % ", ".join(
            missing(REDIS_TOOLS) + missing(HTTP_TOOLS)), flush=True)
        sys.exit(0)
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    demo, code = MirrorDemo(requests, keep), 1
    try:
        code = demo.run()
    except Stop as stop:
        demo.say("interrupted by %s: ending everything" % stop)
        code = 130 if str(stop) == "SIGINT" else 143
    except (RuntimeError, OSError, RespError) as exc:
        demo.say("cannot go on: %s: %s" % (type(exc).__name__, exc))
    finally:
        if not demo.cleanup(keep_logs=code == 1 or keep) and code == 0:
            code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
