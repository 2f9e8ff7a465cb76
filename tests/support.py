"""Test helpers: polling with deadlines, free ports, recording destinations, process-tree cleanup.

No test functions here. Every deadline goes through scaled() so a slow machine can stretch them all
(SOCKETPROXY_TEST_TIMEOUT_SCALE=2 doubles every deadline).
"""
import ctypes
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SCALE = float(os.environ.get("SOCKETPROXY_TEST_TIMEOUT_SCALE", "1"))
PR_SET_CHILD_SUBREAPER = 36


def scaled(seconds):
    """A deadline stretched by the machine's timeout scale."""
    return seconds * TIMEOUT_SCALE


def wait_until(predicate, timeout=20.0, interval=0.05, message=None):
    """Poll predicate until it returns a truthy value (returned) or fail after timeout seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError("timeout (%.1f s): %s" % (scaled(timeout), text or predicate))
        time.sleep(interval)


def scrape(port):
    """A scrape of --metrics on 127.0.0.1:port: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def stays_true(predicate, duration, interval=0.05):
    """True when predicate holds at every poll for duration seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return True


def become_subreaper():
    """Adopt orphans of our descendants, so a killed proxy's children cannot become zombies of pid 1.

    PID 1 on these machines never reaps adopted orphans; as subreaper the test process sees and reaps
    them itself (reap_orphans), and a leaked process shows up as our child.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans():
    """Reap every exited child of the test process that nobody waits for (returns their pids)."""
    reaped = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)


def free_port():
    """A port free on 127.0.0.1 now, picked outside the ephemeral range so connects do not steal it."""
    low, _high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(200):
        port = random.randint(10000, min(low, 32000) - 1)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port found")


class Recorder:
    """A destination on 127.0.0.1 that records each accepted connection's bytes, in a thread."""

    def __init__(self, port=None, host="127.0.0.1", family=socket.AF_INET, read_rate=None, rcvbuf=None,
                 slow_for=None):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:  # inherited by accepted connections: a small window holds little unread data
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, port or 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.read_rate = read_rate  # bytes per second, None = as fast as possible
        self.slow_until = time.monotonic() + slow_for if slow_for else None  # then as fast as possible
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.connections = []  # list of dicts: data bytearray, open bool, peer
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self.stopping:
            if self.paused.is_set():
                time.sleep(0.02)
                continue
            for key, _ in sel.select(timeout=0.05):
                if key.data is None:
                    try:
                        conn, peer = self.listener.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    record = {"data": bytearray(), "open": True, "peer": peer, "sock": conn}
                    with self.lock:
                        self.connections.append(record)
                    sel.register(conn, selectors.EVENT_READ, record)
                else:
                    record = key.data
                    size = 262144
                    if self.slow_until and time.monotonic() >= self.slow_until:
                        self.read_rate = None
                    if self.read_rate:
                        size = max(1, int(self.read_rate * 0.05))
                    try:
                        chunk = key.fileobj.recv(size)
                    except (ConnectionResetError, BlockingIOError):
                        chunk = b""
                    if chunk:
                        with self.lock:
                            record["data"] += chunk
                        if self.read_rate:
                            time.sleep(len(chunk) / self.read_rate)
                    else:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                        record["open"] = False
        for key in list(sel.get_map().values()):
            key.fileobj.close()

    def streams(self):
        """Bytes of every connection so far, in accept order."""
        with self.lock:
            return [bytes(c["data"]) for c in self.connections]

    def open_count(self):
        with self.lock:
            return sum(1 for c in self.connections if c["open"])

    def closed_count(self):
        with self.lock:
            return sum(1 for c in self.connections if not c["open"])

    def total(self):
        with self.lock:
            return sum(len(c["data"]) for c in self.connections)

    def stop(self):
        """Stop accepting and close every connection (the destination goes down)."""
        self.stopping = True
        self.thread.join(5)
        self.listener.close()


def start_proxy(tmp_path, dests, *options, listen_port=None, name="proxy", listen_host="127.0.0.1",
                prefix=(), env=None, journal=False, script=None):
    """Start socketproxy.py (or script) as its own session; return (Popen, port, log path) once it listens.

    prefix runs it through another program (setpriv, unshare); env adds environment variables;
    journal makes its log file look like systemd's journal stream (JOURNAL_STREAM names it).
    """
    port = listen_port or free_port()
    log_path = tmp_path / ("%s.log" % name)
    argv = [*prefix, sys.executable, script or os.path.join(ROOT, "socketproxy.py"), "--listen-host", listen_host,
            "--listen-port", str(port), *options, *dests]
    full_env = dict(os.environ, **(env or {}))
    with open(log_path, "wb") as log:
        if journal:
            stat = os.fstat(log.fileno())
            full_env["JOURNAL_STREAM"] = "%d:%d" % (stat.st_dev, stat.st_ino)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)
    wait_until(lambda: "listening on" in log_path.read_text() or proc.poll() is not None, 20,
               message=lambda: "proxy did not start: " + log_path.read_text())
    assert proc.poll() is None, log_path.read_text()
    return proc, port, log_path


