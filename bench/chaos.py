#!/usr/bin/env python3
"""Chaos run: three destinations, four sources, the proxy between them, a random fault every fraction of a second.

    python bench/chaos.py [--seconds N] [--seed S] [--rate R] [--keep]      (make chaos; CHAOS_SECONDS=N)

Sources send numbered, checksummed, fixed-size records; destinations write every connection's bytes to
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
"""
import argparse
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

REC_SIZE = 100
HEADER_RE = re.compile(rb"(\d):(\d{6}):(\d{9}):")
FIRST_HEADER_RE = re.compile(rb"(?:^|\n)(\d):(\d{6}):(\d{9}):")
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

    def add_records(self, count):
        for _ in range(count):
            self.buf += record(self.index, self.conn, self.seq)
            self.seq += 1

    def push(self):
        """Send what the kernel takes now; False when the proxy closed the connection."""
        if not self.buf:
            return True
        try:
            n = self.sock.send(self.buf)
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
                "--retry-interval", "%g" % RETRY_INTERVAL, "--send-timeout", "%g" % SEND_TIMEOUT]
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
        self.wait_for(lambda: not self.proxy_tree(), 10, "every group ended", ticking=True, fail=False)
        self.sleep_ticking(0.3)
        self.final_stats = main_stats(self.proxy.pid)
        self.end_tree = []
        for proc in psutil.Process(self.proxy.pid).children(recursive=True):
            try:
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

LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})[+-]\d\d:\d\d (\w+) \[(\d+)\] (?:src=(\S+) )?(?:dst=(\S+) )?(.*)$")
RE_ACCEPTED = re.compile(r"accepted; forwarders: (.*)$")
RE_CONNECTED = re.compile(r"connected to \S+$")
RE_RECONNECTED = re.compile(r"connected to \S+ after (\d+) attempts; dropped (\d+) bytes while down")
RE_DISCONNECTED = re.compile(r"disconnected from \S+: (.*); (\d+) unsent bytes dropped")
RE_CANNOT = re.compile(r"cannot connect to \S+: (.*); reconnecting in")
RE_DOWN_AT_EOF = re.compile(r"dropped (\d+) bytes for \S+ while it was down")
RE_DONE = re.compile(r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes$")
RE_CLOSED_DROPPED = re.compile(r"closed connection to \S+: it took no data for .* after the source finished; "
                               r"(\d+) unsent bytes dropped$")
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

    def log_time(self, stamp, millis):
        epoch = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000.0
        return epoch - self.c.clock_offset

    def read_log(self):
        """Receivers and forwarders from the proxy's log, each tied to its source connection."""
        self.receivers = {}  # (pid, src) -> dict
        self.forwarders = {}  # (pid, src, dst) -> dict
        self.log_warnings = collections.Counter()
        self.unparsed = []
        for line in open(self.c.log_path, errors="replace"):
            line = line.rstrip("\n")
            m = LOG_RE.match(line)
            if not m:
                if line.strip():
                    self.unparsed.append(line)
                continue
            stamp, millis, level, pid, src, dst, msg = m.groups()
            t = self.log_time(stamp, millis)
            pid = int(pid)
            if level in ("WARNING", "ERROR", "CRITICAL"):
                self.log_warnings[level] += 1
            if src and dst:
                f = self.forwarders.get((pid, src, dst))
                if f is None:
                    f = self.forwarders[(pid, src, dst)] = {
                        "pid": pid, "src": src, "dst": port_of(dst), "t": t, "outages": [], "done": None,
                        "connects": 0, "cannot": 0, "down_at_eof": None, "disconnects": []}
                if RE_CONNECTED.match(msg):
                    f["connects"] += 1
                elif RE_RECONNECTED.match(msg):
                    mm = RE_RECONNECTED.match(msg)
                    f["connects"] += 1
                    f["outages"].append(int(mm.group(2)))
                elif RE_DISCONNECTED.match(msg):
                    mm = RE_DISCONNECTED.match(msg)
                    f["disconnects"].append((t, mm.group(1), int(mm.group(2))))
                elif RE_CANNOT.match(msg):
                    f["cannot"] += 1
                elif RE_DOWN_AT_EOF.match(msg):
                    f["down_at_eof"] = (f["down_at_eof"] or 0) + int(RE_DOWN_AT_EOF.match(msg).group(1))
                elif RE_CLOSED_DROPPED.match(msg):
                    f["close_dropped"] = int(RE_CLOSED_DROPPED.match(msg).group(1))
                    f["closed_at_end"] = t
                elif msg.startswith("closed connection to ") and msg.endswith("source finished"):
                    f["closed_at_end"] = t
                elif RE_DONE.match(msg):
                    mm = RE_DONE.match(msg)
                    f["done"] = (int(mm.group(1)), int(mm.group(2)))
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
        best = None
        for f in self.forwarders.values():
            if f["pid"] == c["fwd_pid"] and f["dst"] == self.c.dest_ports[c["d"]] and f["t"] <= c["t"] + 0.5:
                if best is None or f["t"] > best["t"]:
                    best = f
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
                   "%d lines unparsed, %d tracebacks; %d warnings, %d errors" % (
                       len(self.unparsed), len(tracebacks), self.log_warnings["WARNING"], self.log_warnings["ERROR"]))
        for line in self.unparsed[:5]:
            self.fail("proxy log: " + line[:150])

    def check_records(self):
        total = collections.Counter()
        nbytes = sum(len(c["data"]) for c in self.dconns)
        for c in self.dconns:
            total.update(c["anomalies"])
            for name, n in c["anomalies"].items():
                self.fail("destination %d conn g%d/c%d (%s, %d bytes, source %s): %d x %s" % (
                    c["d"], c["gen"], c["k"], c["end"], len(c["data"]), c["skey"], n, name))
        # Across the connections of one (source connection, destination): in order, never overlapping.
        cross = collections.Counter()
        for pair in self.pairs.values():
            prev = None
            for c in pair["conns"]:
                if c["a"] is None or not c["data"]:
                    continue
                if prev is not None:
                    if c["a"] < prev["a"]:
                        cross["reorder across reconnects"] += 1
                        self.fail("%s -> destination %d: connection g%d/c%d starts before the previous one" % (
                            pair["s"]["key"], pair["d"], c["gen"], c["k"]))
                    elif c["a"] < prev["a"] + len(prev["data"]):
                        cross["duplicate across reconnects"] += 1
                        self.fail("%s -> destination %d: connection g%d/c%d repeats %d bytes" % (
                            pair["s"]["key"], pair["d"], c["gen"], c["k"], prev["a"] + len(prev["data"]) - c["a"]))
                    elif c["a"] > prev["a"] + len(prev["data"]):
                        f = pair["fwd"]
                        if f is None or not (f["disconnects"] or f["cannot"]):
                            cross["gap without outage"] += 1
                            self.fail("%s -> destination %d: gap before g%d/c%d and no outage in the log" % (
                                pair["s"]["key"], pair["d"], c["gen"], c["k"]))
                prev = c
        total.update(cross)
        self.check("every destination connection: records in order, once, intact",
                   not total, "%d connections, %.1f MB, %d records; %s" % (
                       len(self.dconns), nbytes / 1e6, nbytes // REC_SIZE,
                       ", ".join("%s %d" % kv for kv in sorted(total.items())) or "no gap/dup/reorder/corruption"))

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
        Also: the per-outage lines add up to the forwarder's total.
        """
        exact = bounded = stops = 0
        self.close_losses = 0
        worst_bounded = 0
        bad = []
        sums_bad = 0
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
            got = sum(len(c["data"]) for c in pair["conns"])
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
            if not kills and not resets and not unidentified_resets:
                if diff == 0:
                    exact += 1
                    stops += bool(timeouts)
                    continue
            elif 0 <= diff <= bound:
                if diff == 0:
                    exact += 1
                else:
                    bounded += 1
                    worst_bounded = max(worst_bounded, diff)
                continue
            bad.append(diff)
            if f.get("closed_at_end") and pair["conns"] and pair["conns"][-1]["end"] == "reset":
                self.close_losses += 1  # see the hint printed below the failures
            self.fail("%s -> destination %d: lost %d bytes, log says dropped %d (diff %+d, bound %d; %d conns %s;"
                      " outages %s; disconnects %s; kills %d, resets %d)" % (
                          skey, d, lost, dropped, diff, bound, len(pair["conns"]),
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
        self.check("log drop counts match destination gaps", not bad and not sums_bad,
                   "%d pairs exact (%d with send-timeout outages), %d within the kill/reset bound (max %d B),"
                   " %d mismatched; disconnects: %s" % (exact, stops, bounded, worst_bounded, len(bad), ", ".join(
                       "%s %d" % kv for kv in sorted(reasons.items()))))
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
          "proxy --retry-interval %g --send-timeout %g; run took %.0f s" % (
              c.chaos_end - c.chaos_start, c.args.seed, N_SOURCES, N_DESTS, c.args.rate, RETRY_INTERVAL,
              SEND_TIMEOUT, c.total_s))
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
    print("notes: drop counts are exact only where the proxy can know them (bytes drained from its pipe while"
          " the destination was down, plus bytes unacknowledged in its socket at the disconnect); bytes a killed"
          " destination's kernel had acknowledged but it never read are invisible to the proxy, so those pairs"
          " are compared with a bound of SO_RCVBUF (%d) + one read (%d) per kill, and SO_RCVBUF per"
          " reset-at-accept." % (a.rcvbuf, READ_CHUNK))
    for note in c.notes:
        print("note: " + note)
    print("result: %s (work directory %s)" % ("PASS" if ok else "FAIL", c.dir if (not ok or c.args.keep) else "removed"))


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
    parser.add_argument("--role", choices=["source", "destination"])
    parser.add_argument("--index", type=int)
    parser.add_argument("--gen", type=int, default=0)
    parser.add_argument("--port", type=int)
    parser.add_argument("--dir")
    parser.add_argument("--proxy-pid", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = str(random.randrange(10**6))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.role == "source":
        return run_source(args)
    if args.role == "destination":
        return run_destination(args)
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
    analysis = Analysis(chaos)
    ok = analysis.analyse()
    print_report(chaos, analysis, ok)
    if ok and not args.keep:
        shutil.rmtree(chaos.dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
