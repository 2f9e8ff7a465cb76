"""The cluster demo: 30 fake sources -> HAProxy -> 3 SocketProxy instances -> 2 fake destinations, on 127.0.0.1.

  python -m fakes.cluster_demo [--keep-logs]   (make cluster-demo)

HAProxy runs contrib/haproxy.cfg itself, its bind and server addresses replaced by free loopback ports (one
server line per instance, made from the file's first one). Every instance fans out to both destinations. Once
every source flows to both destinations, the demo kills -9 one instance's main, checks that the instance's whole
tree ends, that its sources reconnect through HAProxy to the other two and flow again, and that the sources of
the other two never lost a line; then it prints a summary and exits 0 only if every check held. Without haproxy
it says so and exits 0 (make cluster-demo first tries to install it). Every process it starts is ended, also on
Ctrl-C; the logs of every process (HAProxy's, each instance's, each fake's) are kept in a temporary directory
when a check fails or with --keep-logs, else removed.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from .demo import LIBC, PEER_LINE, PR_SET_CHILD_SUBREAPER, Stop, die_with_parent, free_ports, on_signal, record_of
from .demo import Narration, running, spans, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "contrib", "haproxy.cfg")
SCALE = float(os.environ.get("SOCKETPROXY_TEST_TIMEOUT_SCALE", "1"))
INSTANCES = ("sp1", "sp2", "sp3")
VICTIM = "sp2"
SOURCES = tuple("src-%02d" % n for n in range(1, 31))
DESTS = ("dst-1", "dst-2")
INTERVAL_S = 0.2  # between two lines of one source
START_S = 10 * SCALE  # a listener to listen
FLOW_S = 30 * SCALE  # every source to reach both destinations
TREE_S = 10 * SCALE  # the killed instance's tree to end (the README says 3 s)
MOVE_S = 20 * SCALE  # its sources to be served by the other two
RESUME_S = 10 * SCALE  # fresh lines of every moved source at both destinations
WATCH_S = 2.0  # time to let lines flow before the kill, and after the move before the checks
# option tcplog: client port, server, retries ('+N' when redispatched)
HAPROXY_LOG = re.compile(r"^\d+\.\d+\.\d+\.\d+:(\d+) \[[^]]*\] \S+ \S+?/(\S+) \S+ \S+ \S+ \d+/\d+/\d+/\d+/(\+?\d+) ")
HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")


def find_haproxy():
    """The haproxy command's path (also where /usr/sbin is not on PATH), or None."""
    found = shutil.which("haproxy")
    return found or next((path for path in HAPROXY_PATHS if os.access(path, os.X_OK)), None)


def render_config(template, listen_port, server_ports, host="127.0.0.1"):
    """template (contrib/haproxy.cfg's text) with its bind on host:listen_port and one server line per port,
    sp1, sp2, ... made from its first server line; everything else as it is."""
    lines, servers, binds = [], [], 0
    for line in template.splitlines():
        bind = re.match(r"^(\s*bind\s+)\S+(.*)$", line)
        server = re.match(r"^(\s*server\s+)\S+\s+\S+(.*)$", line)
        if bind:
            binds += 1
            lines.append("%s%s:%d%s" % (bind[1], host, listen_port, bind[2]))
        elif server:
            if not servers:
                lines.append(None)  # where the server lines go
            servers.append(server)
        else:
            lines.append(line)
    if binds != 1 or not servers:
        raise ValueError("the template needs one bind line and at least one server line")
    first = servers[0]
    made = ["%ssp%d %s:%d%s" % (first[1], i, host, port, first[2]) for i, port in enumerate(server_ports, 1)]
    at = lines.index(None)
    return "\n".join(lines[:at] + made + lines[at + 1:]) + "\n"


def title(proc):
    """A process's title (setproctitle pads it), or '' when it is gone."""
    try:
        return " ".join(" ".join(proc.cmdline()).split())
    except psutil.Error:
        return ""


