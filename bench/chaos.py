#!/usr/bin/env python3
"""Chaos run: three destinations, four sources, the proxy between them, a random fault every fraction of a second.

    python bench/chaos.py [--seconds N] [--seed S] [--rate R] [--keep] [--framing MODE] [--buffer SIZE]
                                                      (make chaos; CHAOS_SECONDS=N, CHAOS_FRAMING, CHAOS_BUFFER)
    python bench/chaos.py --analyse DIR               (the checks again, on a work directory kept by a run)

The proxy runs with --framing line --buffer 4M by default (a destination restarted within the buffer gets
every record after its last acknowledged one, none torn); CHAOS_BUFFER=0 CHAOS_FRAMING=none (or --buffer 0
--framing none) runs it as a plain byte stream that drops while a destination is down, checked as such.

Sources send numbered, checksummed, fixed-size records, in writes cut at random offsets (so records
arrive torn and failures cut them); destinations write every connection's bytes to
its own file. For --seconds the run injects, every 0.3-0.7 s, one of: kill -9 of a forwarder, of a
receiver, of a destination (restarted 0.3-0.8 s later), of a source (restarted); SIGSTOP of a destination
for longer than --send-timeout, then SIGCONT; a destination that resets every connection right after
accepting it (for 0.8-2 s); a source that resets its connection part-way through a record (then
reconnects). Then it stops the faults, lets things settle, closes the sources cleanly, checks everything
and prints a table. Exit status 0 only when every check passes. The work directory (records, logs) is
kept when a check fails, or with --keep.

Stdlib, psutil and the project's own code only. Roles (internal): --role source / --role destination.

Record format (REC_SIZE = 100 bytes, newline-framed so a reader can resynchronise anywhere):
    "<src>:<conn:06>:<seq:09>:" + 72 hex chars (blake2b of that header) + "<crc32:08x>\\n"
Record seq of a source connection starts at byte seq * REC_SIZE, so any byte range of any source
connection's stream is known exactly: a destination connection's bytes are compared with the expected
bytes of the stream at the offset its first whole record names.

With --framing line every destination connection must start at a record boundary and may end inside a
record only where it failed (reset, killed) or where the source's own stream ends mid-record (a source
reset or killed part-way through a record). Retaining (--buffer above 0, or framing), consecutive
connections of one source connection to one destination may overlap by at most the one record the
failure cut (resent whole; none unframed) and leave a gap only of what the destination's kernel had
acknowledged and its program never read (the kill/reset bound) or what the log counts as dropped.
"""
import argparse
import calendar
import collections
import hashlib
import json
import math
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import psutil

from common import become_subreaper, free_port, kill_descendants, reap_exited

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_DESTS = 3
N_SOURCES = 4
RETRY_INTERVAL = 1.0
SEND_TIMEOUT = 2.0
RESTART_LIMIT = RETRY_INTERVAL + 1.0  # README: a destination back up gets new data within this
GROUP_GONE_LIMIT = 2.0  # README: after kill -9 of a receiver or forwarder the group is gone within this
RACE_S = 0.3  # a send timeout this close to a stopped destination's SIGCONT races its acknowledgements

REC_SIZE = 100
HEADER_RE = re.compile(rb"(\d):(\d{6}):(\d{9}):")
FIRST_HEADER_RE = re.compile(rb"(?:^|\n)(\d):(\d{6}):(\d{9}):")
PARTIAL_HEADER_RE = re.compile(rb"\d(?::\d{0,6}(?::\d{0,9})?)?$")  # the start of a record, shorter than its header
TICK_S = 0.01  # sources send one batch per tick
DEST_RCVBUF = 8192  # destinations' SO_RCVBUF (the kernel doubles it): a stopped destination fills fast
READ_CHUNK = 16384  # destinations' recv size

FAULT_KINDS = [
    ("kill-forwarder", "kill -9 forwarder"),
    ("kill-receiver", "kill -9 receiver"),
    ("kill-destination", "kill -9 destination, restarted"),
    ("kill-source", "kill -9 source, restarted"),
    ("stop-destination", "SIGSTOP destination > send-timeout"),
    ("reset-destination", "destination resets at accept"),
    ("reset-source", "source resets mid-record"),
]
PROCESS_FAULTS = ["kill-forwarder", "kill-receiver", "kill-source", "reset-source"]
DEST_FAULTS = ["kill-destination", "stop-destination", "reset-destination"]


# -- records ---------------------------------------------------------------------------------------

def record(src, conn, seq):
    """Record seq of connection conn of source src: exactly REC_SIZE bytes ending in a newline."""
    head = b"%d:%06d:%09d:" % (src, conn, seq)
    body = hashlib.blake2b(head, digest_size=36).hexdigest().encode()
    return head + body + b"%08x\n" % zlib.crc32(body, zlib.crc32(head))


class Streams:
    """The expected bytes of every source connection's stream, generated on demand and cached."""

    def __init__(self):
        self.cache = {}

    def get(self, key, start, end):
        buf = self.cache.setdefault(key, bytearray())
        src, conn = key
        seq = len(buf) // REC_SIZE
        while len(buf) < end:
            buf += record(src, conn, seq)
            seq += 1
        return buf[max(start, 0):end]

    def find(self, key, fragment, limit):
        """Every offset below limit where fragment occurs in the stream of key."""
        buf = self.get(key, 0, limit + len(fragment))
        found, pos = [], buf.find(fragment)
        while pos >= 0:
            found.append(pos)
            pos = buf.find(fragment, pos + 1)
        return found


def now():
    return time.monotonic()


class EventLog:
    """Append-only event lines (unbuffered os.write, so they survive kill -9 of the writer)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *fields):
        os.write(self.fd, (" ".join(str(f) for f in fields) + "\n").encode())


# -- role: source ----------------------------------------------------------------------------------

class SourceFlags:
    reset = False  # SIGUSR1: reset the connection part-way through a record, then reconnect
    cycle = False  # SIGUSR2: close the connection cleanly, then reconnect
    stop = False  # SIGTERM: close the connection cleanly and exit


class SourceConnection:
    """One connection to the proxy: paced batches of records until it ends one way or another."""

    def __init__(self, sock, index, conn, args, rng, flags):
        self.sock = sock
        self.index, self.conn = index, conn
        self.args, self.rng, self.flags = args, rng, flags
        self.seq = 0
        self.buf = bytearray()
        self.sent = 0
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.batch = max(1, int(args.rate * TICK_S))
        self.cuts = random.Random("%s-cuts" % rng.random())

    def add_records(self, count):
        for _ in range(count):
            self.buf += record(self.index, self.conn, self.seq)
            self.seq += 1

    def push(self):
        """Send what the kernel takes now, in a write cut at a random offset (records arrive torn, as
        from real sources, so failures cut them); False when the proxy closed the connection."""
        if not self.buf:
            return True
        try:
            n = self.sock.send(memoryview(self.buf)[:self.cuts.randint(1, len(self.buf))])
        except BlockingIOError:
            return True
        except OSError:
            return False
        del self.buf[:n]
        self.sent += n
        return True

    def peer_closed(self):
        """True when the proxy closed or reset the connection (it never sends anything)."""
        try:
            data = self.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data

    def wait(self, timeout_s, want_write):
        """Poll the socket; True when it is readable (EOF or reset from the proxy)."""
        self.poller.modify(self.sock, select.POLLIN | (select.POLLOUT if want_write else 0))
        for _, event in self.poller.poll(max(0.0, timeout_s) * 1000):
            if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                return True
        return False

    def run(self):
        """Returns (how it ended, bytes sent): clean, final, reset, dropped, noeof."""
        life = self.rng.uniform(self.args.min_life, self.args.max_life)
        start = next_batch = now()
        while True:
            t = now()
            if self.flags.stop:
                return self.close_clean("final")
            if self.flags.cycle:
                self.flags.cycle = False
                return self.close_clean("clean")
            if self.flags.reset:
                self.flags.reset = False
                return self.reset_mid_record()
            if t - start >= life:
                return self.close_clean("clean")
            if t >= next_batch:
                if len(self.buf) < self.batch * REC_SIZE:
                    self.add_records(self.batch)
                next_batch = max(next_batch + TICK_S, t)
            if not self.push():
                return "dropped", self.sent
            if self.wait(next_batch - now(), bool(self.buf)) and self.peer_closed():
                return "dropped", self.sent

    def flush(self, deadline):
        """Send the whole buffer (whole records only); False when the proxy dropped us."""
        while self.buf and now() < deadline:
            if not self.push():
                return False
            if self.buf and self.wait(min(0.05, deadline - now()), True) and self.peer_closed():
                return False
        return True

    def close_clean(self, how):
        """Finish the buffered records, FIN, wait for the proxy's close (its receiver closes us at EOF)."""
        if not self.flush(now() + 20.0):
            return "dropped", self.sent
        if self.buf:
            return "noflush", self.sent
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "dropped", self.sent
        deadline = now() + 10.0
        while now() < deadline:
            if self.wait(deadline - now(), False) and self.peer_closed():
                self.sock.close()
                return how, self.sent
        self.sock.close()
        return "noeof", self.sent

    def reset_mid_record(self):
        """Send up to a point inside a record, then close with SO_LINGER 0 (a reset)."""
        to_boundary = (REC_SIZE - self.sent % REC_SIZE) % REC_SIZE
        want = to_boundary + self.rng.randint(1, REC_SIZE - 1)
        while len(self.buf) < want:
            self.add_records(1)
        keep, self.buf = self.buf[want:], self.buf[:want]
        self.flush(now() + 1.0)
        self.buf = keep
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        return "reset", self.sent


def run_source(args):
    events = EventLog(os.path.join(args.dir, "src%d.events" % args.index))
    flags = SourceFlags()

    def on_signal(signum, _frame):
        if signum == signal.SIGUSR1:
            flags.reset = True
        elif signum == signal.SIGUSR2:
            flags.cycle = True
        else:
            flags.stop = True

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    rng = random.Random("%s-%d-%d" % (args.seed, args.index, args.gen))
    events.write("started", args.gen, os.getpid(), now())
    number = 0
    while not flags.stop:
        conn = args.gen * 1000 + number
        number += 1
        # Bind first and log the port before connecting: a source killed at any point after the
        # proxy accepted it has logged the connection its receiver and forwarders will name.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        events.write("connect", conn, sock.getsockname()[1], now())
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", args.port))
        except OSError:
            sock.close()
            events.write("end", conn, "failed", 0, now())
            time.sleep(0.05)
            continue
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each cut write its own segment
        how, sent = SourceConnection(sock, args.index, conn, args, rng, flags).run()
        events.write("end", conn, how, sent, now())
    return 0


# -- role: destination -----------------------------------------------------------------------------