def wait_for_log(log_path, pattern, timeout=20.0, count=1):
    """Wait until the log holds count lines matching the regex; return the matches."""
    regex = re.compile(pattern)

    def found():
        matches = [m for m in (regex.search(line) for line in log_path.read_text().splitlines()) if m]
        return matches if len(matches) >= count else None

    return wait_until(found, timeout, message=lambda: "no %r in log:\n%s" % (pattern, log_path.read_text()[-4000:]))


def tree(pid):
    """psutil.Process objects of pid and all its descendants (empty when pid is gone)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def by_role(pid, role):
    """Live descendants of pid whose title names the role ('receiver' or 'forwarder')."""
    found = []
    for proc in tree(pid)[1:]:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and ("socketproxy: " + role) in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def alive(procs):
    """The processes of procs still running (zombies count as gone; they are reaped here when ours)."""
    reap_orphans()
    result = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                result.append(proc)
        except psutil.NoSuchProcess:
            pass
    return result


def kill_tree(procs, timeout=5):
    """SIGKILL every process of procs, deepest first, and wait for them; return those that survived."""
    for proc in reversed(procs):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Gone for good: dead, and reaped too. A process whose parent was killed with it becomes our
        # zombie (we are a subreaper) a moment after its parent dies: alive() reaps it then.
        if not alive(procs) and not any(psutil.pid_exists(p.pid) for p in procs):
            break
        time.sleep(0.05)
    reap_orphans()
    return alive(procs)


def connect_source(port, host="127.0.0.1"):
    """A source connection to the proxy."""
    return socket.create_connection((host, port), timeout=scaled(30))


def send_in_thread(sock, data, close=True):
    """sendall(data) (then close) in a thread, so a test can watch while backpressure holds it."""
    def run():
        try:
            sock.sendall(data)
        except OSError:
            pass
        if close:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sees_close(sock):
    """True once the proxy has closed the source connection (EOF or reset on a read)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def tcp_queues(local_port, remote_port):
    """(send queue, receive queue) in bytes of the loopback IPv4 socket with these ports, from /proc/net/tcp."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            tx, rx = queues.split(":")
            return int(tx, 16), int(rx, 16)
    return None


def blackhole():
    """A listening socket on 127.0.0.1 that never answers a SYN: its accept queue is kept full.

    Returns (listener, fillers); close them all to end it.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
        if not wait_for_connect(filler):
            fillers.pop().close()  # this one got no answer: the queue is full
            break
    return listener, fillers


def wait_for_connect(sock, timeout=0.5):
    """Whether a non-blocking connect completed within timeout."""
    _, writable, _ = select.select([], [sock], [], timeout)
    return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def syn_sent_to(port):
    """Whether some IPv4 loopback socket is in SYN_SENT towards port (a connect attempt in flight)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "02" and int(fields[2].split(":")[1], 16) == port:
            return True
    return False


class CountingSink:
    """A destination on 127.0.0.1 for bulk data: a thread per connection keeps only its byte count and
    crc32 (a Recorder's single Python thread would be the bottleneck a rate measurement sees)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = []  # dicts: bytes, crc, open
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"bytes": 0, "crc": 0, "open": True}
            with self.lock:
                self.connections.append(record)
            threading.Thread(target=self._read, args=(conn, record), daemon=True).start()

    def _read(self, conn, record):
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with conn:
            while True:
                try:
                    size = conn.recv_into(buf)
                except OSError:
                    size = 0
                if not size:
                    break
                record["crc"] = zlib.crc32(view[:size], record["crc"])
                record["bytes"] += size
        record["open"] = False

    def total(self):
        with self.lock:
            return sum(c["bytes"] for c in self.connections)

    def summary(self):
        """Sorted (bytes, crc32) of every connection, to compare with what the sources sent."""
        with self.lock:
            return sorted((c["bytes"], c["crc"]) for c in self.connections)

    def closed_count(self):
        with self.lock:
            return sum(1 for c in self.connections if not c["open"])

    def stop(self):
        self.listener.close()


AS_NOBODY = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")


def nobody_can_run_the_proxy():
    """None when the proxy can run as nobody here, else why not (for the skip line)."""
    if os.geteuid() != 0:
        return "needs root to switch to nobody"
    if not shutil.which("setpriv"):
        return "setpriv is not installed"
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import psutil, docopt, setproctitle"],
                           cwd=ROOT, capture_output=True)
    if probe.returncode:
        return "nobody cannot run %s (make test builds .venv from /usr/bin/python3 so it can)" % sys.executable
    return None


DUAL_NAME = "dual.socketproxy.test"  # resolves to ::1 first, then 127.0.0.1, under dual_address_prefix


def dual_address_prefix(tmp_path):
    """A command prefix that runs the proxy with its own /etc/hosts, where DUAL_NAME resolves to ::1
    first, then 127.0.0.1 (as localhost on Debian); skips the test where that cannot be done."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to give the proxy its own /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 %s\n127.0.0.1 %s\n" % (DUAL_NAME, DUAL_NAME))
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && getent ahosts '
                            + DUAL_NAME, str(hosts)], capture_output=True, text=True)
    if probe.returncode or not probe.stdout.startswith("::1"):
        pytest.skip("cannot give a process its own /etc/hosts here: %s" % (probe.stderr.strip() or probe.stdout))
    return ("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts))
