"""SocketProxy benchmark: direct, socat and SocketProxy in one run, interleaved.

Usage:
  bench/bench.py [--quick] [--scale X] [--rounds N] [--only FIGS] [--no-crc] [--json PATH]

  --quick       sizes x 0.02 and one round: a smoke test of every figure in well under a minute
  --scale X     multiply every size and count by X (also BENCH_SCALE=X); default 1
  --rounds N    rounds of the repeated figures (throughput, connections, latency, unprivileged,
                tls); default 3
  --only FIGS   comma-separated subset of: thr,resp,conn,lat,mem,scale,unprivileged,redis,tls
                (default: all)
  --no-crc      sinks skip the crc32 (byte count and the byte-by-byte compare remain)
  --json PATH   where to write the results; default bench/results.json

Every figure runs each system once per round, rounds interleaved, the order rotated every round,
so every ratio is taken under the same load; values are medians over rounds, ratios are medians of
the per-round ratios. Sinks and sources are separate processes (bench/peers.py) on 127.0.0.1; every
stream is checked at every destination: byte count, every byte compared with the expected pattern,
and a crc32. Systems:

  direct      the source connects to the sinks itself; for D > 1 it writes every chunk to D sockets
  socat       socat TCP-LISTEN:P,fork,reuseaddr TCP:DEST                 (D = 1)
              (every socat listener also gets bind=127.0.0.1,backlog=1024, as the proxy's: with
              socat's default backlog of 5, concurrency 8 overflows the accept queue and a dropped
              SYN costs a 1 s retransmit, which would measure the backlog, not socat)
  socat-b256k the same with -b 262144                                    (D = 1)
  socat+tee   socat TCP-LISTEN:P,fork,reuseaddr EXEC:script, the script being
              tee >(socat -u - TCP:A) ... | socat -u - TCP:Z              (D >= 2, bash)
  socketproxy python socketproxy.py --listen-host 127.0.0.1 --listen-port P --log-level warning DEST...
  socketproxy-spares  the same with --spare-groups 8 (figure "connections"): groups forked ahead of
              their sources and kept for the next; beside the rate, each connection's time from the
              source's connect to its first bytes at the last destination (p50, p99)
  socketproxy-nobody  the same as the unprivileged user nobody, as a service runs it:
              setpriv --reuid nobody --regid nogroup --clear-groups python socketproxy.py ... --log-level info
              (info for the line `pipes of N KiB` it logs at start; a handful of lines per source). Its
              pipes must fit nobody's fs.pipe-user-pages-soft (64 MiB), so they are smaller than root's
              1 MiB. Only when the bench runs as root, setpriv exists and nobody can run this Python
              (make builds .venv from /usr/bin/python3 so it can); otherwise its rows are skipped, with
              one line saying why. Its log goes to the bench's log file like root's (the bench opens it).

Figure "unprivileged": the proxy as root and as nobody, D=2, both at --log-level info,
--max-connections at its default (256, which sizes nobody's pipes): a first source streams the
throughput size (at least 64 MiB: shorter streams measure the proxy's forks and connects more than
its pipes), then 48 more sources connect, send 1 KiB and stay connected, then a 50th source streams
the same size. Per system: MB/s of the first and of the 50th stream (from the source's start to the
last sink's EOF), their ratio (target: >= 0.5, the 50th within 2x of the first; pipes that outgrow
the budget leave later sources 8 KiB pipes, 0.17x), the pipe size the proxy logged, any pipe
refusal it logged, and every byte of the 50 streams checked at both sinks.

Figure "memory": 100 sources (x scale) that connect, send 1 KiB and stay, psutil's PSS and USS of the
whole tree per source and of each kind of process: the proxy at D=2 with its defaults, with --framing
line, with --primary, and at D=4; socat+tee at D=2 and socat at D=1.

Figure "redis" (needs redis-server and redis-benchmark, `make servers`; skipped with a line without them):
redis-benchmark -t set,incr -n N -c 20 -q (N = 100000 x scale, at least 2000) straight to a redis-server
(direct D=1), through socat (D=1, the same process-per-connection relay in C: the bar for one
destination), through socketproxy.py --primary to that redis alone (socketproxy-primary D=1) and to that
redis plus a shadow redis (socketproxy-primary D=2), fresh servers without persistence for every trial,
rounds interleaved as above: requests per second of SET and of INCR; a trial whose redis-benchmark exits
non-zero or prints an error line is an error. Targets: --primary D=1 >= socat, --primary D=2 >= socat
D=1; informational: through --primary with a shadow >= 0.7x direct, per test. Beside it, the CPU per
request of each kind of process (main, receiver, the primary's forwarder, the mirror's, socat, and
the redis servers), sampled every 0.1 s.

Figure "tls" (trustme makes its certificates once per run: a CA, and a certificate for 127.0.0.1 with
its key, in the bench's temporary directory, removed at its end; without trustme the figure is skipped,
without socat or stunnel their rows, each with one line saying why): what TLS costs, one stream of a
quarter of the throughput size (256 MiB x scale, at least 4 MiB), MB/s per destination stream, every
byte checked at every sink on the plaintext (peers.py sink --tls-cert, bulk --tls-ca). Two parts, each
with its rounds interleaved as above:

  tls-source  the source speaks TLS to the relay, which writes plaintext to D plain sinks:
              socat OPENSSL-LISTEN:P,fork,reuseaddr,cert=SERVER,verify=0 TCP:SINK       (D = 1)
              stunnel: accept=P, connect=SINK, cert=SERVER, foreground=yes, pid=        (D = 1)
              socat+tee with OPENSSL-LISTEN:P,...,cert=SERVER,verify=0 EXEC:script      (D = 2)
              socketproxy --tls-cert SERVER DEST...                                     (D = 1, 2)
  tls-dest    a plain source; the relay speaks TLS to D TLS sinks, verifying them against the CA:
              socat TCP-LISTEN:P,... OPENSSL:SINK,cafile=CA                             (D = 1)
              stunnel client=yes, CAfile=CA, verifyChain=yes, checkIP=127.0.0.1         (D = 1)
              socat+tee, its script's socats being socat -u - OPENSSL:SINK,cafile=CA    (D = 2)
              socketproxy --tls-ca CA tls://127.0.0.1:SINK...                           (D = 1, 2)
  direct-tls  in both parts, the baseline: the source speaks TLS to TLS sinks itself (D = 2: every
              chunk written to two TLS sockets), what TLS costs without a relay.

Ratios: x direct-tls (same D), x socat (socat at D=1, socat+tee at D=2). A TLS stream cannot be
spliced: the proxy reads a TLS source's plaintext into memory before its pipes, and a tls://
forwarder reads its pipe into memory to encrypt it, copies the plain rows do not make. kTLS (the
kernel encrypts and decrypts the socket: Python 3.12's ssl.OP_ENABLE_KTLS, with OpenSSL built with
it and the tls module loaded) is the way to regain splice.

The bench raises its own RLIMIT_NOFILE soft limit to the hard limit before it starts anything, so
every process it starts (the proxy included) inherits the raised limit. It makes itself a child
subreaper, so orphans of the systems it starts are reaped here, and kills every process it started
when a trial ends.
"""
import argparse
import json
import os
import platform
import pwd
import queue
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from common import become_subreaper, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers.py")
GIB = 1 << 30
MIB = 1 << 20
WINDOW_BYTES = 1 << 20
FIGURES = ("thr", "resp", "conn", "lat", "mem", "scale", "unprivileged", "redis", "tls")
BACKLOG = 1024  # socat's default listen backlog (5) drops SYNs at concurrency 8: 1 s retransmits


class BenchError(Exception):
    pass


def log(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def reap_descendants():
    """Kill and collect every process below the bench (all of them were started by this run)."""
    me = psutil.Process()
    for _ in range(3):
        procs = me.children(recursive=True)
        if not procs:
            return
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)