def find_forwarder(proxy_pid, peer_port, my_port):
    """Pid of the proxy process owning the socket 127.0.0.1:peer_port -> 127.0.0.1:my_port, or 0."""
    local, remote = "0100007F:%04X" % peer_port, "0100007F:%04X" % my_port
    inode = None
    try:
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[2] == remote:
                    inode = fields[9]
                    break
        if not inode or inode == "0":
            return 0
        target = "socket:[%s]" % inode
        for proc in psutil.Process(proxy_pid).children(recursive=True):
            try:
                for name in os.listdir("/proc/%d/fd" % proc.pid):
                    if os.readlink("/proc/%d/fd/%s" % (proc.pid, name)) == target:
                        return proc.pid
            except OSError:
                continue
    except (OSError, psutil.Error):
        pass
    return 0


def run_destination(args):
    events = EventLog(os.path.join(args.dir, "dst%d.events" % args.index))
    state = {"reset": False, "stop": False}

    def on_signal(signum, _frame):
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            state["reset"] = signum == signal.SIGUSR1
            events.write("mode", args.gen, "reset-on" if state["reset"] else "reset-off", now())
        else:
            state["stop"] = True

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DEST_RCVBUF)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(256)
    listener.setblocking(False)
    rcvbuf = listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    events.write("listening", args.gen, rcvbuf, now())
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    number = 0

    def end(key, how):
        conn = key.data
        sel.unregister(key.fileobj)
        key.fileobj.close()
        os.close(conn["fd"])
        events.write("end", args.gen, conn["k"], how, conn["n"], now())

    while not state["stop"]:
        for key, _ in sel.select(0.2):
            if key.data is None:
                try:
                    sock, peer = listener.accept()
                except OSError:
                    continue
                t = now()
                sock.setblocking(False)
                forwarder = find_forwarder(args.proxy_pid, peer[1], args.port)
                k, number = number, number + 1
                fd = os.open(os.path.join(args.dir, "dst%d-g%d-c%d.bin" % (args.index, args.gen, k)),
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                if not state["reset"]:
                    events.write("accept", args.gen, k, peer[1], forwarder, t, "normal")
                    sel.register(sock, selectors.EVENT_READ, {"k": k, "fd": fd, "n": 0})
                    continue
                # Reset right after accepting: keep what already arrived (so the count stays exact up
                # to the microseconds between this last read and the reset), then reset.
                n = 0
                while True:
                    try:
                        data = sock.recv(READ_CHUNK)
                    except OSError:
                        break
                    if not data:
                        break
                    os.write(fd, data)
                    n += len(data)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                os.close(fd)
                events.write("accept", args.gen, k, peer[1], forwarder, t, "reset")
                events.write("end", args.gen, k, "reset-at-accept", n, now())
                continue
            conn = key.data
            try:
                data = key.fileobj.recv(READ_CHUNK)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                end(key, "reset")
                continue
            except OSError as exc:
                end(key, "error-%s" % exc.errno)
                continue
            if not data:
                end(key, "eof")
                continue
            os.write(conn["fd"], data)
            if not conn["n"]:
                events.write("first", args.gen, conn["k"], now())
            conn["n"] += len(data)
    for key in list(sel.get_map().values()):
        if key.data is not None:
            end(key, "stopped")
    return 0


# -- the orchestrator: processes -------------------------------------------------------------------

def role_of(proc):
    """'receiver', 'forwarder', 'main' or '' from a process title (cmdline)."""
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return ""
    for role in ("receiver", "forwarder", "main"):
        if title.startswith("socketproxy: " + role):
            return role
    return ""


def is_spare(proc):
    """A process of a group waiting for a source (--spare-groups)."""
    try:
        return "(spare)" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def is_live(proc):
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main_stats(pid):
    proc = psutil.Process(pid)
    return {"fds": len(os.listdir("/proc/%d/fd" % pid)), "threads": proc.num_threads(),
            "rss": proc.memory_info().rss}


class Chaos:
    """Starts everything, injects faults, ends the run, and collects what the checks need."""

    def __init__(self, args):
        self.args = args
        self.seconds = args.seconds
        self.rng = random.Random(args.seed)
        self.dir = tempfile.mkdtemp(prefix="chaos-")
        taken = set()
        self.listen_port = free_port(taken)
        self.dest_ports = [free_port(taken) for _ in range(N_DESTS)]
        self.popens = {}  # pid -> Popen of everything we started
        self.reaped = {}  # pid -> wait status
        self.dests = [None] * N_DESTS  # current Popen per destination
        self.dest_gen = [0] * N_DESTS
        self.sources = [None] * N_SOURCES
        self.source_gen = [0] * N_SOURCES
        self.proxy = None
        self.faults = []  # dicts: kind, t, and what was hit
        self.counts = collections.Counter()
        self.skipped = collections.Counter()  # fault ticks with no target
        self.scheduled = []  # [t, callable]
        self.awaiting = []  # (destination, gen, fault) restarts whose listening time is not known yet
        self.dest_active_until = 0.0  # destination faults happen one at a time (see inject)
        self.restart_window_until = [0.0] * N_DESTS
        self.ready = set()  # (source, gen) whose process has its signal handlers
        self.watches = []  # killed groups: members and when they were all gone
        self.clock_offset = time.time() - time.monotonic()
        self.notes = []

    # processes

    def spawn(self, argv, out_name, **kwargs):
        out = open(os.path.join(self.dir, out_name), "ab")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT, **kwargs)
        finally:
            out.close()
        self.popens[popen.pid] = popen
        return popen

    def reap(self):
        """Collect every exited child: ours, and orphans adopted because we are a subreaper."""
        for pid, status in reap_exited():
            self.reaped[pid] = status
            popen = self.popens.get(pid)
            if popen is not None and popen.returncode is None:
                popen.returncode = os.waitstatus_to_exitcode(status)

    def exited(self, popen):
        self.reap()
        return popen.returncode is not None

    def wait_exit(self, popen, timeout):
        deadline = now() + timeout
        while now() < deadline:
            if self.exited(popen):
                return True
            time.sleep(0.01)
        return self.exited(popen)

    def start_destination(self, d):
        self.dests[d] = self.spawn(
            [sys.executable, __file__, "--role", "destination", "--index", str(d), "--gen", str(self.dest_gen[d]),
             "--port", str(self.dest_ports[d]), "--dir", self.dir, "--proxy-pid", str(self.proxy_pid())],
            "dst%d.out" % d)

    def proxy_pid(self):
        return self.proxy.pid if self.proxy else 0

    def start_source(self, i):
        a = self.args
        self.sources[i] = self.spawn(
            [sys.executable, __file__, "--role", "source", "--index", str(i), "--gen", str(self.source_gen[i]),
             "--port", str(self.listen_port), "--dir", self.dir, "--rate", str(a.rate), "--seed", str(a.seed),
             "--min-life", str(a.min_life), "--max-life", str(a.max_life)], "src%d.out" % i)

    def listening_time(self, d, gen):
        """When destination d's generation gen listens (from its events), or None."""
        try:
            with open(os.path.join(self.dir, "dst%d.events" % d)) as events:
                for line in events:
                    f = line.split()
                    if f[0] == "listening" and int(f[1]) == gen:
                        return float(f[3])
        except OSError:
            pass
        return None

    def start_proxy(self):
        self.log_path = os.path.join(self.dir, "proxy.log")
        argv = [sys.executable, self.args.proxy, "--listen-host", "127.0.0.1", "--listen-port", str(self.listen_port),
                "--retry-interval", "%g" % RETRY_INTERVAL, "--send-timeout", "%g" % SEND_TIMEOUT,
                "--framing", self.args.framing, "--buffer", self.args.buffer]
        if self.args.spare_groups:
            argv += ["--spare-groups", str(self.args.spare_groups)]
        argv += ["127.0.0.1:%d" % p for p in self.dest_ports]
        self.proxy_argv = argv
        self.proxy = self.spawn(argv, "proxy.log")
        deadline = now() + 20
        while now() < deadline:
            if "listening on" in open(self.log_path).read():
                return
            if self.exited(self.proxy):
                break
            time.sleep(0.05)
        raise RuntimeError("the proxy did not start:\n" + open(self.log_path).read())

    def spares_ready(self):
        """--spare-groups: as many groups wait as at the start, each with its forwarders."""
        spares = [p for p, role in self.proxy_tree() if is_spare(p)]
        return len(spares) == self.args.spare_groups * (1 + len(self.dest_ports))

    def proxy_tree(self):
        """Live (non-zombie) descendants of main as (process, role)."""
        try:
            procs = psutil.Process(self.proxy.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [(p, role_of(p)) for p in procs if is_live(p)]

    def kill_tree(self, pid):
        """SIGKILL pid and all its descendants, deepest first, and wait for them."""
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        for proc in reversed(procs):
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.Error:
                pass
        deadline = now() + 5
        while now() < deadline and any(is_live(p) for p in procs):
            self.reap()
            time.sleep(0.02)
        self.reap()

    def cleanup(self):
        """Kill whatever of ours is still running, whole trees, and reap everything."""
        for popen in list(self.popens.values()):
            if popen.returncode is None:
                self.kill_tree(popen.pid)
        kill_descendants(self.reap)

    # the fault loop

    def tick(self):
        self.reap()
        t = now()
        due = [item for item in self.scheduled if item[0] <= t]
        self.scheduled = [item for item in self.scheduled if item[0] > t]
        for _, action in sorted(due, key=lambda item: item[0]):
            action()
        for entry in list(self.awaiting):
            d, gen, fault = entry
            listen_t = self.listening_time(d, gen)
            if listen_t is not None:
                fault["listen_t"] = listen_t
                self.awaiting.remove(entry)
                self.dest_active_until = now()
                self.restart_window_until[d] = listen_t + RESTART_LIMIT + 0.3
        for watch in self.watches:
            if watch["gone_t"] is None and not any(is_live(p) for p in watch["members"]):
                watch["gone_t"] = now()

    def schedule(self, delay, action):
        self.scheduled.append([now() + delay, action])

    def pick(self, kinds):
        """A random kind among the least used ones (every kind shows up even in a short run)."""
        low = min(self.counts[k] for k in kinds)
        return self.rng.choice([k for k in kinds if self.counts[k] <= low])

    def inject(self):
        """One fault. At most one destination fault runs at a time, and no SIGSTOP while a restarted
        destination's reconnection is being timed: a stopped destination stalls every source
        (backpressure) for up to --send-timeout, which would make that measurement meaningless."""
        t = now()
        eligible = []
        if t >= self.dest_active_until and self.calm_destinations():
            eligible = [k for k in DEST_FAULTS
                        if k != "stop-destination" or len(self.calm_destinations()) == N_DESTS]
        if eligible and self.rng.random() < 0.7:
            kind = self.pick(eligible)
        else:
            kind = self.pick(PROCESS_FAULTS)
        fault = {"kind": kind, "t": t}
        if getattr(self, "fault_" + kind.replace("-", "_"))(fault):
            self.counts[kind] += 1
            self.faults.append(fault)
        else:
            self.skipped[kind] += 1

    def calm_destinations(self):
        """Destinations not inside the reconnection window of their own restart."""
        return [d for d in range(N_DESTS) if now() >= self.restart_window_until[d]]

    def kill_member(self, role, fault):
        victims = [p for p, r in self.proxy_tree() if r == role]
        if not victims:
            return False
        victim = self.rng.choice(victims)
        try:
            pgid = os.getpgid(victim.pid)
            title = " ".join(victim.cmdline())
            members = [p for p, r in self.proxy_tree() if r in ("receiver", "forwarder") and os.getpgid(p.pid) == pgid]
        except (OSError, psutil.Error):
            return False
        fault["t"] = now()
        try:
            victim.kill()
        except psutil.Error:
            return False
        fault.update(pid=victim.pid, title=title, pgid=pgid)
        self.watches.append({"kind": fault["kind"], "t": fault["t"], "members": members, "gone_t": None,
                             "title": title})
        return True

    def fault_kill_forwarder(self, fault):
        return self.kill_member("forwarder", fault)

    def fault_kill_receiver(self, fault):
        return self.kill_member("receiver", fault)

    def fault_kill_destination(self, fault):
        d = self.rng.choice(self.calm_destinations())
        popen = self.dests[d]
        fault.update(dest=d, gen=self.dest_gen[d], t=now())
        popen.kill()
        self.dest_active_until = math.inf
        self.wait_exit(popen, 2.0)

        def restart():
            self.dest_gen[d] += 1
            self.start_destination(d)
            fault["restart_t"] = now()
            self.awaiting.append((d, self.dest_gen[d], fault))

        self.schedule(self.rng.uniform(0.3, 0.8), restart)
        return True

    def fault_stop_destination(self, fault):
        d = self.rng.choice(self.calm_destinations())
        popen = self.dests[d]
        fault.update(dest=d, gen=self.dest_gen[d], t=now())
        popen.send_signal(signal.SIGSTOP)
        self.dest_active_until = math.inf

        def resume():
            popen.send_signal(signal.SIGCONT)
            fault["end_t"] = now()
            self.dest_active_until = now() + 0.2

        self.schedule(SEND_TIMEOUT + self.rng.uniform(0.5, 1.5), resume)
        return True

    def fault_reset_destination(self, fault):
        d = self.rng.choice(self.calm_destinations())
        popen = self.dests[d]
        fault.update(dest=d, gen=self.dest_gen[d], t=now())
        popen.send_signal(signal.SIGUSR1)
        self.dest_active_until = math.inf

        def back_to_normal():
            popen.send_signal(signal.SIGUSR2)
            fault["end_t"] = now()
            self.dest_active_until = now() + 0.2

        self.schedule(self.rng.uniform(0.8, 2.0), back_to_normal)
        return True

    def fault_kill_source(self, fault):
        candidates = [i for i in range(N_SOURCES) if self.sources[i] is not None and self.sources[i].returncode is None]
        if not candidates:
            return False
        i = self.rng.choice(candidates)
        fault.update(source=i, gen=self.source_gen[i], t=now())
        self.sources[i].kill()
        self.wait_exit(self.sources[i], 2.0)
        self.sources[i] = None

        def restart():
            self.source_gen[i] += 1
            self.start_source(i)

        self.schedule(self.rng.uniform(0.2, 0.6), restart)
        return True

    def source_ready(self, i):
        """True once source i's current process has its signal handlers (it logged "started")."""
        if self.sources[i] is None or self.sources[i].returncode is not None:
            return False
        key = (i, self.source_gen[i])
        if key not in self.ready:
            try:
                with open(os.path.join(self.dir, "src%d.events" % i)) as events:
                    if any(l.split()[:2] == ["started", str(key[1])] for l in events):
                        self.ready.add(key)
            except OSError:
                pass
        return key in self.ready

    def fault_reset_source(self, fault):
        candidates = [i for i in range(N_SOURCES) if self.source_ready(i)]
        if not candidates:
            return False
        i = self.rng.choice(candidates)
        fault.update(source=i, gen=self.source_gen[i], t=now())
        self.sources[i].send_signal(signal.SIGUSR1)
        return True

    # the run

    def run(self):
        become_subreaper()
        started = now()
        # The proxy first (it connects to destinations only for a source), then the destinations
        # (they need main's pid to name the forwarder on the other end of each connection).
        self.start_proxy()
        self.wait_for(self.spares_ready, 10, "the spare groups forked", ticking=False, fail=False)
        self.baseline = main_stats(self.proxy.pid)
        for d in range(N_DESTS):
            self.start_destination(d)
        for d in range(N_DESTS):
            self.wait_for(lambda d=d: self.listening_time(d, 0) is not None, 10, "destination %d listening" % d)
        for i in range(N_SOURCES):
            self.start_source(i)
        self.wait_for(lambda: len([r for _, r in self.proxy_tree() if r == "forwarder"]) >= N_SOURCES * N_DESTS,
                      10, "every source served")
        self.chaos_start = now()
        end = self.chaos_start + self.seconds
        next_fault = now() + self.rng.uniform(0.3, 0.7)
        while now() < end:
            self.tick()
            if now() >= next_fault:
                self.inject()
                next_fault = now() + self.rng.uniform(0.3, 0.7)
            time.sleep(0.01)
        self.chaos_end = now()
        # Faults stop. Let the pending ones finish (SIGCONT, mode back, restarts), then settle.
        self.wait_for(lambda: not self.scheduled and not self.awaiting, 15, "pending faults finished",
                      ticking=True)
        self.sleep_ticking(RETRY_INTERVAL + 2.0)
        # Every source closes its connection cleanly and opens a fresh one that nothing disturbs.
        self.wait_for(lambda: all(self.source_ready(i) for i in range(N_SOURCES)), 10, "sources ready", ticking=True)
        self.final_cycle_t = now()
        for popen in self.sources:
            popen.send_signal(signal.SIGUSR2)
        self.sleep_ticking(2.0)
        self.sources_stop_t = now()
        for popen in self.sources:
            popen.terminate()
        self.source_exits = []
        for popen in self.sources:
            ok = self.wait_exit(popen, 30)
            self.source_exits.append(popen.returncode if ok else None)
        serving = lambda: [p for p, _ in self.proxy_tree() if not is_spare(p)]
        self.wait_for(lambda: not serving() and self.spares_ready(), 10, "every group ended", ticking=True, fail=False)
        self.sleep_ticking(0.3)
        self.final_stats = main_stats(self.proxy.pid)
        self.end_tree = []
        for proc in psutil.Process(self.proxy.pid).children(recursive=True):
            try:
                if not is_spare(proc):
                    self.end_tree.append((proc.pid, proc.status(), " ".join(proc.cmdline())))
            except psutil.Error:
                pass
        stop_t = now()
        self.proxy.terminate()
        self.proxy_exited = self.wait_exit(self.proxy, 10)
        self.proxy_stop_s = now() - stop_t
        self.proxy_leftovers = [p.pid for p in psutil.Process().children(recursive=True)
                                if role_of(p) or p.pid == self.proxy.pid and is_live(p)]
        for popen in self.dests:
            popen.terminate()
        self.dest_exits = []
        for popen in self.dests:
            ok = self.wait_exit(popen, 5)
            self.dest_exits.append(popen.returncode if ok else None)
        # Everything was told to stop: anything still here (alive, or a zombie nobody reaped) leaked.
        self.reap()
        self.leftover = []
        for proc in psutil.Process().children(recursive=True):
            try:
                self.leftover.append((proc.pid, proc.status(), " ".join(proc.cmdline())[:80]))
            except psutil.Error:
                pass
        self.cleanup()
        self.total_s = now() - started

    def wait_for(self, predicate, timeout, what, ticking=False, fail=True):
        deadline = now() + timeout
        while now() < deadline:
            if ticking:
                self.tick()
            if predicate():
                return True
            time.sleep(0.02)
        if fail:
            raise RuntimeError("timed out waiting for: " + what)
        self.notes.append("timed out waiting for: " + what)
        return False

    def sleep_ticking(self, seconds):
        end = now() + seconds
        while now() < end:
            self.tick()
            time.sleep(0.02)


# -- analysis --------------------------------------------------------------------------------------

LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})([+-]\d\d):(\d\d) (\w+) \[(\d+)\] "
                    r"(?:src=(\S+) )?(?:dst=(\S+) )?(.*)$")