class Cluster(Narration):
    """Starts the processes, kills an instance, checks and ends everything."""

    def __init__(self, haproxy):
        self.haproxy = haproxy
        self.dir = tempfile.mkdtemp(prefix="socketproxy-cluster-")
        self.frontend, *ports = free_ports(1 + len(INSTANCES) + len(DESTS))
        self.port = dict(zip(INSTANCES + DESTS, ports))
        self.procs = {}  # name -> Popen
        self.files = []
        self.readers = []
        self.lock = threading.Lock()
        self.seen = {d: {s: [] for s in SOURCES} for d in DESTS}  # seq numbers in arrival order
        self.bad = {d: [] for d in DESTS}  # malformed, partial or foreign lines
        self.haproxy_lines = []  # (monotonic time, line)
        self.results = []  # (title, passed, detail, required)
        self.leftover = []  # processes of the killed instance still running at cleanup
        self.cleaned = False

    # -- processes --------------------------------------------------------------------------------------
    def log_path(self, name):
        return os.path.join(self.dir, name + ".log")

    def start(self, name, argv, reader=None):
        """Start argv as name, output to its log file (or, with reader, to reader(line) in a thread too)."""
        log = open(self.log_path(name), "wb")
        self.files.append(log)
        proc = self.procs[name] = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if reader else log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if reader:
            def copy():
                for raw in iter(proc.stdout.readline, b""):
                    log.write(raw)
                    reader(raw.decode("utf-8", "replace").rstrip("\n"))
                proc.stdout.close()
            self.readers.append(threading.Thread(target=copy, daemon=True))
            self.readers[-1].start()
        return proc

    def wait_listening(self, name, port):
        """Wait until name listens on port (it exits or the deadline passes: RuntimeError)."""
        proc = self.procs[name]

        def listening():
            return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid == proc.pid
                       for c in psutil.net_connections("tcp4"))

        if not wait_for(lambda: proc.poll() is not None or listening(), START_S) or proc.poll() is not None:
            raise RuntimeError("%s (pid %d) did not listen on 127.0.0.1:%d; its log: %s" % (
                name, proc.pid, port, self.log_path(name)))

    def on_destination(self, dest):
        def take(text):
            rec = record_of(text)
            with self.lock:
                if rec and rec[0] in self.seen[dest]:
                    self.seen[dest][rec[0]].append(rec[1])
                elif (PEER_LINE.match(text) or text.startswith("malformed record")) and len(self.bad[dest]) < 100:
                    self.bad[dest].append(text)
        return take

    def on_haproxy(self, text):
        with self.lock:
            self.haproxy_lines.append((time.monotonic(), text))
        if text.startswith("Server ") or text.startswith("[ALERT]"):  # state changes ([WARNING] repeats them)
            print("haproxy | " + text, flush=True)

    def start_all(self):
        py = sys.executable
        for dest in DESTS:
            self.start(dest, [py, "-m", "fakes.destination", "--port", str(self.port[dest]), "--strict-lines"],
                       self.on_destination(dest))
        for dest in DESTS:
            self.wait_listening(dest, self.port[dest])
        self.say("started %s: fake destinations on :%d and :%d (--strict-lines: a torn line would be reported)" % (
            " and ".join("%s pid %d" % (d, self.procs[d].pid) for d in DESTS), *(self.port[d] for d in DESTS)))
        targets = ["127.0.0.1:%d" % self.port[d] for d in DESTS]
        for name in INSTANCES:
            self.start(name, [py, "socketproxy.py", "--listen-host", "127.0.0.1", "--listen-port",
                              str(self.port[name]), "--framing", "line", "--accept-proxy", "127.0.0.1/32", *targets])
        for name in INSTANCES:
            self.wait_listening(name, self.port[name])
            self.say("started %s, main pid %d: python socketproxy.py --listen-host 127.0.0.1 --listen-port %d "
                     "--framing line --accept-proxy 127.0.0.1/32 %s" % (name, self.procs[name].pid, self.port[name],
                                                                        " ".join(targets)))
        self.start("haproxy", [self.haproxy, "-db", "-f", os.path.join(self.dir, "haproxy.cfg")], self.on_haproxy)
        self.wait_listening("haproxy", self.frontend)
        self.say("started haproxy, pid %d: %s -db -f %s (listens on 127.0.0.1:%d)" % (
            self.procs["haproxy"].pid, self.haproxy, os.path.join(self.dir, "haproxy.cfg"), self.frontend))
        for source in SOURCES:
            self.start(source, [py, "-m", "fakes.source", "--port", str(self.frontend), "--interval",
                                str(INTERVAL_S), "--id", source])
        self.say("started %d fake sources, %s to %s (pids %d-%d), each connecting to HAProxy and sending a line "
                 "every %g s" % (len(SOURCES), SOURCES[0], SOURCES[-1], self.procs[SOURCES[0]].pid,
                                 self.procs[SOURCES[-1]].pid, INTERVAL_S))

    # -- what is running where --------------------------------------------------------------------------
    def receivers(self, name):
        """The receiver processes (one per source served) of instance name: children of its main."""
        try:
            kids = psutil.Process(self.procs[name].pid).children()
        except psutil.Error:
            return []
        return [kid for kid in kids if title(kid).startswith("socketproxy: receiver")]

    def counts(self, names=INSTANCES):
        return {name: len(self.receivers(name)) for name in names}

    def source_log(self, source):
        with open(self.log_path(source), errors="replace") as log:
            return log.read().splitlines()

    def placement(self):
        """{source: server} for each source's latest connection, from the source's 'connected: ... from
        ADDR:PORT' lines and HAProxy's log of which server it gave that client port."""
        with self.lock:
            server_of = {int(m[1]): m[2] for _, t in self.haproxy_lines if (m := HAPROXY_LOG.match(t))}
        found = {}
        for source in SOURCES:
            ports = [int(line.rsplit(":", 1)[1]) for line in self.source_log(source) if line.startswith("connected:")]
            if ports and ports[-1] in server_of:
                found[source] = server_of[ports[-1]]
        return found

    def show_counts(self, heading, names=INSTANCES):
        counts = self.counts(names)
        placed = self.placement()
        by_haproxy = {name: sorted(s for s, server in placed.items() if server == name) for name in names}
        self.say("%s: %s (receivers of each main, psutil); HAProxy's log: %s" % (
            heading, ", ".join("%s %d" % kv for kv in counts.items()),
            ", ".join("%s %d" % (n, len(by_haproxy[n])) for n in names)))
        return counts, by_haproxy

    def real_sources(self):
        """The sources the instances' logs name as HAProxy told them: 'src=HOST:PORT (via HAPROXY)'."""
        found = set()
        for name in INSTANCES:
            with open(self.log_path(name), "rb") as log:
                text = log.read().decode("utf-8", "replace")
            found.update(re.findall(r"src=(127\.0\.0\.1:\d+) \(via 127\.0\.0\.1:\d+\) accepted", text))
        return found

    def numbers(self, dest, source):
        with self.lock:
            return list(self.seen[dest][source])

    # -- the run ----------------------------------------------------------------------------------------
    def run(self):
        with open(TEMPLATE) as template:
            text = template.read()
        config = render_config(text, self.frontend, [self.port[n] for n in INSTANCES])
        with open(os.path.join(self.dir, "haproxy.cfg"), "w") as out:
            out.write(config)
        version = (subprocess.run([self.haproxy, "-v"], capture_output=True, text=True).stdout.split() + ["?"] * 3)[2]
        self.banner("SocketProxy cluster demo: %d sources -> HAProxy :%d -> %d SocketProxy instances -> %d "
                    "destinations" % (len(SOURCES), self.frontend, len(INSTANCES), len(DESTS)),
                    "HAProxy %s runs contrib/haproxy.cfg with free loopback ports: balance leastconn, a health" % (
                        version),
                    "check every 500 ms (fall 2, rise 2), on-marked-down shutdown-sessions. Each instance fans every",
                    "source it serves out to both destinations. The logs of every process are in %s" % self.dir,
                    "(removed at the end unless a check fails, or with --keep-logs).")
        for path in (TEMPLATE, os.path.join(self.dir, "haproxy.cfg")):
            check = subprocess.run([self.haproxy, "-c", "-f", path], capture_output=True, text=True)
            self.record("haproxy -c -f %s" % os.path.relpath(path, ROOT) if path == TEMPLATE else
                        "haproxy -c of the demo's copy", check.returncode == 0,
                        (check.stdout + check.stderr).strip().replace("\n", " / ") or "exit %d" % check.returncode)
        if not all(ok for _, ok, _, _ in self.results):
            return self.summary()

        started = time.monotonic()
        self.start_all()
        if not self.check_flow(started):
            return self.summary()
        before, placed = self.show_counts("sources per instance")
        self.record("HAProxy spread the sources over every instance",
                    sum(before.values()) == len(SOURCES) and all(before.values()) and
                    {n: len(placed[n]) for n in INSTANCES} == before,
                    "receivers %s, in HAProxy's log %s" % (
                        "/".join(str(before[n]) for n in INSTANCES), "/".join(str(len(placed[n])) for n in INSTANCES)))
        named = self.real_sources()
        self.record("the instances' logs name each source's own address (PROXY protocol v2 from HAProxy)",
                    len(named) == len(SOURCES), "%d of %d sources, e.g. %s" % (
                        len(named), len(SOURCES), sorted(named)[0] if named else "none"))
        time.sleep(WATCH_S)  # lines flow a while before the kill
        self.kill_instance(placed[VICTIM])
        return self.summary()

    def check_flow(self, started):
        def flowing():
            with self.lock:
                return all(self.seen[d][s] for d in DESTS for s in SOURCES)

        ok = wait_for(flowing, FLOW_S)
        with self.lock:
            missing = ["%s at %s" % (s, d) for d in DESTS for s in SOURCES if not self.seen[d][s]]
        self.record("all %d sources flow to both destinations" % len(SOURCES), ok,
                    "%.1f s after the first start" % (time.monotonic() - started) if ok else
                    "after %.0f s still nothing from %s" % (FLOW_S, ", ".join(missing[:10])))
        return ok

    def kill_instance(self, moved):
        """kill -9 the victim's main; watch its tree end, HAProxy mark it down, its sources move and flow again."""
        main = psutil.Process(self.procs[VICTIM].pid)
        tree = [main] + main.children(recursive=True)
        receivers = [p for p in tree if title(p).startswith("socketproxy: receiver")]
        forwarders = [p for p in tree if title(p).startswith("socketproxy: forwarder")]
        others = tuple(n for n in INSTANCES if n != VICTIM)
        stayed = [s for s in SOURCES if s not in moved]
        self.banner("kill -9 %d: %s's main (%d receivers, %d forwarders; it serves %s)" % (
            main.pid, VICTIM, len(receivers), len(forwarders), ", ".join(moved) or "no source"),
                    "Its receivers read EOF on their lifeline pipe and end their groups, which closes their",
                    "sources' connections; HAProxy's checks find the port closed and mark %s down." % VICTIM,
                    "The sources reconnect to HAProxy, which gives them to the other two instances.",
                    "What %s held for them is lost." % VICTIM)
        origin = {s: self.sent_on(s).get(max(self.sent_on(s), default=None)) for s in moved}  # their client ports
        killed_at, now = time.monotonic(), time.time()
        os.kill(main.pid, signal.SIGKILL)
        self.say("killed %s's main at %s.%03d" % (VICTIM, time.strftime("%H:%M:%S", time.localtime(now)),
                                                 now % 1 * 1000))

        def marked_down():
            with self.lock:
                return any(at >= killed_at and re.search(r"Server \S+/%s is DOWN" % VICTIM, t)
                           for at, t in self.haproxy_lines)

        def resumed():
            return all((first := self.resume_point(s)) and all(any(n >= first for n in self.numbers(d, s))
                                                               for d in DESTS) for s in moved)

        # Every condition polled in one loop, so each one's time is measured from the kill, not from the last.
        watch = {"gone": (lambda: not running(tree), TREE_S),
                 "moved": (lambda: sum(self.counts(others).values()) == len(SOURCES), MOVE_S),
                 "down": (marked_down, TREE_S),
                 "resumed": (resumed, RESUME_S)}
        when = {}
        while True:
            elapsed = time.monotonic() - killed_at
            for name, (holds, _) in watch.items():
                if name not in when and holds():
                    when[name] = elapsed
            if all(name in when or elapsed > limit for name, (_, limit) in watch.items()):
                break
            time.sleep(0.05)

        self.leftover = running(tree)
        self.record("%s's whole tree ended after kill -9 of its main" % VICTIM, "gone" in when,
                    "%d processes (main, %d receivers, %d forwarders) gone %.1f s after the kill" % (
                        len(tree), len(receivers), len(forwarders), when["gone"]) if "gone" in when else
                    "%d of %d processes still running after %.0f s: %s (killed at cleanup)" % (
                        len(self.leftover), len(tree), TREE_S, ", ".join(
                            "%d %s" % (p.pid, title(p)[:60]) for p in self.leftover)))
        after, _ = self.show_counts("sources per instance after the move", others)
        # HAProxy's log of the new connections comes through a pipe: it may lag the receivers' counts
        wait_for(lambda: all(self.placement().get(s) in others for s in moved), 5.0)
        placed = self.placement()
        # A source whose reconnection HAProxy logged on the killed instance is a stray; one whose
        # latest connection is not in HAProxy's log yet (a retry redispatched) is only said.
        strays = [s for s in moved if placed.get(s) == VICTIM]
        unlogged = [s for s in moved if s not in placed]
        self.record("%s's %d sources reconnected through HAProxy to %s" % (VICTIM, len(moved), " and ".join(others)),
                    "moved" in when and not strays,
                    "%s serve %d sources (%s) %s%s; HAProxy marked %s down %s" % (
                        " + ".join(others), sum(after.values()), " + ".join(str(after[n]) for n in others),
                        "%.1f s after the kill" % when["moved"] if "moved" in when else "after %.0f s" % MOVE_S,
                        ("; placed on %s in HAProxy's log: %s" % (VICTIM, ", ".join(strays)) if strays else "")
                        + ("; not in HAProxy's log yet: %s" % ", ".join(unlogged) if unlogged else ""), VICTIM,
                        "%.1f s after the kill" % when["down"] if "down" in when else "(no DOWN line)"))
        with self.lock:  # the connections HAProxy made since the kill: to which server, after how many retries
            routed = [m for at, t in self.haproxy_lines if at >= killed_at and (m := HAPROXY_LOG.match(t))]
        to_victim = sum(m[2] == VICTIM for m in routed)
        self.say("HAProxy made %d connections since the kill: %s (%d after %s refused one: redispatched)%s" % (
            len(routed), ", ".join("%d to %s" % (sum(m[2] == n for m in routed), n) for n in others),
            sum(m[2] != VICTIM and m[3].lstrip("+") != "0" for m in routed), VICTIM,
            "; %d to %s itself, whose port still completed handshakes while its dead main's sockets were being "
            "closed: each was reset and its source reconnected again" % (to_victim, VICTIM) if to_victim else ""))
        self.record("the moved sources flow again to both destinations", "resumed" in when,
                    "lines sent on their new connections reached both destinations from all %d %.1f s after the kill"
                    % (len(moved), when["resumed"]) if "resumed" in when else
                    "after %.0f s nothing sent on its new connection at both destinations from %s" % (
                        RESUME_S, ", ".join(s for s in moved if not (first := self.resume_point(s)) or not all(
                            any(n >= first for n in self.numbers(d, s)) for d in DESTS))))
        time.sleep(WATCH_S)
        self.check_sequences(moved, stayed, origin)

    def sent_on(self, source):
        """{number: client port of the connection it was sent on} of every line source sent."""
        found, port = {}, None
        for line in self.source_log(source):
            if line.startswith("connected:"):
                port = int(line.rsplit(":", 1)[1])
            elif line.startswith("sent: "):
                found[int(line.split()[2].lstrip("#"))] = port
        return found

    def resume_point(self, source):
        """The number of the first line source sent on its latest connection, if that followed a lost one."""
        log = self.source_log(source)
        lost = max((i for i, line in enumerate(log) if line.startswith("connection lost")), default=None)
        sent = next((line for line in log[lost:] if line.startswith("sent: ")), None) if lost is not None else None
        return sent and int(sent.split()[2].lstrip("#"))

    def check_sequences(self, moved, stayed, origin):
        """The numbers each source's lines carried at each destination: whole runs from #1 for the sources
        that stayed; for the moved ones one gap at most, before their first line on the new connection."""
        problems, reconnected = [], []
        for source in stayed:
            if any(line.startswith("connection lost") for line in self.source_log(source)):
                reconnected.append(source)
            for dest in DESTS:
                got = self.numbers(dest, source)
                if got != list(range(1, len(got) + 1)):
                    problems.append("%s at %s: %s" % (source, dest, spans(got)))
        self.record("the %d sources on %s kept their connections and lost no line" % (
            len(stayed), " and ".join(n for n in INSTANCES if n != VICTIM)),
            not problems and not reconnected and bool(stayed),
            "; ".join(problems[:5] + ["reconnected: " + ", ".join(reconnected)] * bool(reconnected)) or
            "every number from #1 on, in order, once, at both destinations (%d lines)" % sum(
                len(self.numbers(d, s)) for d in DESTS for s in stayed))

        problems, lost = [], {}
        for source in moved:
            for dest in DESTS:
                got = self.numbers(dest, source)
                first = self.resume_point(source)
                after = [n for n in got if first and n >= first]
                holes = sorted(set(range(1, max(got, default=0) + 1)) - set(got))
                if got != sorted(set(got)) or not first or (after and after != list(range(first, first + len(after)))):
                    problems.append("%s at %s: %s" % (source, dest, spans(got)))
                elif any(n >= first for n in holes) or holes != list(range(holes[0], holes[-1] + 1) if holes else []):
                    problems.append("%s at %s: a gap after the move or more than one: %s" % (source, dest, spans(got)))
                else:
                    lost[source, dest] = holes
        where = {}  # (source, number): the destinations that did not get it
        for (source, dest), holes in lost.items():
            for number in holes:
                where.setdefault((source, number), []).append(dest)
        held = [key for key in where if self.sent_on(key[0]).get(key[1]) == origin[key[0]]]
        shown = ["%s #%d%s" % (s, n, "" if len(where[s, n]) == len(DESTS) else " (at %s)" % ", ".join(where[s, n]))
                 for s, n in sorted(where)]
        self.record("the moved sources: one gap at most, around the move", not problems,
                    "; ".join(problems[:5]) if problems else
                    "%d line%s lost: %d sent on their connections to %s that the kill cut, %d sent on connections "
                    "HAProxy made to %s after the kill (reset)%s" % (
                        len(where), "" if len(where) == 1 else "s", len(held), VICTIM, len(where) - len(held), VICTIM,
                        (": " + ", ".join(shown)) if shown else ""))
        with self.lock:
            bad = {d: list(v) for d, v in self.bad.items()}
        self.record("every line at both destinations whole (--strict-lines)", not any(bad.values()),
                    "; ".join("%s: %d bad, first %r" % (d, len(v), v[0]) for d, v in bad.items() if v) or
                    "%d lines, none torn or malformed" % sum(len(self.numbers(d, s)) for d in DESTS for s in SOURCES))

    def summary(self):
        passed = sum(ok for _, ok, _, _ in self.results)
        self.banner("SUMMARY: %d of %d checks passed" % (passed, len(self.results)))
        for heading, ok, _, _ in self.results:
            print("  %-4s  %s" % ("PASS" if ok else "FAIL", heading), flush=True)
        return 0 if passed == len(self.results) else 1

    # -- the end ----------------------------------------------------------------------------------------
    def cleanup(self, keep_logs):
        """End everything: sources, HAProxy, the instances, the destinations (SIGTERM, by pid), then SIGKILL
        whatever is left of our descendants (orphans we adopted as subreaper included) and of the killed tree."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.cleaned:
            return True
        self.cleaned = True
        started = psutil.Process().children(recursive=True)
        for names in (SOURCES, ("haproxy",), INSTANCES, DESTS):
            procs = [self.procs[n] for n in names if n in self.procs and self.procs[n].poll() is None]
            for proc in procs:
                proc.terminate()
            wait_for(lambda: all(p.poll() is not None for p in procs), 5)

        def all_ended():
            left = running(psutil.Process().children(recursive=True) + self.leftover)
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            return not left

        ok = wait_for(all_ended, 5)
        for reader in self.readers:
            reader.join(2)
        for log in self.files:
            log.close()
        self.say("%s every process it started (%d)%s" % (
            "ended" if ok else "COULD NOT END", len(started),
            "; killed what was left of %s's tree: %s" % (VICTIM, " ".join(str(p.pid) for p in self.leftover))
            if self.leftover else ""))
        if keep_logs:
            self.say("logs kept in %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return ok


def main():
    if sys.argv[1:] not in ([], ["--keep-logs"]):
        sys.stderr.write(__doc__)
        sys.exit(2)
    haproxy = find_haproxy()
    if not haproxy:
        print("cluster-demo: haproxy is not installed (apt-get install haproxy): the demo is skipped", flush=True)
        sys.exit(0)
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster, code = Cluster(haproxy), 1
    try:
        code = cluster.run()
    except Stop as stop:
        cluster.say("interrupted by %s: ending everything" % stop)
        code = 130 if str(stop) == "SIGINT" else 143
    except RuntimeError as exc:
        cluster.say("cannot run the demo: %s" % exc)
    finally:
        if not cluster.cleanup(keep_logs=code == 1 or "--keep-logs" in sys.argv) and code == 0:
            code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