def kill_tree(popen):
    """SIGKILL a process we started and everything below it, and collect them."""
    try:
        root = psutil.Process(popen.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    try:
        popen.wait(timeout=1)
    except (subprocess.TimeoutExpired, ChildProcessError):
        pass


def tree(pid):
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def role(proc):
    """'receiver', 'forwarder', 'main' for the proxy's processes (by title), else the name."""
    try:
        # Joined: psutil splits a title on spaces when it does not end with a NUL (a long one).
        cmd = " ".join(proc.cmdline())
        if cmd.startswith("socketproxy: "):
            return cmd.split()[1]
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"


def tree_memory(pid, roles=None):
    """(processes, PSS, USS) summed over the process tree of pid; roles gets per-role sums."""
    count = pss = uss = 0
    for proc in tree(pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        count += 1
        pss += info.pss
        uss += info.uss
        if roles is not None:
            entry = roles.setdefault(role(proc), {"processes": 0, "pss": 0, "uss": 0})
            entry["processes"] += 1
            entry["pss"] += info.pss
            entry["uss"] += info.uss
    return count, pss, uss


class CpuSampler(threading.Thread):
    """Samples the CPU time of every process of a tree every 0.1 s (the last sample of a process
    that has exited stands for its total): CPU seconds per role, for diagnosis."""

    def __init__(self, pid, role_of=role):
        super().__init__(daemon=True)
        self.pid = pid
        self.role_of = role_of
        self.seen = {}  # pid -> (role, cpu seconds)
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            try:
                procs = tree(self.pid)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    name = self.seen[proc.pid][0] if proc.pid in self.seen else self.role_of(proc)
                    self.seen[proc.pid] = (name, t.user + t.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass

    def stop(self):
        self.done.set()
        self.join()
        roles = {}
        for name, cpu in self.seen.values():
            roles[name] = round(roles.get(name, 0.0) + cpu, 3)
        return roles


# -- peers (sinks and sources, bench/peers.py) --------------------------------------------------

class Peer:
    """A sink or source process; its stdout lines arrive on a queue."""

    def __init__(self, name, argv, stdin=False):
        self.name = name
        self.popen = subprocess.Popen([sys.executable, PEERS] + [str(a) for a in argv],
                                      stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word, timeout, soft=False):
        """The rest of the next line starting with word; None on timeout when soft."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if soft:
                    return None
                raise BenchError("%s: no %r within %.0f s" % (self.name, word, timeout)) from None
            if line is None:
                self.lines.put(None)
                raise BenchError("%s exited (status %s) before %r" % (self.name, self.popen.wait(), word))
            head, _, rest = line.partition(" ")
            if head == word:
                return rest

    def result(self, timeout):
        return json.loads(self.expect("result", timeout))

    def send(self, line):
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()


SINK_FLAGS = []  # ["--no-crc"] with bench.py --no-crc


def start_sinks(count, mode, expect, size, timeout, extra=()):
    sinks = [Peer("sink%d" % i, ["sink", "--mode", mode, "--expect", expect, "--size", size,
                                 "--timeout", timeout] + SINK_FLAGS + list(extra)) for i in range(count)]
    ports = [int(s.expect("port", 10)) for s in sinks]
    return sinks, ports


def check_sinks(results, expect, what):
    """Raise unless every sink got every stream complete and correct."""
    for i, res in enumerate(results):
        problems = []
        if res.get("timeout"):
            problems.append("timed out")
        if res["complete"] != expect or res["good"] != expect:
            problems.append("%d/%d streams complete, %d good" % (res["complete"], expect, res["good"]))
        if res.get("missing_ids") or res.get("dup_ids"):
            problems.append("%d stream ids missing, %d duplicated" % (res["missing_ids"], res["dup_ids"]))
        if problems:
            raise BenchError("%s: destination %d: %s %s" % (what, i, "; ".join(problems), res.get("bad")))


# -- systems ------------------------------------------------------------------------------------

class System:
    key = "?"
    popen = None

    def start(self, ports, extra=()):
        """Start for these sink ports; the addresses the source must connect to."""
        raise NotImplementedError

    def wait_listening(self, port, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError("%s exited with status %s at start%s" % (self.key, self.popen.returncode,
                                                                          self.stderr_tail()))
            try:
                conns = psutil.Process(self.popen.pid).net_connections("tcp")
            except psutil.NoSuchProcess:
                conns = []
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return
            time.sleep(0.01)
        raise BenchError("%s not listening on %d after %.0f s" % (self.key, port, timeout))

    def stderr_tail(self):
        return ""

    def log_tail(self):
        """The last lines of the log file the system writes to (log_path, from log_start on)."""
        try:
            with open(self.log_path) as f:
                f.seek(self.log_start)
                lines = f.read().splitlines()
        except OSError:
            return ""
        return (": " + " | ".join(lines[-3:])) if lines else ""

    def wait_idle(self, timeout=3.0):
        """Wait until the tree is back to its root process; True when it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not psutil.Process(self.popen.pid).children(recursive=True):
                    return True
            except psutil.NoSuchProcess:
                return False
            time.sleep(0.02)
        return False

    def log_summary(self):
        return {}

    def cpu_seconds(self):
        """CPU of the root plus every child it has collected (children collect theirs)."""
        try:
            t = psutil.Process(self.popen.pid).cpu_times()
        except psutil.NoSuchProcess:
            return None
        return t.user + t.system + t.children_user + t.children_system

    def stop(self):
        if self.popen is not None:
            kill_tree(self.popen)
            self.popen = None


class Direct(System):
    key = "direct"

    def start(self, ports, extra=()):
        return ["127.0.0.1:%d" % p for p in ports]

    def cpu_seconds(self):
        return None


class Socat(System):
    """listen: the listening address type and options after the common ones (OPENSSL-LISTEN, cert=...);
    dest: the destination address for a port (OPENSSL:127.0.0.1:%d,cafile=...)."""

    def __init__(self, bufsize=None, listen=("TCP-LISTEN", ""), dest="TCP:127.0.0.1:%d"):
        self.bufsize = bufsize
        self.key = "socat-b256k" if bufsize else "socat"
        self.listen, self.dest = listen, dest

    def start(self, ports, extra=()):
        assert len(ports) == 1
        port = free_port()
        argv = ["socat"] + (["-b", str(self.bufsize)] if self.bufsize else []) + [
            "%s:%d,fork,reuseaddr,bind=127.0.0.1,backlog=%d%s" % (self.listen[0], port, BACKLOG, self.listen[1]),
            self.dest % ports[0]]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.wait_listening(port)
        return ["127.0.0.1:%d" % port]


class SocatTee(System):
    key = "socat+tee"

    def __init__(self, tmpdir, listen=("TCP-LISTEN", ""), dest="TCP:127.0.0.1:%d"):
        self.tmpdir = tmpdir
        self.listen, self.dest = listen, dest  # as Socat's

    def start(self, ports, extra=()):
        assert len(ports) >= 2
        port = free_port()
        script = os.path.join(self.tmpdir, "tee-%d.sh" % port)
        subs = " ".join(">(socat -u - %s)" % (self.dest % p) for p in ports[:-1])
        with open(script, "w") as f:
            f.write("#!/bin/bash\ntee %s | socat -u - %s\n" % (subs, self.dest % ports[-1]))
        os.chmod(script, 0o755)
        argv = ["socat", "%s:%d,fork,reuseaddr,bind=127.0.0.1,backlog=%d%s" % (self.listen[0], port, BACKLOG,
                                                                               self.listen[1]),
                "EXEC:%s" % script]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.wait_listening(port)
        return ["127.0.0.1:%d" % port]


AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def why_not_nobody():
    """None when the proxy can run as nobody here, else why not (for the skip line)."""
    if os.geteuid() != 0:
        return "the bench is not running as root, so it cannot switch to nobody"
    if not shutil.which("setpriv"):
        return "setpriv is not installed (util-linux)"
    try:
        probe = subprocess.run(AS_NOBODY + [sys.executable, "-c", "import psutil, docopt, setproctitle"],
                               cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "setpriv failed: %s" % exc
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["exit %d" % probe.returncode])[-1]
        return "nobody cannot run %s (%s; make builds .venv from /usr/bin/python3 so it can)" % (
            sys.executable, last)
    return None


class SocketProxy(System):
    key = "socketproxy"
    prefix = []  # what runs the proxy (setpriv for nobody)
    log_level = "warning"
    dest = "127.0.0.1:%d"  # a destination for a port (tls://127.0.0.1:%d)

    def __init__(self, tmpdir):
        self.log_path = os.path.join(tmpdir, "socketproxy.log")

    def start(self, ports, extra=()):
        port = free_port()
        level = [] if "--log-level" in extra else ["--log-level", self.log_level]
        argv = self.prefix + [sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-host", "127.0.0.1",
                              "--listen-port", str(port)] + level + list(extra) + [
                                  self.dest % p for p in ports]
        self.log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "a") as err:
            self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=err)
        self.wait_listening(port)
        return ["127.0.0.1:%d" % port]

    stderr_tail = System.log_tail

    def log_summary(self):
        """Warnings and errors the proxy logged during the trial; the pipe size it logged at start
        (at info level: `pipes of N KiB`, logged only under a pipe budget) and any pipe refusal."""
        try:
            with open(self.log_path) as f:
                f.seek(self.log_start)
                text = f.read()
        except OSError:
            return {}
        lines = [l for l in text.splitlines() if " WARNING " in l or " ERROR " in l]
        out = {"proxy_log_lines": len(lines), "proxy_log_first": lines[:3]} if lines else {}
        planned = re.search(r"pipes of (\d+) KiB", text)
        if planned:
            out["pipe_kib"] = int(planned.group(1))
        if "kernel refused a pipe" in text:
            out["pipe_refused"] = True
        if "Traceback" in text:  # the exception line that follows each traceback
            tail = text.split("Traceback")[-1].strip().splitlines()
            out["proxy_traceback"] = tail[-1] if tail else "?"
        return out

    def stop(self):
        """SIGTERM first (the proxy ends its own tree within 3 s), then kill what is left."""
        if self.popen is None:
            return
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log("  %s did not exit within 5 s of SIGTERM; killing its tree" % self.key)
        super().stop()


class SocketProxyWith(SocketProxy):
    """The proxy with fixed options (the record and backlog rows), destinations as dest says."""

    def __init__(self, tmpdir, key, options, dest=None):
        super().__init__(tmpdir)
        self.key = key
        self.options = list(options)
        self.dest = dest or self.dest

    def start(self, ports, extra=()):
        return super().start(ports, self.options + list(extra))


class SocketProxyNobody(SocketProxy):
    """The proxy as the unprivileged user nobody (setpriv), its pipes within nobody's pipe budget."""
    key = "socketproxy-nobody"
    prefix = AS_NOBODY
    log_level = "info"  # for `pipes of N KiB`

    def start(self, ports, extra=()):
        addrs = super().start(ports, extra)
        uid = psutil.Process(self.popen.pid).uids().effective
        if uid != pwd.getpwnam("nobody").pw_uid:
            raise BenchError("%s runs as uid %d, not nobody" % (self.key, uid))
        return addrs


class DirectTLS(Direct):
    """The source speaks TLS to TLS sinks itself (the tls figure's baseline)."""
    key = "direct-tls"


class Stunnel(System):
    """stunnel as a TLS server for the sources (client=False) or a TLS client of the destination."""
    key = "stunnel"

    def __init__(self, tmpdir, binary, certs, client):
        self.tmpdir, self.binary, self.certs, self.client = tmpdir, binary, certs, client
        self.log_path = os.path.join(tmpdir, "stunnel.log")

    def start(self, ports, extra=()):
        assert len(ports) == 1
        port = free_port()
        conf = os.path.join(self.tmpdir, "stunnel-%d.conf" % port)
        lines = ["foreground = yes", "pid =", "syslog = no", "[bench]", "accept = 127.0.0.1:%d" % port,
                 "connect = 127.0.0.1:%d" % ports[0]]
        if self.client:
            lines += ["client = yes", "CAfile = %s" % self.certs["ca"], "verifyChain = yes", "checkIP = 127.0.0.1"]
        else:
            lines += ["cert = %s" % self.certs["server"]]
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "a") as err:
            self.popen = subprocess.Popen([self.binary, conf], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.wait_listening(port)
        return ["127.0.0.1:%d" % port]

    stderr_tail = System.log_tail


def make_certs(tmpdir):
    """A CA and a certificate for 127.0.0.1 issued by it, as PEM files in tmpdir: {"ca", "server"} (the
    server file holds the key and the chain); None when trustme is not installed."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certs = {"ca": os.path.join(tmpdir, "tls-ca.pem"), "server": os.path.join(tmpdir, "tls-server.pem")}
    ca.cert_pem.write_to_path(certs["ca"])
    server.private_key_and_cert_chain_pem.write_to_path(certs["server"])
    os.chmod(certs["server"], 0o600)  # it holds the key (stunnel warns otherwise)
    return certs


# -- figures ------------------------------------------------------------------------------------

def run_trial(system, fn, *args):
    """One measurement; whatever happens, everything it started is gone afterwards."""
    try:
        res = fn(system, *args)
    except BenchError as exc:
        res = {"error": str(exc)}
    except (OSError, ValueError, KeyError, TypeError, psutil.Error) as exc:
        res = {"error": "%s: %s" % (type(exc).__name__, exc)}
    finally:
        try:
            system.stop()
        finally:
            reap_descendants()
    res.update(system.log_summary())
    return res


def trial_throughput(system, dests, size, sink_extra=(), source_extra=()):
    timeout = 30 + size * dests / 20e6
    sinks, ports = start_sinks(dests, "stream", 1, size, timeout, sink_extra)
    addrs = system.start(ports)
    sampler = None
    if system.popen is not None:
        sampler = CpuSampler(system.popen.pid)
        sampler.start()
    source = Peer("source", ["bulk", "--addrs", ",".join(addrs), "--size", size] + list(source_extra))
    try:
        results = [s.result(timeout + 5) for s in sinks]
        src = source.result(10)
    finally:
        cpu_roles = sampler.stop() if sampler else None
    check_sinks(results, 1, "throughput")
    seconds = (max(r["t_last_eof"] for r in results) - src["t0"]) / 1e9
    out = {"mbps": size / seconds / 1e6, "seconds": seconds,
           "source_busy": src["busy"],
           "sink_busy": max(r["busy"] or 0 for r in results)}
    if system.popen is not None:
        system.wait_idle()
        out["cpu_s"] = system.cpu_seconds()
        out["cpu_s_by_role"] = cpu_roles
    return out


def trial_tls(system, dests, size, part, certs):
    """trial_throughput with TLS on one side of the relay: part "source" (the source speaks TLS to the
    system, the sinks are plain) or "dest" (a plain source, TLS sinks); direct-tls both."""
    direct = isinstance(system, DirectTLS)
    return trial_throughput(system, dests, size,
                            ["--tls-cert", certs["server"]] if part == "dest" or direct else [],
                            ["--tls-ca", certs["ca"]] if part == "source" or direct else [])


def resp_block(value_size):
    """About 1 MiB of whole Redis commands: SET key:N with value_size-byte values."""
    value = bytes(random.Random(value_size).choice(b"abcdef\r\n") for _ in range(value_size))
    command = b"*3\r\n$3\r\nSET\r\n$12\r\nkey:%%08d\r\n$%d\r\n%s\r\n" % (value_size, value.replace(b"%", b"%%"))
    count = max(1, MIB // len(command % 0))
    return b"".join(command % i for i in range(count))


class CountingSink(threading.Thread):
    """A destination in this process: accepts one connection and counts its bytes to EOF."""

    def __init__(self):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received, self.t_eof = 0, None

    def run(self):
        self.server.settimeout(60)
        conn, _ = self.server.accept()
        buf = bytearray(WINDOW_BYTES)
        with conn:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                self.received += n
        self.t_eof = time.monotonic()
        self.server.close()


def trial_resp(system, dests, size, value_size):
    """One source streaming SET commands (whole commands in every write) through the proxy."""
    block = resp_block(value_size)
    repeats = max(1, size // len(block))
    sinks = [CountingSink() for _ in range(dests)]
    for sink in sinks:
        sink.start()
    host, port = system.start([sink.port for sink in sinks])[0].rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port))) as sock:
        for _ in range(repeats):
            sock.sendall(block)
    timeout = 60 + size / 5e6
    for sink in sinks:
        sink.join(timeout)
    total = repeats * len(block)
    short = [sink.received for sink in sinks if sink.received != total or sink.t_eof is None]
    if short:
        raise BenchError("resp: destinations got %s of %d bytes" % (short, total))
    seconds = max(sink.t_eof for sink in sinks) - t0
    return {"mbps": total / seconds / 1e6, "commands_per_s": total / len(block) * block.count(b"SET") / seconds,
            "seconds": seconds}


def trial_connections(system, dests, count, concurrency, size=1024, interval=0):
    timeout = 30 + count / 10 + count * interval
    sinks, ports = start_sinks(dests, "stream", count, size, timeout, ["--first-bytes"])
    addrs = system.start(ports)
    per_conn = addrs if system.key == "direct" else addrs[:1]
    source = Peer("source", ["conns", "--addrs", ",".join(per_conn), "--count", count,
                             "--concurrency", concurrency, "--size", size, "--interval", interval])
    results = [s.result(timeout + 5) for s in sinks]
    src = source.result(10)
    if src["n_errors"]:
        raise BenchError("connections: %d sources failed: %s" % (src["n_errors"], src["errors"]))
    check_sinks(results, count, "connections")
    seconds = (max(r["t_last_eof"] for r in results) - src["t0"]) / 1e9
    # From the source's connect to its first bytes at the last destination to get them.
    first = sorted((max(r["first_bytes"][ident] for r in results) - began) / 1e6
                   for ident, began in src["connecting"].items())
    out = {"conns_per_s": count / seconds, "seconds": seconds, "first_byte_p50_ms": first[len(first) // 2],
           "first_byte_p99_ms": first[min(len(first) - 1, len(first) * 99 // 100)]}
    if system.popen is not None:
        system.wait_idle()
        out["cpu_s"] = system.cpu_seconds()
    return out


def trial_latency(system, dests, count, rate=1000):
    timeout = 30 + count / rate * 2
    sinks, ports = start_sinks(dests, "latency", 1, count * 64, timeout)
    addrs = system.start(ports)
    source = Peer("source", ["latency", "--addrs", ",".join(addrs), "--count", count, "--rate", rate])
    results = [s.result(timeout + 5) for s in sinks]
    source.result(10)
    check_sinks(results, 1, "latency")
    return {"p50_us": max(r["p50_us"] for r in results), "p99_us": max(r["p99_us"] for r in results),
            "max_us": max(r["max_us"] for r in results),
            "per_destination": [{k: r[k] for k in ("p50_us", "p99_us", "max_us", "samples")} for r in results]}


def trial_memory(system, dests, count, size=1024):
    timeout = 120
    sinks, ports = start_sinks(dests, "stream", count, size, timeout)
    addrs = system.start(ports)
    _, base_pss, base_uss = tree_memory(system.popen.pid)
    source = Peer("source", ["hold", "--addrs", ",".join(addrs), "--count", count, "--messages", 1,
                             "--size", size], stdin=True)
    source.expect("connected", 60)
    source.expect("sent", 30)
    for sink in sinks:
        sink.expect("accepted", 60)
    time.sleep(0.5)  # the first bytes reach every destination; forks and connects have settled
    roles = {}
    procs, pss, uss = tree_memory(system.popen.pid, roles)
    source.send("close")
    results = [s.result(timeout) for s in sinks]
    check_sinks(results, count, "memory")
    return {"processes": procs, "pss_total": pss, "uss_total": uss, "pss_idle": base_pss,
            "uss_idle": base_uss, "pss_per_conn": pss / count, "uss_per_conn": uss / count,
            "pss_per_conn_added": (pss - base_pss) / count, "uss_per_conn_added": (uss - base_uss) / count,
            "by_role": {name: {"processes": r["processes"], "pss_kib_each": round(r["pss"] / r["processes"] / 1024),
                               "uss_kib_each": round(r["uss"] / r["processes"] / 1024)}
                        for name, r in roles.items()}}


def trial_scale(system, dests, count, duration, messages=10, size=1000):
    timeout = 120 + duration * 3
    sinks, ports = start_sinks(dests, "stream", count, size, timeout)
    extra = ["--max-connections", str(count + 100)] if system.key == "socketproxy" else []
    addrs = system.start(ports, extra)
    per_source = addrs if system.key == "direct" else addrs[:1]
    started = time.monotonic()
    source = Peer("source", ["hold", "--addrs", ",".join(per_source), "--count", count,
                             "--messages", messages, "--size", size, "--duration", duration], stdin=True)
    connect_s = float(source.expect("connected", 120).split()[1])
    full = 1 + count * (1 + dests)  # the proxy's processes with every source served
    peak, timeline, all_held_s = 0, [], None
    connected_at = time.monotonic()
    while True:
        sent = source.expect("sent", 1.0, soft=True)
        if system.popen is not None:
            n = len(tree(system.popen.pid))
            elapsed = time.monotonic() - connected_at
            timeline.append((round(elapsed, 2), n))
            peak = max(peak, n)
            if n >= full and all_held_s is None:
                all_held_s = elapsed
        if sent is not None:
            break
        if time.monotonic() - started > timeout:
            raise BenchError("scale: sources did not finish sending")
    # Every source is still open (they close on "close"): give the last forks a moment to show.
    settle = time.monotonic() + 10
    while system.popen is not None and peak < full and time.monotonic() < settle:
        n = len(tree(system.popen.pid))
        peak = max(peak, n)
        if n >= full and all_held_s is None:
            all_held_s = time.monotonic() - connected_at
        time.sleep(0.2)
    source.send("close")
    results = [s.result(timeout) for s in sinks]
    check_sinks(results, count, "scale")
    out = {"delivered": True, "connect_s": connect_s, "peak_processes": peak or None}
    if system.popen is not None:
        out["held_all"] = peak >= full if system.key == "socketproxy" else None
        out["all_held_after_s"] = all_held_s
        out["process_timeline"] = timeline
        t = time.monotonic()
        out["back_to_one"] = system.wait_idle(timeout=60)
        out["back_to_one_s"] = time.monotonic() - t
        out["processes_after"] = len(tree(system.popen.pid))
    return out


def trial_unprivileged(system, dests, size, held=48, small=1024):
    """A first source streams size bytes; held more connect, send small bytes each and stay; then
    one more streams size bytes. MB/s of the first and of the last stream, every byte checked."""
    count = held + 2
    first_id, last_id = held, held + 1  # hold numbers its streams 0 .. held - 1
    timeout = 60 + 4 * size * dests / 20e6
    sinks, ports = start_sinks(dests, "stream", count, small, timeout,
                               ["--sizes", "%d:%d,%d:%d" % (first_id, size, last_id, size)])
    addrs = system.start(ports, ["--log-level", "info"])  # `pipes of N KiB` under any pipe budget
    per_source = addrs if system.popen is None else addrs[:1]

    def stream(ident):
        src = Peer("source%d" % ident, ["bulk", "--addrs", ",".join(per_source), "--size", size, "--ident", ident])
        eofs = []
        for sink in sinks:
            got, t = sink.expect("eof", timeout).split()
            if int(got) != ident:
                raise BenchError("unprivileged: stream %s ended where %d was expected" % (got, ident))
            eofs.append(int(t))
        t0 = src.result(10)["t0"]
        return size / ((max(eofs) - t0) / 1e9) / 1e6

    first = stream(first_id)
    if system.popen is not None and not system.wait_idle(10):  # the first source's group has ended
        raise BenchError("unprivileged: the first source's group still runs 10 s after its end")
    hold = Peer("held", ["hold", "--addrs", ",".join(per_source), "--count", held, "--messages", 1,
                         "--size", small], stdin=True)
    hold.expect("connected", 60)
    hold.expect("sent", 30)
    if system.popen is not None:
        full = 1 + held * (1 + dests)  # main and every held source's group, so every pipe made
        deadline = time.monotonic() + 60
        while len(tree(system.popen.pid)) < full:
            if time.monotonic() > deadline:
                raise BenchError("unprivileged: %d of %d processes after 60 s" % (len(tree(system.popen.pid)), full))
            time.sleep(0.05)
    time.sleep(0.5)  # forwarders connected, the small streams delivered
    last = stream(last_id)
    hold.send("close")
    results = [s.result(timeout) for s in sinks]
    check_sinks(results, count, "unprivileged")
    return {"first_mbps": first, "last_mbps": last, "ratio": last / first, "streams": count,
            "bytes_per_destination": 2 * size + held * small}


REDIS_RESULT = re.compile(r"^([A-Z_]+)(?: \([^)]*\))?: ([\d.]+) requests per second")
REDIS_PROGRESS = re.compile(r"^[A-Z_]+(?: \([^)]*\))?: rps=")
REDIS_CLIENTS = 20


def start_redis(tmpdir):
    """A redis-server on a free loopback port, no persistence, answering PING: (Popen, port)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="redis-%d-" % port, dir=tmpdir)
    popen = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--daemonize", "no", "--dir", workdir],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        if popen.poll() is not None:
            raise BenchError("redis-server on %d exited with status %s at start" % (port, popen.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return popen, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            kill_tree(popen)
            raise BenchError("redis-server on %d does not answer PING after 15 s" % port)
        time.sleep(0.05)


def redis_role(proc):
    """A relay's process kind for the CPU per request: the primary's forwarder and a mirror's apart."""
    kind = role(proc)
    if kind == "forwarder":
        try:
            return "primary" if "(primary)" in " ".join(proc.cmdline()) else "mirror"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return "?"
    return kind


def cpu_of(popen):
    try:
        t = psutil.Process(popen.pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def trial_redis(system, dests, requests, tmpdir):
    """redis-benchmark -t set,incr -n requests -c 20 -q to dests[0]: straight (D=1), or through the proxy
    with --primary to it and a shadow (D=2). Requests per second of SET and INCR; an exit status or an
    error line (anything but progress and results in -q output) fails the trial. Also the CPU each kind
    of process spent per request (us_ROLE: the relay's processes by kind, sampled every 0.1 s, so a
    process's last tenth of a second may be missed; us_redis: the servers, the shadow's included)."""
    servers = []
    try:
        for _ in range(dests):
            servers.append(start_redis(tmpdir))
        host, port = system.start([p for _, p in servers])[0].rsplit(":", 1)
        timeout = 60 + requests / 1000
        sampler = CpuSampler(system.popen.pid, redis_role) if system.popen is not None else None
        if sampler is not None:
            sampler.start()
        servers_cpu = sum(cpu_of(popen) for popen, _ in servers)
        t0 = time.monotonic()
        try:
            done = subprocess.run(["redis-benchmark", "-h", host, "-p", port, "-t", "set,incr", "-n", str(requests),
                                   "-c", str(REDIS_CLIENTS), "-q"], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError("redis: redis-benchmark did not finish within %.0f s" % timeout) from None
        finally:
            cpu_roles = sampler.stop() if sampler is not None else {}
        seconds = time.monotonic() - t0
        per_request = 1e6 / (2 * requests)  # SET and INCR
        cpu = {"us_redis": (sum(cpu_of(popen) for popen, _ in servers) - servers_cpu) * per_request}
        cpu.update(("us_" + name, value * per_request) for name, value in cpu_roles.items() if name != "?")
        rps, errors = {}, []
        for line in re.split(r"[\r\n]+", done.stdout + done.stderr):
            line = line.strip()
            result = REDIS_RESULT.match(line)
            if result:
                rps[result.group(1)] = float(result.group(2))
            elif line and not REDIS_PROGRESS.match(line):
                errors.append(line)
        if done.returncode or errors or not {"SET", "INCR"} <= set(rps):
            raise BenchError("redis: redis-benchmark exit %d, results %s, %d error lines %s" % (
                done.returncode, rps, len(errors), errors[:3]))
        return dict(cpu, set_ops=rps["SET"], incr_ops=rps["INCR"], seconds=seconds)
    finally:
        for popen, _ in servers:
            kill_tree(popen)


# -- the run ------------------------------------------------------------------------------------

def rotated(items, k):
    k %= len(items)
    return items[k:] + items[:k]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_figure(name, combos, rounds, fn, args_for, metric, out):
    """Rounds of every (system, D), order rotated each round; the trials go to out[name]."""
    trials = out.setdefault(name, {})
    for r in range(rounds):
        for system, dests in rotated(combos, r):
            key = "%s D=%d" % (system.key, dests)
            t = time.monotonic()
            res = run_trial(system, fn, dests, *args_for(dests))
            res["round"] = r + 1
            trials.setdefault(key, []).append(res)
            shown = res.get("error") or metric(res)
            log("[%s %d/%d] %-22s %s  (%.1f s)" % (name, r + 1, rounds, key, shown, time.monotonic() - t))


def paired_ratio(trials, key, ref_key, field, invert=False):
    """Median over rounds of value(key)/value(ref_key), each ratio within one round."""
    a = {t["round"]: t.get(field) for t in trials.get(key, []) if "error" not in t}
    b = {t["round"]: t.get(field) for t in trials.get(ref_key, []) if "error" not in t}
    ratios = [a[r] / b[r] for r in a if r in b and a[r] and b[r]]
    return median(ratios)


def summarize(out, scale_n=1000):
    """Medians per (figure, system, D), ratios, and the targets."""
    summary, targets = {}, []

    def val(fig, key, field):
        trials = out.get(fig, {}).get(key, [])
        return median([t.get(field) for t in trials if "error" not in t])

    for fig, trials in out.items():
        for key, runs in trials.items():
            fields = sorted({f for t in runs for f, v in t.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool) and f != "round"})
            summary.setdefault(fig, {})[key] = {f: val(fig, key, f) for f in fields}
            summary[fig][key]["errors"] = [t["error"] for t in runs if "error" in t]

    def target(text, value, limit, higher_is_better=True, unit="x"):
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= limit if higher_is_better else value <= limit) else "FAIL"
        targets.append({"target": text, "value": value, "limit": limit, "verdict": verdict, "unit": unit})

    thr = out.get("throughput", {})
    if thr:
        for d, limit in ((1, 0.75), (2, 0.5), (4, 0.3)):
            target("throughput D=%d: socketproxy >= %.2fx direct per stream" % (d, limit),
                   paired_ratio(thr, "socketproxy D=%d" % d, "direct D=%d" % d, "mbps"), limit)
        for d in (1, 2):
            target("throughput D=%d: socketproxy as nobody >= 0.9x as root (pipes follow demand)" % d,
                   paired_ratio(thr, "socketproxy-nobody D=%d" % d, "socketproxy D=%d" % d, "mbps"), 0.9)
        target("throughput D=1: socketproxy >= socat -b 262144",
               paired_ratio(thr, "socketproxy D=1", "socat-b256k D=1", "mbps"), 1.0)
        target("throughput D=2: socketproxy >= 5x socat+tee",
               paired_ratio(thr, "socketproxy D=2", "socat+tee D=2", "mbps"), 5.0)
        for d in (1, 2):
            target("throughput D=%d: --buffer 4M --framing line >= 0.9x --buffer 0" % d,
                   paired_ratio(thr, "socketproxy-line D=%d" % d, "socketproxy-buffer0 D=%d" % d, "mbps"), 0.9)
    for fig in ("resp-small", "resp-large"):
        for d in (1, 2):  # no target: what finding command boundaries costs, measured
            value = paired_ratio(out.get(fig, {}), "socketproxy-resp D=%d" % d, "socketproxy-buffer0 D=%d" % d, "mbps")
            if value is not None:
                targets.append({"target": "%s D=%d: --framing resp / --buffer 0 (measured, no target)" % (fig, d),
                                "value": value, "limit": None, "verdict": "info", "unit": "x"})
    conn = out.get("connections", {})
    if conn:
        for system in ("socketproxy", "socketproxy-spares"):
            target("connections/s D=2: %s >= 2x socat+tee" % system,
                   paired_ratio(conn, "%s D=2" % system, "socat+tee D=2", "conns_per_s"), 2.0)
            target("connections/s D=1: %s >= 1x socat fork" % system,
                   paired_ratio(conn, "%s D=1" % system, "socat D=1", "conns_per_s"), 1.0)
    lat = out.get("latency", {})
    if lat:
        for d in (1, 2):
            target("latency p99 D=%d: socketproxy <= 1.5x socat fork (D=1) p99" % d,
                   paired_ratio(lat, "socketproxy D=%d" % d, "socat D=1", "p99_us"), 1.5, higher_is_better=False)
    mem = summary.get("memory", {}).get("socketproxy D=2")
    if mem:
        value = mem.get("pss_per_conn")
        target("memory D=2: socketproxy PSS per connection <= 1.5 MiB (whole tree / sources)",
               value / MIB if value else None, 1.5, higher_is_better=False, unit="MiB")
    for key, runs in out.get("unprivileged", {}).items():
        errors = [t["error"] for t in runs if "error" in t]
        value = summary["unprivileged"][key].get("ratio")
        verdict = "n/a" if value is None and not errors else (
            "PASS" if not errors and value >= 0.5 else "FAIL")
        targets.append({"target": "unprivileged %s: 50th/1st MB/s >= 0.5, every byte" % key,
                        "value": value, "limit": 0.5, "verdict": verdict, "unit": "x", "errors": errors})
    unpriv = out.get("unprivileged", {})
    if "socketproxy-nobody D=2" in unpriv and "socketproxy D=2" in unpriv:
        for field, which in (("first_mbps", "1st"), ("last_mbps", "50th")):
            target("unprivileged: nobody's %s stream >= 0.9x root's (pipes follow demand)" % which,
                   paired_ratio(unpriv, "socketproxy-nobody D=2", "socketproxy D=2", field), 0.9)
    red = out.get("redis", {})
    if red:
        for test, field in (("SET", "set_ops"), ("INCR", "incr_ops")):
            target("redis-benchmark through --primary, no shadow, >= socat (%s)" % test,
                   paired_ratio(red, "socketproxy-primary D=1", "socat D=1", field), 1.0)
            target("redis-benchmark through --primary with a shadow >= 0.7x direct (%s; informational)" % test,
                   paired_ratio(red, "socketproxy-primary D=2", "direct D=1", field), 0.7)
            target("redis-benchmark through --primary with a shadow >= socat to the primary alone (%s)" % test,
                   paired_ratio(red, "socketproxy-primary D=2", "socat D=1", field), 1.0)
    scale = out.get("scale", {}).get("socketproxy D=2")
    if scale:
        ok = bool(scale) and all("error" not in t and t.get("back_to_one") and t.get("held_all")
                                 for t in scale)
        errors = [t.get("error") for t in scale if "error" in t]
        targets.append({"target": "scale: %d x 2 held, every byte delivered, process count back to 1" % scale_n,
                        "value": ok, "limit": True, "verdict": "PASS" if ok else "FAIL",
                        "unit": "", "errors": errors})
    return summary, targets


def fmt(value, spec="%.0f"):
    return "-" if value is None else spec % value


def print_report(out, summary, targets, params):
    print()
    print("SocketProxy bench, %s, %s, %d CPUs, scale %g, %d round(s)%s" % (
        params["date"], params["machine"]["node"], params["machine"]["cpus"], params["scale"],
        params["rounds"], "" if params["socat"] else ", socat not installed: socat rows skipped"))
    thr = out.get("throughput", {})
    if thr:
        print("\nThroughput: one source, %d MiB, MB/s per destination stream (every byte checked)" % (
            params["thr_bytes"] // MIB))
        print("  %-18s %3s %9s %9s %10s %11s %9s %6s" % ("system", "D", "MB/s", "x direct", "x socat-b",
                                                        "x socat+tee", "CPU s/GB", "sink%"))
        for key in thr:
            system, d = key.split(" D=")
            s = summary["throughput"][key]
            cpu = s.get("cpu_s")
            gb = params["thr_bytes"] * int(d) / 1e9
            print("  %-18s %3s %9s %9s %10s %11s %9s %6s%s" % (
                system, d, fmt(s.get("mbps")), fmt(paired_ratio(thr, key, "direct D=%s" % d, "mbps"), "%.2f"),
                fmt(paired_ratio(thr, key, "socat-b256k D=1", "mbps"), "%.2f") if d == "1" else "",
                fmt(paired_ratio(thr, key, "socat+tee D=%s" % d, "mbps"), "%.2f") if d != "1" else "",
                fmt(cpu / gb if cpu else None, "%.2f"), fmt(s.get("sink_busy") and 100 * s["sink_busy"]),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
        print("  (CPU s/GB: CPU seconds of the system's whole tree per GB delivered to all destinations;\n"
              "   socat+tee misses its orphaned process-substitution socats. sink%: busiest sink's CPU time\n"
              "   from its accept to its last EOF over that time; below 100 = the sinks are not the limit)")
        for d in ("1", "2", "4"):
            s = summary["throughput"].get("socketproxy-nobody D=%s" % d)
            if s:
                print("  socketproxy-nobody D=%s: the proxy as nobody, pipes of %s KiB (as it logged at start)%s" % (
                    d, fmt(s.get("pipe_kib")), ", a pipe size REFUSED" if any(
                        t.get("pipe_refused") for t in thr["socketproxy-nobody D=%s" % d]) else ""))
        runs = [t.get("cpu_s_by_role") for t in thr.get("socketproxy D=1", []) if t.get("cpu_s_by_role")]
        if runs:
            print("  socketproxy D=1 CPU s by process (last round): %s" % ", ".join(
                "%s %.2f" % kv for kv in sorted(runs[-1].items())))
    conn = out.get("connections", {})
    if conn:
        print("\nConnection rate: %d connections, concurrency 8, 1 KiB each, until every destination has "
              "every stream" % params["conn_count"])
        print("  %-18s %3s %9s %9s %9s %9s %11s %11s" % ("system", "D", "conn/s", "x direct", "x socat", "x tee",
                                                      "1st byte50", "1st byte99"))
        for key in conn:
            system, d = key.split(" D=")
            s = summary["connections"][key]
            print("  %-18s %3s %9s %9s %9s %9s %8s ms %8s ms%s" % (
                system, d, fmt(s.get("conns_per_s")),
                fmt(paired_ratio(conn, key, "direct D=%s" % d, "conns_per_s"), "%.2f"),
                fmt(paired_ratio(conn, key, "socat D=1", "conns_per_s"), "%.2f") if d == "1" else "",
                fmt(paired_ratio(conn, key, "socat+tee D=%s" % d, "conns_per_s"), "%.2f") if d != "1" else "",
                fmt(s.get("first_byte_p50_ms"), "%.1f"), fmt(s.get("first_byte_p99_ms"), "%.1f"),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
    one = out.get("connect-latency", {})
    if one:
        print("\nOne connection at a time: %d connections of 1 KiB, 30 ms apart; from the source's connect to its "
              "first bytes at the last destination" % max(16, params["conn_count"] // 5))
        print("  %-18s %3s %9s %9s %12s %12s" % ("system", "D", "p50 ms", "p99 ms", "x socat p50", "x socat p99"))
        for key in one:
            system, d = key.split(" D=")
            s = summary["connect-latency"][key]
            base = "socat D=1" if d == "1" else "socat+tee D=%s" % d
            print("  %-18s %3s %9s %9s %12s %12s%s" % (
                system, d, fmt(s.get("first_byte_p50_ms"), "%.2f"), fmt(s.get("first_byte_p99_ms"), "%.2f"),
                fmt(paired_ratio(one, key, base, "first_byte_p50_ms"), "%.2f"),
                fmt(paired_ratio(one, key, base, "first_byte_p99_ms"), "%.2f"),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
    lat = out.get("latency", {})
    if lat:
        print("\nLatency: %d x 64-byte messages at 1 kHz, one-way, worst destination, microseconds" %
              params["lat_count"])
        print("  %-16s %3s %8s %8s %8s %12s" % ("system", "D", "p50", "p99", "max", "p99 x socat"))
        for key in lat:
            system, d = key.split(" D=")
            s = summary["latency"][key]
            print("  %-16s %3s %8s %8s %8s %12s%s" % (
                system, d, fmt(s.get("p50_us")), fmt(s.get("p99_us")), fmt(s.get("max_us")),
                fmt(paired_ratio(lat, key, "socat D=1", "p99_us"), "%.2f"),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
    mem = summary.get("memory", {})
    if mem:
        print("\nMemory: %d open sources, whole process tree, KiB per connection" % params["mem_sources"])
        print("  %-16s %3s %6s %10s %10s %12s %12s" % ("system", "D", "procs", "PSS/conn", "USS/conn",
                                                       "PSS/conn +", "USS/conn +"))
        for key, s in mem.items():
            system, d = key.split(" D=")
            print("  %-16s %3s %6s %10s %10s %12s %12s%s" % (
                system, d, fmt(s.get("processes")), fmt(s.get("pss_per_conn", 0) / 1024 if s.get("pss_per_conn") else None),
                fmt(s.get("uss_per_conn") / 1024 if s.get("uss_per_conn") else None),
                fmt(s.get("pss_per_conn_added") / 1024 if s.get("pss_per_conn_added") else None),
                fmt(s.get("uss_per_conn_added") / 1024 if s.get("uss_per_conn_added") else None),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
        print("  (+ = above the idle tree measured before the sources connected)")
        rows = [(key, trial["by_role"]) for key, trials in out["memory"].items() for trial in trials[:1]
                if trial.get("by_role") and key.startswith("socketproxy")]
        if rows:
            print("  per process, KiB (PSS / USS each): %s" % "; ".join(
                "%s: %s" % (key, ", ".join("%s %d / %d" % (role_name, r["pss_kib_each"], r["uss_kib_each"])
                                           for role_name, r in sorted(roles.items())))
                for key, roles in rows))
    scale = out.get("scale", {})
    if scale:
        print("\nScale: %d concurrent sources, 10 messages each over %g s" % (params["scale_sources"],
                                                                         params["scale_duration"]))
        for key, runs in scale.items():
            for t in runs:
                if "error" in t:
                    print("  %-22s FAILED: %s" % (key, t["error"]))
                else:
                    held = {True: " (all held at once after %s s)" % fmt(t.get("all_held_after_s"), "%.1f"),
                            False: " (NOT all held at once)", None: ""}[t.get("held_all")]
                    print("  %-22s every byte delivered; connect %.1f s; peak processes %s%s; back to 1: %s%s" % (
                        key, t["connect_s"], fmt(t.get("peak_processes")), held,
                        {True: "yes", False: "NO", None: "-"}[t.get("back_to_one")],
                        " after %.1f s" % t["back_to_one_s"] if "back_to_one_s" in t else ""))
    unpriv = out.get("unprivileged", {})
    if unpriv:
        print("\nUnprivileged: D=2, --max-connections 256; a 1st source streams %d MiB, %d more send 1 KiB "
              "and stay,\n  then a 50th streams %d MiB; MB/s per destination stream" % (
                  params["unpriv_bytes"] // MIB, 48, params["unpriv_bytes"] // MIB))
        print("  %-18s %3s %6s %9s %9s %9s %7s %8s  %s" % ("system", "D", "pipes", "1st MB/s", "50th MB/s",
                                                           "50th/1st", "x root", "refused", "every byte"))
        for key, runs in unpriv.items():
            system, d = key.split(" D=")
            s = summary["unprivileged"][key]
            good = [t for t in runs if "error" not in t]
            vs_root = [paired_ratio(unpriv, key, "socketproxy D=%s" % d, field) for field in ("first_mbps", "last_mbps")]
            print("  %-18s %3s %6s %9s %9s %9s %7s %8s  %s%s" % (
                system, d, fmt(s.get("pipe_kib")), fmt(s.get("first_mbps")),
                fmt(s.get("last_mbps")), fmt(s.get("ratio"), "%.2f"),
                "/".join(fmt(v, "%.2f") for v in vs_root) if system != "socketproxy" else "",
                "yes" if any(t.get("pipe_refused") for t in runs) else "no",
                "yes, %d streams x %s destinations checked" % (good[0]["streams"], d) if good else "-",
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
        print("  (pipes: KiB per pipe as the proxy logged at start; - = none logged: no pipe budget (root), 1 MiB;\n"
              "   x root: the 1st/50th stream's MB/s against root's in the same round; refused: the proxy logged a\n"
              "   pipe size the kernel refused; target 50th/1st >= 0.5)")
    red = out.get("redis", {})
    if red:
        print("\nRedis: redis-benchmark -t set,incr -n %d -c %d -q, requests per second; D=2: socketproxy.py "
              "--primary to the\n  redis alone (D=1) and with a shadow redis (D=2, its replies discarded)" % (
                  params["redis_requests"],
                                                                                       REDIS_CLIENTS))
        print("  %-20s %3s %10s %10s %9s %9s" % ("system", "D", "SET/s", "INCR/s", "SET x", "INCR x"))
        for key in red:
            system, d = key.split(" D=")
            s = summary["redis"][key]
            print("  %-20s %3s %10s %10s %9s %9s%s" % (
                system, d, fmt(s.get("set_ops")), fmt(s.get("incr_ops")),
                fmt(paired_ratio(red, key, "direct D=1", "set_ops"), "%.2f"),
                fmt(paired_ratio(red, key, "direct D=1", "incr_ops"), "%.2f"),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
        kinds = ["socat", "main", "receiver", "primary", "mirror", "redis"]
        print("\n  Where the CPU goes: microseconds of CPU per request, by process kind (relay sampled every 0.1 s;\n"
              "  redis: the servers, the shadow's included; the client's is not counted)")
        print("  %-20s %3s" % ("system", "D") + "".join("%9s" % kind for kind in kinds) + "%9s" % "total")
        for key in red:
            system, d = key.split(" D=")
            s = summary["redis"][key]
            values = [s.get("us_" + kind) for kind in kinds]
            print("  %-20s %3s" % (system, d) + "".join("%9s" % fmt(v, "%.1f") for v in values) +
                  "%9s" % fmt(sum(v for v in values if v is not None), "%.1f"))
    for fig, what in (("tls-source", "the source speaks TLS to the relay, which writes plaintext to D plain sinks"),
                      ("tls-dest", "a plain source, the relay speaks TLS to D TLS sinks and verifies them")):
        trials = out.get(fig, {})
        if not trials:
            continue
        print("\nTLS %s: one stream, %d MiB, %s;\n  MB/s per destination stream (every byte checked, on the "
              "plaintext)" % ({"tls-source": "sources", "tls-dest": "destinations"}[fig], params["tls_bytes"] // MIB,
                                what))
        print("  %-18s %3s %9s %12s %9s %9s %6s" % ("system", "D", "MB/s", "x direct-tls", "x socat", "CPU s/GB",
                                                  "sink%"))
        for key in trials:
            system, d = key.split(" D=")
            s = summary[fig][key]
            cpu = s.get("cpu_s")
            gb = params["tls_bytes"] * int(d) / 1e9
            print("  %-18s %3s %9s %12s %9s %9s %6s%s" % (
                system, d, fmt(s.get("mbps")), fmt(paired_ratio(trials, key, "direct-tls D=%s" % d, "mbps"), "%.2f"),
                fmt(paired_ratio(trials, key, ("socat D=1" if d == "1" else "socat+tee D=%s" % d), "mbps"), "%.2f"),
                fmt(cpu / gb if cpu else None, "%.2f"), fmt(s.get("sink_busy") and 100 * s["sink_busy"]),
                "  ERRORS: %s" % s["errors"] if s["errors"] else ""))
        print("  (x socat: against socat at D=1, socat+tee at D=2; CPU s/GB and sink% as in the throughput table)")
    for what in ("tls", "stunnel"):
        if params.get(what + "_skipped"):
            print("\n(%s skipped: %s)" % ("tls figure" if what == "tls" else "stunnel rows", params[what + "_skipped"]))
    if params.get("redis_skipped"):
        print("\n(redis figure skipped: %s)" % params["redis_skipped"])
    if params.get("nobody_skipped"):
        print("\n(socketproxy-nobody rows skipped: %s)" % params["nobody_skipped"])
    if targets:
        print("\nTargets")
        for t in targets:
            value = t["value"]
            shown = ("%.2f%s" % (value, t["unit"]) if isinstance(value, float) else str(value)) if value is not None else "-"
            print("  %-4s %-72s %s" % (t["verdict"], t["target"], shown))


def main():
    parser = argparse.ArgumentParser(description="SocketProxy benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=float, default=float(os.environ.get("BENCH_SCALE", "1")))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default=",".join(FIGURES), help="figures to run, comma-separated (default: all: %s)"
                        % ",".join(FIGURES))
    parser.add_argument("--no-crc", action="store_true",
                        help="sinks skip the crc32 (count and byte-by-byte compare remain)")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    scale = 0.02 if args.quick and "BENCH_SCALE" not in os.environ and args.scale == 1 else args.scale
    rounds = args.rounds or (1 if args.quick else 3)
    only = set(args.only.split(","))
    if only - set(FIGURES):
        parser.error("--only: unknown figure %s (figures: %s)" % (",".join(sorted(only - set(FIGURES))),
                                                                ",".join(FIGURES)))
    if args.no_crc:
        SINK_FLAGS.append("--no-crc")

    become_subreaper()
    nofile = raise_nofile()
    have_socat = shutil.which("socat") is not None
    if not have_socat:
        print("socat is not installed: the socat and socat+tee rows are skipped (apt-get install socat)")
    params = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "scale": scale, "crc32": not args.no_crc, "rounds": rounds, "socat": have_socat,
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg(),
                    "nofile": nofile},
        "thr_bytes": max(4 * MIB, int(GIB * scale)), "conn_count": max(16, int(500 * scale)),
        "lat_count": max(200, int(2000 * scale)), "mem_sources": max(5, int(100 * scale)),
        "scale_sources": max(10, int(1000 * scale)), "scale_duration": max(0.5, 10 * scale),
        "unpriv_bytes": max(64 * MIB, int(GIB * scale)), "resp_bytes": max(8 * MIB, int(GIB * scale / 4)),
        "redis_requests": max(2000, int(100000 * scale)), "tls_bytes": max(4 * MIB, int(GIB * scale / 4)),
    }
    missing_redis = [tool for tool in ("redis-server", "redis-benchmark") if not shutil.which(tool)]
    if "redis" in only and missing_redis:
        params["redis_skipped"] = "%s not installed (make servers installs them)" % " and ".join(missing_redis)
        print("redis figure skipped: %s" % params["redis_skipped"])
    nobody_why = why_not_nobody() if only & {"thr", "unprivileged"} else None
    if nobody_why:
        print("socketproxy-nobody rows skipped (the proxy as the unprivileged user nobody): %s" % nobody_why)
        params["nobody_skipped"] = nobody_why
    if have_socat:
        params["socat_version"] = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout.splitlines()[1].strip()
    tmpdir = tempfile.mkdtemp(prefix="socketproxy-bench-")
    certs = make_certs(tmpdir) if "tls" in only else None
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if "tls" in only and not certs:
        params["tls_skipped"] = "trustme is not installed (it makes the certificates; pip install trustme)"
        print("tls figure skipped: %s" % params["tls_skipped"])
    elif "tls" in only and not stunnel:
        params["stunnel_skipped"] = "stunnel is not installed (apt-get install stunnel4)"
        print("stunnel rows skipped: %s" % params["stunnel_skipped"])
    direct, proxy, nobody = Direct(), SocketProxy(tmpdir), SocketProxyNobody(tmpdir)
    # The default keeps a --buffer 4M backlog (a tee per chunk); buffer0 is the plain byte stream.
    buffer0 = SocketProxyWith(tmpdir, "socketproxy-buffer0", ["--buffer", "0"])
    lines = SocketProxyWith(tmpdir, "socketproxy-line", ["--buffer", "4M", "--framing", "line"])
    resp = SocketProxyWith(tmpdir, "socketproxy-resp", ["--buffer", "4M", "--framing", "resp"])
    spares = SocketProxyWith(tmpdir, "socketproxy-spares", ["--spare-groups", "8"])
    socat, socat_b, tee = Socat(), Socat(262144), SocatTee(tmpdir)
    available = lambda combos: [c for c in combos if (have_socat or c[0] not in (socat, socat_b, tee))
                                 and (not nobody_why or c[0] is not nobody)]
    out = {}
    started = time.monotonic()
    try:
        if "thr" in only:
            combos = available([(direct, 1), (socat, 1), (socat_b, 1), (proxy, 1), (buffer0, 1), (lines, 1),
                                (nobody, 1), (direct, 2), (tee, 2), (proxy, 2), (buffer0, 2), (lines, 2),
                                (nobody, 2), (direct, 4), (tee, 4), (proxy, 4)])
            run_figure("throughput", combos, rounds, trial_throughput, lambda d: (params["thr_bytes"],),
                       lambda r: "%.0f MB/s" % r["mbps"], out)
        if "resp" in only:
            combos = [(buffer0, 1), (resp, 1), (buffer0, 2), (resp, 2)]
            for fig, value_size in (("resp-small", 100), ("resp-large", 16384)):
                run_figure(fig, combos, rounds, trial_resp, lambda d: (params["resp_bytes"], value_size),
                           lambda r: "%.0f MB/s, %.0f commands/s" % (r["mbps"], r["commands_per_s"]), out)
        if "conn" in only:
            combos = available([(direct, 1), (socat, 1), (proxy, 1), (spares, 1), (direct, 2), (tee, 2), (proxy, 2),
                                (spares, 2)])
            run_figure("connections", combos, rounds, trial_connections,
                       lambda d: (params["conn_count"], 8), lambda r: "%.0f conn/s, connect to first byte p50 %.1f "
                       "p99 %.1f ms" % (r["conns_per_s"], r["first_byte_p50_ms"], r["first_byte_p99_ms"]), out)
            # One at a time: what a source waits for when the proxy is not saturated (at concurrency 8
            # the figure above measures the listen queue as much as the proxy).
            run_figure("connect-latency", combos, rounds, trial_connections,
                       lambda d: (max(16, params["conn_count"] // 5), 1, 1024, 0.03), lambda r: "connect to first "
                       "byte p50 %.2f p99 %.2f ms" % (r["first_byte_p50_ms"], r["first_byte_p99_ms"]), out)
        if "lat" in only:
            combos = available([(direct, 1), (socat, 1), (proxy, 1), (direct, 2), (tee, 2), (proxy, 2)])
            run_figure("latency", combos, rounds, trial_latency, lambda d: (params["lat_count"],),
                       lambda r: "p50 %.0f p99 %.0f max %.0f us" % (r["p50_us"], r["p99_us"], r["max_us"]), out)
        if "mem" in only:
            mem_primary = SocketProxyWith(tmpdir, "socketproxy-primary", ["--primary"])
            combos = available([(proxy, 2), (lines, 2), (mem_primary, 2), (proxy, 4), (tee, 2), (socat, 1)])
            run_figure("memory", combos, 1, trial_memory, lambda d: (params["mem_sources"],),
                       lambda r: "%.0f KiB PSS/conn, %d processes" % (r["pss_per_conn"] / 1024, r["processes"]), out)
        if "scale" in only:
            combos = [(direct, 2), (proxy, 2)]
            run_figure("scale", combos, 1, trial_scale,
                       lambda d: (params["scale_sources"], params["scale_duration"]),
                       lambda r: "delivered; back to one: %s" % r.get("back_to_one", "-"), out)
        if "unprivileged" in only:
            combos = available([(proxy, 2), (nobody, 2)])
            run_figure("unprivileged", combos, rounds, trial_unprivileged, lambda d: (params["unpriv_bytes"],),
                       lambda r: "1st %.0f MB/s, 50th %.0f MB/s, 50th/1st %.2f, pipes %s KiB" % (
                           r["first_mbps"], r["last_mbps"], r["ratio"], r.get("pipe_kib", "-")), out)
        if certs:
            direct_tls = DirectTLS()
            server = ",cert=%s,verify=0" % certs["server"]
            verified = "OPENSSL:127.0.0.1:%%d,cafile=%s" % certs["ca"]
            proxy_src = SocketProxyWith(tmpdir, "socketproxy", ["--tls-cert", certs["server"]])
            proxy_dst = SocketProxyWith(tmpdir, "socketproxy", ["--tls-ca", certs["ca"]], dest="tls://127.0.0.1:%d")
            parts = {
                "source": [(direct_tls, 1), (Socat(listen=("OPENSSL-LISTEN", server)), 1),
                           (Stunnel(tmpdir, stunnel, certs, client=False), 1), (proxy_src, 1),
                           (direct_tls, 2), (SocatTee(tmpdir, listen=("OPENSSL-LISTEN", server)), 2), (proxy_src, 2)],
                "dest": [(direct_tls, 1), (Socat(dest=verified), 1), (Stunnel(tmpdir, stunnel, certs, client=True), 1),
                         (proxy_dst, 1), (direct_tls, 2), (SocatTee(tmpdir, dest=verified), 2), (proxy_dst, 2)]}
            for part, combos in parts.items():
                combos = [c for c in combos if (have_socat or not isinstance(c[0], (Socat, SocatTee)))
                          and (stunnel or not isinstance(c[0], Stunnel))]
                run_figure("tls-" + part, combos, rounds, trial_tls, lambda d: (params["tls_bytes"], part, certs),
                           lambda r: "%.0f MB/s" % r["mbps"], out)
        if "redis" in only and not missing_redis:
            primary = SocketProxyWith(tmpdir, "socketproxy-primary", ["--primary"])
            run_figure("redis", available([(direct, 1), (socat, 1), (primary, 1), (primary, 2)]), rounds, trial_redis,
                       lambda d: (params["redis_requests"], tmpdir),
                       lambda r: "SET %.0f/s, INCR %.0f/s" % (r["set_ops"], r["incr_ops"]), out)
    finally:
        reap_descendants()
        shutil.rmtree(tmpdir, ignore_errors=True)
    params["elapsed_s"] = time.monotonic() - started
    params["machine"]["loadavg_end"] = os.getloadavg()
    summary, targets = summarize(out, params["scale_sources"])
    print_report(out, summary, targets, params)
    print("\n%.0f s; results in %s" % (params["elapsed_s"], args.json))
    with open(args.json, "w") as f:
        json.dump({"params": params, "summary": summary, "targets": targets, "trials": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