LINE_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \w+ \[\d+\] ")


def log_lines(path):
    """The log's lines; None for the start of a line cut by its process's SIGKILL (a write may stop at
    a page boundary of the file when a fatal signal is pending), which another line then follows on
    the same line of the file."""
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        starts = [m.start() for m in LINE_START.finditer(line)]
        if len(starts) > 1 and starts[0] == 0:
            yield from [None] * (len(starts) - 1)  # every one but the last was cut
            line = line[starts[-1]:]
        yield line


RE_CONNECTED = re.compile(r"connected to \S+(?: \(\S+\))?$")
# An outage ends: "...; dropped N bytes while down for T s" (dropping), or, retaining (--buffer or framing),
# "...; resending B bytes kept while down for T s, dropped N bytes" with " (R records)" when framed.
RE_RECONNECTED = re.compile(r"connected to \S+(?: \(\S+\))? after (\d+) attempts; (?:dropped (\d+) bytes while down"
                            r"|resending (\d+) bytes kept while down for [\d.]+ s, dropped (\d+) bytes"
                            r"(?: \((\d+) records\))?$)")
# An outage starts: "...: REASON; N unsent bytes dropped; reconnecting in S s" (dropping), or, retaining,
# "...: REASON; U unacknowledged bytes kept to resend (A more to resend a cut record whole[, less D dropped]),
# B bytes in the backlog; reconnecting in S s" (D: beyond --buffer, or a cut record whose start is gone).
RE_DISCONNECTED = re.compile(r"disconnected from \S+: (.*?); (?:(\d+) unsent bytes dropped|(\d+) unacknowledged bytes "
                             r"kept to resend \((\d+) more to resend a cut record whole(?:, less \d+ dropped)?\), (\d+) bytes in the "
                             r"backlog)"
                             r"; reconnecting in [\d.]+ s$")
RE_CANNOT = re.compile(r"cannot connect to \S+: (.*); reconnecting in")
RE_DOWN_AT_EOF = re.compile(r"dropped (\d+) bytes for \S+ while it was down")
RE_DONE = re.compile(r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes(?: \((\d+) records\))?$")
RE_RECEIVER_DIED = re.compile(r"receiver \d+ died: the source's connection is lost; its pipe still held (\d+) bytes")
RE_CLOSED_DROPPED = re.compile(r"closed connection to \S+: (?:it took no data for .* after the source finished|"
                               r"it ended the connection before taking the last bytes); (\d+) unsent bytes dropped$")
RE_GROUP_ENDED = re.compile(r"group ended: (.*); received (\d+) bytes from source$")
RE_RECEIVER_ENDED = re.compile(r"receiver (\d+) for (\S+) ended: (.*?)(; its group is killed)?$")


def port_of(peer):
    return int(peer.rsplit(":", 1)[1])


class Analysis:
    """Reads everything the run left behind and computes every check."""

    def __init__(self, chaos):
        self.c = chaos
        self.dir = chaos.dir
        self.streams = Streams()
        self.checks = []  # (name, ok, detail)
        self.failures = []  # detail lines
        self.framed = chaos.args.framing != "none"
        self.retaining = self.framed or chaos.args.buffer_bytes > 0

    def check(self, name, ok, detail):
        self.checks.append((name, bool(ok), detail))

    def fail(self, text):
        if len(self.failures) < 40:
            self.failures.append(text)

    # inputs

    def read_sources(self):
        """Source connections keyed (src, conn): port, connect/end time, how it ended, bytes sent."""
        self.sconns = {}
        for i in range(N_SOURCES):
            path = os.path.join(self.dir, "src%d.events" % i)
            if not os.path.exists(path):
                continue
            for line in open(path):
                f = line.split()
                if f[0] == "connect":
                    self.sconns[(i, int(f[1]))] = {"key": (i, int(f[1])), "port": int(f[2]), "t": float(f[3]),
                                                  "how": "killed", "sent": None, "t_end": None}
                elif f[0] == "end":
                    s = self.sconns[(i, int(f[1]))]
                    s.update(how=f[2], sent=int(f[3]), t_end=float(f[4]))
        killed = {(f["source"], f["gen"]): f["t"] for f in self.c.faults if f["kind"] == "kill-source"}
        for (i, conn), s in self.sconns.items():
            if s["how"] == "killed":
                s["t_end"] = killed.get((i, conn // 1000), self.c.chaos_end)
        self.by_port = collections.defaultdict(list)
        for s in self.sconns.values():
            self.by_port[s["port"]].append(s)

    def source_of(self, port, t):
        """The source connection from this port that is the latest to connect before t (log time)."""
        best = None
        for s in self.by_port.get(port, ()):
            if s["t"] <= t + 0.5 and (best is None or s["t"] > best["t"]):
                best = s
        return best

    def log_time(self, stamp, millis, zone_h, zone_m):
        """A log time (ISO 8601 with its zone) on our monotonic clock."""
        offset = int(zone_h) * 3600 + (1 if zone_h[0] == "+" else -1) * int(zone_m) * 60
        epoch = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) - offset + int(millis) / 1000.0
        return epoch - self.c.clock_offset

    def read_log(self):
        """Receivers and forwarders from the proxy's log, each tied to its source connection."""
        self.receivers = {}  # (pid, src) -> dict
        self.forwarders = {}  # (pid, src, dst) -> dict
        self.log_warnings = collections.Counter()
        self.unparsed = []
        self.cut_lines = 0
        for line in log_lines(self.c.log_path):
            if line is None:
                self.cut_lines += 1
                continue
            m = LOG_RE.match(line)
            if not m:
                if line.strip():
                    self.unparsed.append(line)
                continue
            stamp, millis, zone_h, zone_m, level, pid, src, dst, msg = m.groups()
            t = self.log_time(stamp, millis, zone_h, zone_m)
            pid = int(pid)
            if level in ("WARNING", "ERROR", "CRITICAL"):
                self.log_warnings[level] += 1
            if src and dst:
                f = self.forwarders.get((pid, src, dst))
                if f is None:
                    f = self.forwarders[(pid, src, dst)] = {
                        "pid": pid, "src": src, "dst": port_of(dst), "t": t, "outages": [], "done": None,
                        "connects": 0, "cannot": 0, "down_at_eof": None, "disconnects": [], "records": None,
                        "connections": [], "died_held": 0}
                if RE_CONNECTED.match(msg):
                    f["connects"] += 1
                    f["connections"].append({"t": t, "dropped": 0, "resent": 0})
                elif RE_RECONNECTED.match(msg):
                    mm = RE_RECONNECTED.match(msg)
                    f["connects"] += 1
                    dropped = int(mm.group(2) if mm.group(2) is not None else mm.group(4))
                    f["outages"].append(dropped)
                    f["connections"].append({"t": t, "dropped": dropped, "resent": int(mm.group(3) or 0),
                                             "records": int(mm.group(5)) if mm.group(5) else None})
                elif RE_DISCONNECTED.match(msg):
                    mm = RE_DISCONNECTED.match(msg)
                    if mm.group(2) is not None:  # dropping: the unsent bytes are lost
                        f["disconnects"].append((t, mm.group(1), int(mm.group(2))))
                    else:  # retaining: nothing dropped here; the unacknowledged bytes are resent
                        f["disconnects"].append((t, mm.group(1), 0))
                        f.setdefault("kept", []).append((t, int(mm.group(3)), int(mm.group(4)), int(mm.group(5))))
                    if mm.group(1) == "reset by peer":
                        f.setdefault("reset_unacked", []).append((t, int(mm.group(2) or mm.group(3))))
                elif RE_CANNOT.match(msg):
                    f["cannot"] += 1
                elif RE_DOWN_AT_EOF.match(msg):
                    f["down_at_eof"] = (f["down_at_eof"] or 0) + int(RE_DOWN_AT_EOF.match(msg).group(1))
                elif RE_CLOSED_DROPPED.match(msg):
                    f["close_dropped"] = int(RE_CLOSED_DROPPED.match(msg).group(1))
                    f["closed_at_end"] = t
                elif msg.startswith("closed connection to ") and (msg.endswith("source finished") or msg.endswith(
                        "source finished (the last bytes acknowledged as it was reset)")):
                    f["closed_at_end"] = f["closed_clean"] = t
                elif RE_RECEIVER_DIED.match(msg):
                    f["died_held"] += int(RE_RECEIVER_DIED.match(msg).group(1))
                elif RE_DONE.match(msg):
                    mm = RE_DONE.match(msg)
                    f["done"] = (int(mm.group(1)), int(mm.group(2)))
                    f["records"] = int(mm.group(3)) if mm.group(3) else None
                    f["t_done"] = t
            elif src:
                r = self.receivers.get((pid, src))
                if r is None:
                    r = self.receivers[(pid, src)] = {"pid": pid, "src": src, "t": t, "end": None, "received": None,
                                                     "t_end": None}
                mm = RE_GROUP_ENDED.match(msg)
                if mm:
                    r.update(end=mm.group(1), received=int(mm.group(2)), t_end=t)
            else:
                mm = RE_RECEIVER_ENDED.match(msg)
                if mm:
                    r = self.receivers.get((int(mm.group(1)), mm.group(2)))
                    if r is not None:
                        r["exit"] = mm.group(3)
                        if r["t_end"] is None:
                            r["t_end"] = t
        # Tie every receiver and forwarder to its source connection.
        self.unmapped = 0
        for r in self.receivers.values():
            r["s"] = self.source_of(port_of(r["src"]), r["t"])
            if r["s"] is None:
                self.unmapped += 1
            else:
                r["s"]["receiver"] = r
        self.pairs = {}  # (source key, dest index) -> pair
        for f in self.forwarders.values():
            s = self.source_of(port_of(f["src"]), f["t"])
            if s is None or f["dst"] not in self.c.dest_ports:
                self.unmapped += 1
                continue
            d = self.c.dest_ports.index(f["dst"])
            pair = self.pair(s["key"], d)
            pair["fwd"] = f
            f["pair"] = pair

    def pair(self, skey, d):
        key = (skey, d)
        if key not in self.pairs:
            self.pairs[key] = {"s": self.sconns.get(skey), "d": d, "fwd": None, "conns": []}
        return self.pairs[key]

    def read_destinations(self):
        """Destination connections with their bytes, located in their source connection's stream."""
        self.dconns = []
        self.listening = {}  # (d, gen) -> t
        self.rcvbuf = 2 * DEST_RCVBUF
        self.modes = collections.defaultdict(list)
        for d in range(N_DESTS):
            conns = {}
            for line in open(os.path.join(self.dir, "dst%d.events" % d)):
                f = line.split()
                if f[0] == "listening":
                    self.listening[(d, int(f[1]))] = float(f[3])
                    self.rcvbuf = int(f[2])
                elif f[0] == "accept":
                    key = (int(f[1]), int(f[2]))
                    conns[key] = {"d": d, "gen": key[0], "k": key[1], "peer": int(f[3]), "fwd_pid": int(f[4]),
                                  "t": float(f[5]), "mode": f[6], "first": None, "end": None, "t_end": None}
                elif f[0] == "first":
                    conns[(int(f[1]), int(f[2]))]["first"] = float(f[3])
                elif f[0] == "end":
                    c = conns[(int(f[1]), int(f[2]))]
                    c.update(end=f[3], t_end=float(f[5]))
            for c in conns.values():
                path = os.path.join(self.dir, "dst%d-g%d-c%d.bin" % (d, c["gen"], c["k"]))
                c["data"] = open(path, "rb").read() if os.path.exists(path) else b""
                if c["end"] is None:
                    c["end"] = "killed"
                self.dconns.append(c)
        self.dconns.sort(key=lambda c: (c["d"], c["gen"], c["k"]))

    # per destination connection

    def forwarder_source(self, c):
        """Source key of the forwarder the destination found on the other end of c, or None."""
        if not c["fwd_pid"]:
            return None
        # The last source the forwarder began before the accept (its line may be written a little
        # after it: up to 0.5 s when none began before). With --spare-groups a forwarder's process
        # serves one source after another, and the destination may accept long after the connect.
        mine = [f for f in self.forwarders.values()
                if f["pid"] == c["fwd_pid"] and f["dst"] == self.c.dest_ports[c["d"]] and f["t"] <= c["t"] + 0.5]
        before = [f for f in mine if f["t"] <= c["t"] + 0.05]
        best = max(before or mine, key=lambda f: f["t"], default=None)
        if best is None or "pair" not in best:
            return None
        return best["pair"]["s"]["key"] if best["pair"]["s"] else None

    def locate(self, c):
        """Set c's source key and [a, b) from its content; count anomalies."""
        data = c["data"]
        c["skey"], c["a"] = None, None
        c["anomalies"] = collections.Counter()
        by_fwd = self.forwarder_source(c)
        if not data:
            c["skey"] = by_fwd
            return
        m = FIRST_HEADER_RE.search(data)
        if m:
            src, conn, seq = int(m.group(1)), int(m.group(2)), int(m.group(3))
            start = m.start(1)
            skey, a = (src, conn), seq * REC_SIZE - start
            if by_fwd is not None and by_fwd != skey:
                c["anomalies"]["misrouted"] += 1
            if skey not in self.sconns:
                c["anomalies"]["unknown source connection"] += 1
                return
            c["skey"], c["a"] = skey, a
            if a >= 0 and data == self.streams.get(skey, a, a + len(data)):
                return
            self.classify(c, start, skey, seq)
            return
        c["skey"] = by_fwd
        c["fragment"] = True  # located later, once every connection with a header is

    def locate_fragment(self, c):
        """A fragment without a whole header: find it in the stream of its forwarder's source
        connection (or, unidentified, of any source connection alive then)."""
        data = c["data"]
        by_fwd = c["skey"]
        candidates = [by_fwd] if by_fwd else [s["key"] for s in self.sconns.values()
                                              if s["t"] <= c["t"] and (s["t_end"] or math.inf) >= c["t"] - 10]
        found = []
        for skey in candidates:
            s = self.sconns.get(skey)
            if s is None:
                continue
            r = s.get("receiver") or {}
            limit = max(r.get("received") or 0, s["sent"] or 0, self.known_end.get(skey, 0)) + REC_SIZE
            found += [(skey, pos) for pos in self.streams.find(skey, data, limit)]
        sources = {skey for skey, _ in found}
        if len(found) == 1:
            c["skey"], c["a"] = found[0]
        elif len(sources) == 1:
            c["skey"] = found[0][0]  # too short to place, but it is that stream's bytes: counted, not ordered
        elif by_fwd in sources:
            c["skey"] = by_fwd
        elif not found:
            c["anomalies"]["fragment in no stream (corrupt)"] += 1
        else:
            c["anomalies"]["fragment of unknown source"] += 1

    def classify(self, c, start, skey, seq):
        """Walk the records of a connection that differs from its stream and name what is wrong."""
        data, a = c["data"], c["a"]
        anomalies = c["anomalies"]
        if start and (a < 0 or data[:start] != self.streams.get(skey, a, a + start)):
            anomalies["corrupt"] += 1
        pos, expect, seen = start, seq, set()
        while pos < len(data):
            m = HEADER_RE.match(data, pos)
            if not m:
                anomalies["corrupt"] += 1
                nxt = data.find(b"\n", pos)
                if nxt < 0:
                    break
                pos = nxt + 1
                continue
            src, conn, q = int(m.group(1)), int(m.group(2)), int(m.group(3))
            rec = data[pos:pos + REC_SIZE]
            if (src, conn) != skey:
                anomalies["other source connection"] += 1
            elif q != expect:
                if q in seen:
                    anomalies["duplicate"] += 1
                elif q < expect:
                    anomalies["reorder"] += 1
                else:
                    anomalies["gap inside a connection"] += 1
            if rec != record(src, conn, q)[:len(rec)]:
                anomalies["corrupt"] += 1
            seen.add(q)
            expect = q + 1
            pos += REC_SIZE

    # checks

    def analyse(self):
        self.read_sources()
        self.read_log()
        self.read_destinations()
        self.known_end = collections.Counter()
        for c in self.dconns:
            c["fragment"] = False
            self.locate(c)
            if c["a"] is not None:
                self.known_end[c["skey"]] = max(self.known_end[c["skey"]], c["a"] + len(c["data"]))
        for c in self.dconns:
            if c["fragment"]:
                self.locate_fragment(c)
        for c in self.dconns:
            if c["skey"] is not None:
                self.pair(c["skey"], c["d"])["conns"].append(c)
        self.check_faults()
        self.check_processes()
        self.check_records()
        self.check_stayed_up()
        self.check_restarts()
        self.check_outages()
        self.check_drops()
        self.check_sources()
        return all(ok is not False for _, ok, _ in self.checks)

    def check_faults(self):
        missing = [k for k, _ in FAULT_KINDS if not self.c.counts[k]]
        detail = "%d faults in %.0f s%s" % (sum(self.c.counts.values()), self.c.chaos_end - self.c.chaos_start,
                                          "; missing: " + ", ".join(missing) if missing else "")
        if missing and self.c.seconds < 20:
            self.checks.append(("every fault kind injected (required from 20 s)", None, detail))
        else:
            self.check("every fault kind injected", not missing, detail)

    def check_processes(self):
        c = self.c
        slow = [w for w in c.watches if w["gone_t"] is None or w["gone_t"] - w["t"] > GROUP_GONE_LIMIT]
        worst = max([w["gone_t"] - w["t"] for w in c.watches if w["gone_t"]] or [0])
        self.check("killed groups gone within %.0f s" % GROUP_GONE_LIMIT, not slow,
                   "%d groups, slowest %.2f s" % (len(c.watches), worst))
        for w in slow:
            self.fail("group of %r (%s at %.1f s) not gone within %.0f s" % (
                w["title"], w["kind"], w["t"] - c.chaos_start, GROUP_GONE_LIMIT))
        zombies = [e for e in c.end_tree if e[1] == psutil.STATUS_ZOMBIE]
        self.check("no orphan/zombie: proxy tree = main alone", not c.end_tree,
                   "%d children of main after the sources closed (%d zombies)" % (len(c.end_tree), len(zombies)))
        for e in c.end_tree:
            self.fail("left under main: pid %d %s %s" % e)
        b, f = c.baseline, c.final_stats
        self.check("main's fds back to start", b["fds"] == f["fds"], "%d -> %d" % (b["fds"], f["fds"]))
        self.check("main's threads back to start", b["threads"] == f["threads"],
                   "%d -> %d" % (b["threads"], f["threads"]))
        margin = self.c.args.rss_margin_kib * 1024
        self.check("main's RSS back to start (+%d KiB)" % self.c.args.rss_margin_kib, f["rss"] - b["rss"] <= margin,
                   "%.1f -> %.1f MiB (%+d KiB)" % (b["rss"] / 2**20, f["rss"] / 2**20, (f["rss"] - b["rss"]) // 1024))
        exits_ok = c.proxy_exited and c.proxy.returncode == 0 and c.proxy_stop_s <= 3.0 and not c.proxy_leftovers
        self.check("SIGTERM: main exits 0 within 3 s, tree gone", exits_ok,
                   "exit %s after %.2f s, %d left" % (c.proxy.returncode, c.proxy_stop_s, len(c.proxy_leftovers)))
        self.check("nothing of ours left after an orderly stop", not c.leftover,
                   "%d processes left (sources, destinations, proxy all exited)" % len(c.leftover))
        for e in c.leftover:
            self.fail("left running after cleanup: pid %d %s %s" % e)
        harness = [i for i, code in enumerate(c.source_exits) if code != 0] + \
                  [10 + d for d, code in enumerate(c.dest_exits) if code != 0]
        errors = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".out") and "Traceback" in open(os.path.join(self.dir, name), errors="replace").read():
                errors.append(name)
        self.check("harness healthy (sources/destinations)", not harness and not errors and not self.unmapped,
                   "exit codes %s %s; tracebacks in %s; %d unmapped log entries" % (
                       c.source_exits, c.dest_exits, errors or "none", self.unmapped))
        tracebacks = [l for l in self.unparsed if "Traceback" in l]
        self.check("proxy log: no traceback, every line parsed", not self.unparsed,
                   "%d lines unparsed, %d tracebacks, %d cut by a SIGKILL; %d warnings, %d errors" % (
                       len(self.unparsed), len(tracebacks), self.cut_lines, self.log_warnings["WARNING"],
                       self.log_warnings["ERROR"]))
        for line in self.unparsed[:5]:
            self.fail("proxy log: " + line[:150])

    def source_end(self, skey):
        """Bytes the source connection's stream holds: what its receiver got, else what a finished
        forwarder of it accounts for (sent + dropped), else what the source sent."""
        s = self.sconns.get(skey) or {}
        r = s.get("receiver") or {}
        if r.get("received") is not None:
            return r["received"]
        done = [sum(p["fwd"]["done"]) for (k, _), p in self.pairs.items()
                if k == skey and p["fwd"] is not None and p["fwd"]["done"] is not None]
        return max(done) if done else s.get("sent")

    def check_framing(self, c, pair):
        """--framing line: a destination connection starts at a record boundary, and ends inside a record
        only where it failed (reset, killed: its forwarder or group killed too) or where the source's own
        stream ends mid-record. Adds to c's anomalies; returns True when c was cut by its failure."""
        data, a = c["data"], c["a"]
        if not data:
            return False
        if a is None:
            if c["skey"] is not None and not PARTIAL_HEADER_RE.match(data):
                c["anomalies"]["connection starts inside a record"] += 1
            return False
        if a % REC_SIZE:
            c["anomalies"]["connection starts inside a record"] += 1
        end = a + len(data)
        if not end % REC_SIZE or end == self.source_end(c["skey"]):
            return False
        f = pair["fwd"] if pair else None
        last = pair is not None and pair["conns"] and pair["conns"][-1] is c
        # The proxy closed it (FIN) after the source finished, and the stream goes on past it: torn.
        if c["end"] == "eof" and f is not None and f.get("closed_clean") and last:
            c["anomalies"]["torn record at a clean close"] += 1
            return False
        return True

    def check_records(self):
        cut = 0
        if self.framed:
            for c in self.dconns:
                pair = self.pairs.get((c["skey"], c["d"])) if c["skey"] is not None else None
                cut += self.check_framing(c, pair)
        total = collections.Counter()
        nbytes = sum(len(c["data"]) for c in self.dconns)
        for c in self.dconns:
            total.update(c["anomalies"])
            for name, n in c["anomalies"].items():
                self.fail("destination %d conn g%d/c%d (%s, %d bytes, source %s): %d x %s" % (
                    c["d"], c["gen"], c["k"], c["end"], len(c["data"]), c["skey"], n, name))
        # Across the connections of one (source connection, destination): in order, never overlapping
        # (retaining and framed: but for the record a failure cut, resent whole on the next connection).
        cross = collections.Counter()
        self.cut_resent = self.race_resent = self.unacked_resent = 0
        for pair in self.pairs.values():
            prev = None
            for c in pair["conns"]:
                if c["a"] is None or not c["data"]:
                    continue
                if prev is not None:
                    prev_end = prev["a"] + len(prev["data"])
                    if c["a"] < prev["a"]:
                        cross["reorder across reconnects"] += 1
                        self.fail("%s -> destination %d: connection g%d/c%d starts before the previous one" % (
                            pair["s"]["key"], pair["d"], c["gen"], c["k"]))
                    elif c["a"] < prev_end:
                        if self.framed and self.retaining and prev_end - c["a"] < REC_SIZE and not c["a"] % REC_SIZE:
                            self.cut_resent += 1  # the record the failure cut, resent whole
                        elif self.retaining and prev_end - c["a"] < REC_SIZE + self.rcvbuf * self.raced(
                                pair["fwd"], pair["d"], prev["t"], c["t"]):
                            self.race_resent += 1  # resent what the destination took as the proxy gave up
                        elif self.retaining and prev_end - c["a"] < REC_SIZE + self.unacked_at_resets(
                                pair["fwd"], prev["t"], c["t"]):
                            self.unacked_resent += 1  # a killed/reset destination had read it, unacknowledged
                        else:
                            cross["duplicate across reconnects"] += 1
                            self.fail("%s -> destination %d: connection g%d/c%d repeats %d bytes (%d records) of"
                                      " g%d/c%d" % (pair["s"]["key"], pair["d"], c["gen"], c["k"], prev_end - c["a"],
                                                    math.ceil((prev_end - c["a"]) / REC_SIZE), prev["gen"], prev["k"]))
                    elif c["a"] > prev_end:
                        f = pair["fwd"]
                        if f is None or not (f["disconnects"] or f["cannot"]):
                            cross["gap without outage"] += 1
                            self.fail("%s -> destination %d: gap before g%d/c%d and no outage in the log" % (
                                pair["s"]["key"], pair["d"], c["gen"], c["k"]))
                prev = c
        total.update(cross)
        torn_starts = [c for c in self.dconns if c["anomalies"].get("connection starts inside a record")]
        for c in torn_starts[:5]:
            pair = self.pairs.get((c["skey"], c["d"])) or {}
            f = pair.get("fwd") or {}
            kept = [k for k in f.get("kept", ()) if k[0] <= c["t"] + 0.1]
            if kept and c["a"] is not None:
                t, unacknowledged, more, backlog = kept[-1]
                self.fail("  g%d/c%d of %s starts %d bytes into record %d; the forwarder's disconnect before it (%.2f s):"
                          " %d unacknowledged bytes kept to resend (%d more to resend a cut record whole), %d in the"
                          " backlog: the cut record was resent from where the acknowledgement cut it" % (
                              c["gen"], c["k"], c["skey"], c["a"] % REC_SIZE, c["a"] // REC_SIZE,
                              t - self.c.chaos_start, unacknowledged, more, backlog))
        framing = ""
        if self.framed:
            framing = "; %d connections cut inside a record by their failure, %d cut records resent whole" % (
                cut, self.cut_resent)
        if self.race_resent:
            framing += "; %d resent after a send timeout that raced a SIGCONT" % self.race_resent
        if self.unacked_resent:
            framing += "; %d resent what a killed/reset destination had read unacknowledged" % self.unacked_resent
        self.check("every destination connection: records in order, once, intact",
                   not total, "%d connections, %.1f MB, %d records; %s%s" % (
                       len(self.dconns), nbytes / 1e6, nbytes // REC_SIZE,
                       ", ".join("%s %d" % kv for kv in sorted(total.items())) or "no gap/dup/reorder/corruption",
                       framing))

    def fault_windows(self, d):
        """(start, end) of every destination fault on destination d."""
        windows = []
        for f in self.c.faults:
            if f.get("dest") != d:
                continue
            if f["kind"] == "kill-destination":
                windows.append((f["t"], f.get("listen_t", math.inf)))
            else:
                windows.append((f["t"], f.get("end_t", math.inf) + 0.1))
        return windows

    def group_life(self, s):
        r = s.get("receiver") or {}
        return s["t"], max(r.get("t_end") or 0, s["t_end"] or 0) or math.inf

    def check_stayed_up(self):
        """Pairs of a source connection and its connection to one destination that both stayed up.

        A source connection stayed up when its source closed it cleanly (flushed whole records, FIN,
        then the proxy's close) and the proxy agrees: its receiver logged "group ended: source closed"
        with exactly the bytes the source sent (so no kill of its receiver or forwarders cut it short).
        Its connection to destination d stayed up when no fault touched d during the group's life (d was
        not killed, stopped or in reset-at-accept mode between the source's connect and its group's
        end). For such a pair the proxy promises everything: d must have exactly one connection from this
        source connection, closed by FIN, holding every record once, in order, intact.
        """
        checked = bad = 0
        for (skey, d), pair in sorted(self.pairs.items(), key=lambda kv: kv[0]):
            s = pair["s"]
            if s is None:
                continue
            r = s.get("receiver") or {}
            if s["how"] not in ("clean", "final") or r.get("end") != "source closed" or r.get("received") != s["sent"]:
                continue
            start, end = self.group_life(s)
            if any(w0 <= end and w1 >= start - 0.2 for w0, w1 in self.fault_windows(d)):
                continue
            checked += 1
            conns = pair["conns"]
            data = conns[0]["data"] if len(conns) == 1 else None
            ok = (len(conns) == 1 and conns[0]["end"] == "eof" and conns[0]["a"] == 0 and
                  data == self.streams.get(skey, 0, s["sent"]))
            if not ok:
                bad += 1
                self.fail("stayed-up pair %s -> destination %d: %d connections %s, %s bytes of %d" % (
                    skey, d, len(conns), [c["end"] for c in conns], [len(c["data"]) for c in conns], s["sent"]))
        clean = sum(1 for s in self.sconns.values() if s["how"] in ("clean", "final"))
        self.check("pairs that stayed up: every record once, in order", checked and not bad,
                   "%d pairs complete of %d (from %d clean source connections)" % (checked - bad, checked, clean))

    def check_restarts(self):
        """Each restarted destination gets data again within --retry-interval + 1 s of listening.

        Measured for every source connection whose group existed before the kill and outlived the
        window (its source kept sending: no other destination fault runs meanwhile), from the new
        process's listen() to the first byte on its new connection from that group.
        """
        worst, measured, late = 0.0, 0, []
        restarts = [f for f in self.c.faults if f["kind"] == "kill-destination" and "listen_t" in f]
        for f in restarts:
            d, t_listen = f["dest"], f["listen_t"]
            new_gen = f["gen"] + 1
            if any(x.get("dest") == d and t_listen <= x["t"] <= t_listen + RESTART_LIMIT for x in self.c.faults):
                continue  # the scheduler never does this; a later fault on d would cut the window short
            for (skey, dd), pair in self.pairs.items():
                s = pair["s"]
                if dd != d or s is None or pair["fwd"] is None:
                    continue
                start, end = self.group_life(s)
                if pair["fwd"].get("t_done") is not None:
                    end = min(end, pair["fwd"]["t_done"])  # its forwarder ended (the others may go on)
                if start >= t_listen:
                    continue  # not waiting for the restart: its first attempt found it up
                firsts = [c["first"] for c in pair["conns"] if c["gen"] == new_gen and c["first"]]
                if not firsts and end <= t_listen + RESTART_LIMIT + 0.2:
                    continue  # its group ended (a fault, or its source closed) before it had to be back
                measured += 1
                delay = (min(firsts) - t_listen) if firsts else math.inf
                worst = max(worst, delay)
                if delay > RESTART_LIMIT:
                    late.append(delay)
                    self.fail("destination %d restarted at %.1f s: %s got its first byte after %.2f s" % (
                        d, t_listen - self.c.chaos_start, skey, delay))
        self.check("restarted destination receives within %.0f s" % RESTART_LIMIT, restarts and measured and not late,
                   "%d restarts, %d reconnections measured, slowest %.2f s" % (len(restarts), measured, worst))

    def log_connections(self, f, conns):
        """{id(c): index in f's "connected" lines of the one that opened c} for conns (in order).

        The destination accepts as the forwarder's connect returns and logs, unless it is stopped: then
        it accepts (in order) only once it runs again, long after. So from the last connection back,
        each takes the latest line at or before its accept that is earlier than the next one's line."""
        found, upper = {}, len(f["connections"])
        for c in reversed(conns):
            earlier = [i for i in range(upper) if f["connections"][i]["t"] <= c["t"] + 0.1]
            if earlier:
                upper = found[id(c)] = earlier[-1]
        return found

    def raced(self, f, d, t0, t1):
        """Send-timeout disconnects of forwarder f between t0 and t1 that came within RACE_S of a
        stopped destination d being continued. The destination's first reads open its window, the
        forwarder's kernel sends what it queued, and those acknowledgements are still in flight when the
        forwarder reads SIOCOUTQ and resets: the destination holds up to a receive buffer more than
        the proxy counts as acknowledged (counted dropped, or resent: a duplicate)."""
        if f is None:
            return 0
        ends = [x["end_t"] for x in self.c.faults if x["kind"] == "stop-destination" and x["dest"] == d
                and "end_t" in x]
        return sum(1 for t, why, _ in f["disconnects"] if t0 - 0.1 <= t <= t1 + 0.1 and "send timeout" in why
                   and any(abs(t - e) <= RACE_S for e in ends))

    def unacked_at_resets(self, f, t0, t1):
        """What a destination may have read unacknowledged before resetting: bytes the forwarder counted
        unacknowledged at its 'reset by peer' disconnects between t0 and t1, at most a receive buffer each.

        A destination killed with unread data, or reset at accept, that had read bytes its kernel had
        not acknowledged yet (delayed ACK) resets: an RST's acknowledgement is never processed, so the
        proxy counts those bytes unsent (dropped when dropping, resent when retaining: a duplicate).
        The mirror of "acknowledged but never read"; a FIN's acknowledgement is processed, so a
        destination that closes cleanly cannot cause it."""
        if f is None:
            return 0
        return sum(min(u, self.rcvbuf) for t, u in f.get("reset_unacked", ()) if t0 - 0.1 <= t <= t1 + 0.1)

    def outage_faults(self, d, skey, t0, t1):
        """Destination faults on d between t0 and t1: kills, stops, and reset-at-accept connections
        (of this source connection, or unidentified: nothing arrived on them)."""
        kills = [x for x in self.c.faults if x["kind"] == "kill-destination" and x["dest"] == d
                 and x["t"] <= t1 + 0.1 and x.get("listen_t", math.inf) >= t0 - 0.1]
        stops = [x for x in self.c.faults if x["kind"] == "stop-destination" and x["dest"] == d
                 and x["t"] <= t1 + 0.1 and x.get("end_t", math.inf) >= t0 - 0.1]
        resets = [x for x in self.dconns if x["d"] == d and x["mode"] == "reset" and x["skey"] in (None, skey)
                  and t0 - 0.01 <= x["t"] < t1]
        return kills, stops, resets

    def check_outages(self):
        """Every outage between two connections of one source connection to one destination.

        For consecutive connections prev and c (the first measured from the stream's start), the gap
        c.a - end(prev) less what the log counts as dropped in between (the outage lines of the
        forwarder's connections from prev's to c's) is what the destination lost unseen by the proxy:
        it must be 0, or, when the destination was killed or reset at accept meanwhile, at most what
        its kernel acknowledged and its program never read (SO_RCVBUF + one read per kill, SO_RCVBUF
        per reset connection). Framed and retaining, it may be negative by less than a record: the
        record the failure cut, resent whole. Retaining, an outage whose source bytes fit in --buffer
        (its duration x the source's rate) must drop nothing: the destination gets every record after
        its last acknowledged one.
        """
        rate = self.c.args.rate * REC_SIZE
        self.races = 0
        race_used, unacked_read = [], []
        checked = within = unmatched = 0
        kinds = collections.Counter()
        bad = []
        unseen_max = 0
        restart_loss = []  # records lost per (kill-destination outage, source connection)
        for (skey, d), pair in sorted(self.pairs.items(), key=lambda kv: kv[0]):
            f, s = pair["fwd"], pair["s"]
            if f is None or s is None:
                continue
            located = [c for c in pair["conns"] if c["a"] is not None and c["data"]]
            index = self.log_connections(f, located)
            prev, prev_i, prev_end, prev_t = None, -1, 0, s["t"]
            for c in located:
                i = index.get(id(c))
                if i is None or prev_i is None:
                    unmatched += 1
                    prev, prev_i, prev_end, prev_t = c, i, c["a"] + len(c["data"]), c["t"]
                    continue
                dropped = sum(conn["dropped"] for conn in f["connections"][prev_i + 1:i + 1])
                gap = c["a"] - prev_end
                kills, stops, resets = self.outage_faults(d, skey, prev_t, c["t"])
                first = prev is None
                if first and not gap and not dropped and not (kills or stops or resets):
                    prev, prev_i, prev_end, prev_t = c, i, c["a"] + len(c["data"]), c["t"]
                    continue  # the pair's first connection, no outage before it
                checked += 1
                kind = "kill" if kills else "reset" if resets else "stop" if stops else "other"
                kinds[kind] += 1
                killed = [x for x in kills if x["t"] >= prev_t - 0.1]  # killed while connected: it lost its buffer
                bound = len(killed) * (self.rcvbuf + READ_CHUNK) + len(resets) * self.rcvbuf
                unseen = gap - dropped
                races = self.raced(f, d, prev_t, c["t"])
                self.races += races
                ok = 0 <= unseen <= bound or (self.framed and self.retaining and -REC_SIZE < unseen < 0
                                              and not c["a"] % REC_SIZE)
                if races and not ok and -races * self.rcvbuf - REC_SIZE < unseen < 0:
                    ok = True  # the destination got more than the proxy saw acknowledged (see raced)
                    race_used.append(-unseen)
                read_unacked = self.unacked_at_resets(f, prev_t, c["t"])
                if read_unacked and not ok and -read_unacked - REC_SIZE < unseen < 0:
                    ok = True  # it read what its kernel had not acknowledged yet, then reset (see check_drops)
                    unacked_read.append(-unseen)
                down_from = prev["t_end"] if prev is not None and prev["t_end"] else prev_t
                down_from = min([down_from] + [x["t"] for x in kills + stops + resets])
                fits = (c["t"] - down_from) * rate <= self.c.args.buffer_bytes
                if self.retaining and fits:
                    within += 1
                    ok = ok and not dropped
                if unseen > 0:
                    unseen_max = max(unseen_max, unseen)
                lost_records = math.ceil(c["a"] / REC_SIZE) - prev_end // REC_SIZE if gap > 0 else 0
                if killed:
                    restart_loss.append(lost_records)
                if not ok:
                    bad.append(unseen)
                    self.fail("%s -> destination %d: outage before g%d/c%d (%s at %.2f s, %.2f s down, %s the buffer):"
                              " gap %+d bytes (%d records), log dropped %d, unseen %d, bound %d" % (
                                  skey, d, c["gen"], c["k"], kind, down_from - self.c.chaos_start,
                                  c["t"] - down_from, "within" if fits else "beyond", gap, lost_records,
                                  dropped, unseen, bound))
                prev, prev_i, prev_end, prev_t = c, i, c["a"] + len(c["data"]), c["t"]
        loss = "records lost per destination restart (each source connection): mean %.1f, max %d over %d" % (
            sum(restart_loss) / len(restart_loss), max(restart_loss), len(restart_loss)) if restart_loss else \
            "no restart measured"
        detail = "%d outages (%s), %d unmatched connections; unseen loss max %d B; %s; %d ended by a send timeout" \
                 " within %.1f s of a SIGCONT, %d of them got more than acknowledged (max %d B); %d killed/reset" \
                 " destinations had read bytes counted unacknowledged (max %d B)" % (
                     checked, ", ".join("%s %d" % kv for kv in sorted(kinds.items())), unmatched, unseen_max, loss,
                     self.races, RACE_S, len(race_used), max(race_used or [0]), len(unacked_read),
                     max(unacked_read or [0]))
        if self.retaining:
            self.check("outages within --buffer: every record after the last acknowledged", not bad,
                       "%d of them within the buffer; " % within + detail)
        else:
            self.check("outages: gap = log's drops + the kill/reset bound", not bad, detail)
        self.restart_loss = restart_loss

    def coverage(self, pair, received):
        """(bytes of [0, received) some connection of the pair holds, whole records held) by offsets."""
        spans = sorted((max(c["a"], 0), min(c["a"] + len(c["data"]), received)) for c in pair["conns"]
                       if c["a"] is not None and c["data"])
        covered, reach, records = 0, 0, set()
        for x, y in spans:
            if y > reach:
                covered += y - max(x, reach)
                reach = y
            records.update(range(math.ceil(x / REC_SIZE), y // REC_SIZE))
        covered += sum(len(c["data"]) for c in pair["conns"] if c["a"] is None)  # too short to place
        return covered, len(records)

    def check_drops(self):
        """The proxy's drop counts against what the destinations lost.

        For every (source connection, destination) whose forwarder logged "forwarder done" and whose
        receiver logged its total: lost = received - bytes the destination got from it (all its
        connections). The proxy can know bytes it drained from its pipe while the destination was
        down and bytes unacknowledged in its socket when it dropped the connection; it cannot know
        bytes a destination's kernel had acknowledged but the destination never read. So:
          exact   - no kill and no reset-at-accept of that destination during the group's life
                    (includes send-timeout outages of stopped destinations): lost == logged;
          bounded - a killed destination loses what sat in its receive buffer (<= SO_RCVBUF) plus one
                    read; a reset-at-accept loses what arrived between its last read and the reset
                    (<= SO_RCVBUF): 0 <= lost - logged <= that bound.
        "Got" is what the pair's connections cover of the stream (a resent record counts once). Framed,
        the same for records: those no connection holds whole against the log's "(R records)". A send
        timeout within RACE_S of the destination's SIGCONT may count up to a receive buffer the
        destination did get (see raced): counted apart, never as exact.
        Also: the per-outage lines add up to the forwarder's total.
        """
        exact = bounded = stops = 0
        self.close_losses = 0
        worst_bounded = 0
        bad = []
        sums_bad = 0
        close_records = close_read = cut_head_dropped = 0
        race_used, unacked_read = [], []
        for (skey, d), pair in sorted(self.pairs.items(), key=lambda kv: kv[0]):
            f, s = pair["fwd"], pair["s"]
            if f is None or s is None or f["done"] is None:
                continue
            r = s.get("receiver") or {}
            if r.get("received") is None:
                continue
            received = r["received"]
            sent, dropped = f["done"]
            per_outage = sum(f["outages"]) + (f["down_at_eof"] or 0) + f.get("close_dropped", 0)
            if per_outage != dropped:
                sums_bad += 1
                self.fail("%s -> destination %d: outage lines add up to %d, forwarder done says %d" % (
                    skey, d, per_outage, dropped))
            got, records_got = self.coverage(pair, received)
            lost = received - got
            start, end = self.group_life(s)
            end = max(end, f.get("t_done", end))
            kills = [x for x in self.c.faults if x["kind"] == "kill-destination" and x["dest"] == d
                     and x["t"] <= end + 0.1 and x.get("listen_t", math.inf) >= start - 0.1]
            resets = [c for c in pair["conns"] if c["mode"] == "reset"]
            unidentified_resets = [c for c in self.dconns if c["d"] == d and c["mode"] == "reset" and c["skey"] is None
                                   and start - 0.1 <= c["t"] <= end + 0.1]
            bound = len(kills) * (self.rcvbuf + READ_CHUNK) + (len(resets) + len(unidentified_resets)) * self.rcvbuf
            timeouts = [x for x in f["disconnects"] if "timed out" in x[1] or "send timeout" in x[1]]
            diff = lost - dropped
            races = self.raced(f, d, start - 0.1, end + 0.1)
            raced_pair = bool(races) and -races * self.rcvbuf <= diff < 0
            if raced_pair:
                race_used.append(-diff)
                diff = 0  # the destination got more than the proxy saw acknowledged (see raced)
            # A destination that read bytes unacknowledged, then reset (see unacked_at_resets). Not the
            # bytes of a close after the source finished: the proxy's own FIN causes that (close_read).
            read_unacked = self.unacked_at_resets(f, start, end)
            unacked_pair = not raced_pair and -read_unacked <= diff < 0
            if unacked_pair:
                unacked_read.append(-diff)
                diff = 0
                raced_pair = True  # not exact either
            # Framed, whole records too: those of the stream no connection holds whole, against the
            # log's count (an unseen loss may cut one more record at each end of each kill/reset).
            rdiff = 0
            if f["records"] is not None:
                rdiff = (received // REC_SIZE - records_got) - f["records"]
            rbound = bound // REC_SIZE + 2 * (len(kills) + len(resets) + len(unidentified_resets))
            if races and -races * (self.rcvbuf // REC_SIZE + 1) <= rdiff < 0:
                rdiff = 0
            if not kills and not resets and not unidentified_resets:
                if diff == 0 and rdiff == 0:
                    exact += not raced_pair
                    stops += bool(timeouts) and not raced_pair
                    continue
            elif 0 <= diff <= bound and 0 <= rdiff <= rbound:
                if diff == 0 and rdiff == 0:
                    exact += not raced_pair
                else:
                    bounded += 1
                    worst_bounded = max(worst_bounded, diff)
                continue
            bad.append(diff)
            if f.get("closed_clean") and pair["conns"] and pair["conns"][-1]["end"] == "reset":
                self.close_losses += 1  # see the hint printed below the failures
            if f.get("close_dropped") and diff == 0 and rdiff > 0:
                close_records += 1
            if f.get("close_dropped") and diff < 0:
                close_read += 1
            elif diff < 0 and f["down_at_eof"] and -diff <= sum(k[2] for k in f.get("kept", ())):
                cut_head_dropped += 1
            self.fail("%s -> destination %d: lost %d bytes, log says dropped %d (diff %+d, bound %d; records diff"
                      " %+d; %d conns %s; outages %s; disconnects %s; kills %d, resets %d)" % (
                          skey, d, lost, dropped, diff, bound, rdiff, len(pair["conns"]),
                          [c["end"] for c in pair["conns"]], f["outages"],
                          [(round(t - self.c.chaos_start, 2), why, n) for t, why, n in f["disconnects"]],
                          len(kills), len(resets)))
        reasons = collections.Counter()
        for f in self.forwarders.values():
            for _, why, _ in f["disconnects"]:
                reasons["send timeout" if ("timed out" in why or "send timeout" in why) else why] += 1
        if self.close_losses:
            self.failures.append(
                "%d of the %d mismatches end the same way: the forwarder logged 'closed connection ...: source"
                " finished' (no drop for it), yet that last connection was reset with bytes still unsent: an"
                " undelivered tail after the source finished that was never counted" % (self.close_losses, len(bad)))
        if close_records:
            self.failures.append(
                "%d of the %d mismatches: the forwarder logged 'closed connection ...: it took no data ... after the"
                " source finished; N unsent bytes dropped' and counts those N bytes in 'forwarder done' but not"
                " their records (close_gracefully adds to the dropped bytes only)" % (close_records, len(bad)))
        if close_read:
            self.failures.append(
                "%d of the %d mismatches: the log counts more dropped than the destination missed, with a"
                " 'closed connection ...: ... N unsent bytes dropped' at the end: the destination read bytes that"
                " arrived with the proxy's FIN and reset before its kernel's delayed ACK of them (a FIN puts the"
                " receiver in delayed-ACK mode; an RST's acknowledgement is not processed), so SIOCOUTQ still counted"
                " them: close_gracefully sends the FIN before its data is acknowledged" % (close_read, len(bad)))
        if cut_head_dropped:
            self.failures.append(
                "%d of the %d mismatches: the log counts more dropped than the destination missed, by no more than"
                " the 'A more to resend a cut record whole' of a disconnect, and the source finished while the"
                " destination was down ('dropped N bytes for ... while it was down'): the acknowledged head of the"
                " cut record, taken back from 'sent' to be resent, is counted as dropped when the resend is"
                " abandoned, though the destination has it" % (cut_head_dropped, len(bad)))
        self.check("log drop counts match destination gaps", not bad and not sums_bad,
                   "%d pairs exact (%d with send-timeout outages), %d within the kill/reset bound (max %d B),"
                   " %d over-counted by a send timeout racing a SIGCONT (max %d B), %d by a killed/reset destination"
                   " that read unacknowledged bytes (max %d B), %d mismatched; disconnects: %s" % (
                       exact, stops, bounded, worst_bounded, len(race_used), max(race_used or [0]), len(unacked_read),
                       max(unacked_read or [0]), len(bad),
                       ", ".join("%s %d" % kv for kv in sorted(reasons.items()))))
        # "sent" in "forwarder done" should not count bytes it also reports as dropped.
        over = []
        for pair in self.pairs.values():
            f, s = pair["fwd"], pair["s"]
            r = (s or {}).get("receiver") or {}
            if f and f["done"] and r.get("received") is not None and sum(f["done"]) != r["received"]:
                over.append(sum(f["done"]) - r["received"])
        self.check("forwarder done: sent + dropped = received", not over,
                   "%d forwarders off (sent counts bytes also reported as unsent-dropped: +%d B total)" % (
                       len(over), sum(over)) if over else "every finished forwarder")

    def check_sources(self):
        """Nothing a cleanly closed source sent is lost before the proxy: received == sent."""
        bad = 0
        n = 0
        for s in self.sconns.values():
            r = s.get("receiver") or {}
            if s["how"] in ("clean", "final") and r.get("end") == "source closed":
                n += 1
                if r.get("received") != s["sent"]:
                    bad += 1
                    self.fail("source connection %s sent %d bytes, its receiver got %s" % (
                        s["key"], s["sent"], r.get("received")))
        stuck = [s for s in self.sconns.values() if s["how"] in ("noeof", "noflush")]
        for s in stuck:
            self.fail("source connection %s: %s" % (s["key"], s["how"]))
        self.check("clean source close: receiver got every byte, closed the source", not bad and not stuck,
                   "%d clean closes checked, %d source connections in all" % (n, len(self.sconns)))


def print_report(chaos, analysis, ok):
    c, a = chaos, analysis
    print()
    print("chaos: %.0f s of faults, seed %s, %d sources x %d destinations, %d records/s per source; "
          "proxy --retry-interval %g --send-timeout %g --framing %s --buffer %s; run took %.0f s" % (
              c.chaos_end - c.chaos_start, c.args.seed, N_SOURCES, N_DESTS, c.args.rate, RETRY_INTERVAL,
              SEND_TIMEOUT, c.args.framing, c.args.buffer, c.total_s))
    print()
    print("%-42s %6s" % ("fault injected", "count"))
    print("-" * 49)
    for kind, text in FAULT_KINDS:
        print("%-42s %6d" % (text, c.counts[kind]))
    print("%-42s %6d" % ("total", sum(c.counts.values())))
    print()
    print("%-52s %-4s  %s" % ("check", "", "detail"))
    print("-" * 110)
    for name, passed, detail in a.checks:
        print("%-52s %-4s  %s" % (name, {True: "ok", False: "FAIL", None: "info"}[passed], detail))
    print("-" * 110)
    if a.failures:
        print("failures:")
        for line in a.failures:
            print("  " + line)
    if a.retaining:
        known = ("what did not fit in --buffer %s while it was down, what was left when its source finished while it"
                 " was down, or what it never took after the source finished; bytes unacknowledged at a disconnect"
                 " are resent%s" % (c.args.buffer, ", from the start of the record they cut" if a.framed else ""))
    else:
        known = "bytes drained from its pipe while the destination was down, plus bytes unacknowledged in its" \
                " socket at the disconnect"
    print("notes: drop counts are exact only where the proxy can know them (%s); bytes a killed destination's"
          " kernel had acknowledged but it never read are invisible to the proxy, so those pairs are compared"
          " with a bound of SO_RCVBUF (%d) + one read (%d) per kill, and SO_RCVBUF per reset-at-accept."
          % (known, a.rcvbuf, READ_CHUNK))
    for note in c.notes:
        print("note: " + note)
    print("result: %s (work directory %s)" % ("PASS" if ok else "FAIL", c.dir if (not ok or c.args.keep) else "removed"))


def size_bytes(text):
    """A size as the proxy's --buffer takes it: digits with an optional K, M or G suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, suffix = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    if suffix not in units or not (number.isascii() and number.isdigit()):
        raise ValueError(text)
    return int(number) * units[suffix]


STATE_FIELDS = ["seconds", "chaos_start", "chaos_end", "clock_offset", "dest_ports", "log_path", "dir", "faults",
                "counts", "end_tree", "baseline", "final_stats", "proxy_exited", "proxy_returncode", "proxy_stop_s",
                "proxy_leftovers", "leftover", "source_exits", "dest_exits", "notes", "total_s", "proxy_argv"]


def save_state(chaos):
    """What the analysis needs from the run, so --analyse can run the checks again on the directory."""
    state = {name: getattr(chaos, name) for name in STATE_FIELDS if name != "proxy_returncode"}
    state["proxy_returncode"] = chaos.proxy.returncode
    state["watches"] = [{k: w[k] for k in ("kind", "t", "gone_t", "title")} for w in chaos.watches]
    state["args"] = {k: v for k, v in vars(chaos.args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    with open(os.path.join(chaos.dir, "state.json"), "w") as out:
        json.dump(state, out, indent=1)


class Restored:
    """A finished run as save_state left it: what Analysis and print_report read from a Chaos."""

    def __init__(self, directory, args):
        with open(os.path.join(directory, "state.json")) as source:
            state = json.load(source)
        for name in STATE_FIELDS + ["watches"]:
            setattr(self, name, state[name])
        self.dir = directory
        self.log_path = os.path.join(directory, "proxy.log")
        self.counts = collections.Counter(self.counts)
        self.end_tree = [tuple(e) for e in self.end_tree]
        self.leftover = [tuple(e) for e in self.leftover]
        saved = dict(state["args"])
        saved.update(analyse=args.analyse, keep=True)
        saved.setdefault("framing", "none")
        saved.setdefault("buffer", "0")
        self.args = argparse.Namespace(**saved)
        self.args.buffer_bytes = size_bytes(self.args.buffer)
        self.proxy = argparse.Namespace(returncode=self.proxy_returncode)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Chaos run for SocketProxy (see the module docstring).")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS", "60")))
    parser.add_argument("--seed", default=None)
    parser.add_argument("--rate", type=int, default=1000, help="records (100 B) per second per source")
    parser.add_argument("--min-life", type=float, default=2.0, help="a source connection closes cleanly after")
    parser.add_argument("--max-life", type=float, default=10.0, help="... a random time in this range")
    parser.add_argument("--rss-margin-kib", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--proxy", default=os.path.join(ROOT, "socketproxy.py"), help="the proxy to run")
    parser.add_argument("--framing", choices=["none", "line"], default=os.environ.get("CHAOS_FRAMING", "line"),
                        help="the proxy's --framing (CHAOS_FRAMING; default line)")
    parser.add_argument("--buffer", default=os.environ.get("CHAOS_BUFFER", "4M"),
                        help="the proxy's --buffer (CHAOS_BUFFER; default 4M; 0 with --framing none: drops while down)")
    parser.add_argument("--spare-groups", type=int, default=int(os.environ.get("CHAOS_SPARE_GROUPS", "0")),
                        help="run the proxy with --spare-groups N (its waiting groups are not counted as left)")
    parser.add_argument("--analyse", metavar="DIR", help="only analyse the work directory a run kept")
    parser.add_argument("--role", choices=["source", "destination"])
    parser.add_argument("--index", type=int)
    parser.add_argument("--gen", type=int, default=0)
    parser.add_argument("--port", type=int)
    parser.add_argument("--dir")
    parser.add_argument("--proxy-pid", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.buffer_bytes = size_bytes(args.buffer)
    except ValueError:
        parser.error("invalid --buffer %r: expected a size such as 4M, 512K or 0" % args.buffer)
    if args.seed is None:
        args.seed = str(random.randrange(10**6))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.role == "source":
        return run_source(args)
    if args.role == "destination":
        return run_destination(args)
    if args.analyse:
        chaos = Restored(args.analyse, args)
        analysis = Analysis(chaos)
        ok = analysis.analyse()
        print_report(chaos, analysis, ok)
        return 0 if ok else 1
    chaos = Chaos(args)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    print("chaos: %g s, seed %s, work directory %s" % (args.seconds, args.seed, chaos.dir), flush=True)
    try:
        chaos.run()
    except KeyboardInterrupt as stop:
        chaos.cleanup()
        print("chaos: interrupted (%s); everything started was killed; work directory kept: %s" % (
            stop or "SIGINT", chaos.dir), flush=True)
        return 130
    except BaseException:
        chaos.cleanup()
        print("chaos: run aborted; everything started was killed; work directory kept: %s" % chaos.dir, flush=True)
        raise
    with open(os.path.join(chaos.dir, "faults.json"), "w") as out:
        json.dump({"start": chaos.chaos_start, "end": chaos.chaos_end, "faults": chaos.faults}, out, indent=1)
    save_state(chaos)
    analysis = Analysis(chaos)
    ok = analysis.analyse()
    print_report(chaos, analysis, ok)
    if ok and not args.keep:
        shutil.rmtree(chaos.dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
