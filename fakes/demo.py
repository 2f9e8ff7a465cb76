"""The demo: a real proxy between two fake sources and two fake destinations, all output in one terminal.

  python -m fakes.demo          start everything, take a narrated tour (kill and restart pieces), then print
                                a summary of the checks; exit 0 only if every check held
  python -m fakes.demo --live   start everything and leave it running until Ctrl-C, to break it by hand
"""
import ctypes
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

from .lines import parse_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 10 * float(os.environ.get("SOCKETPROXY_TEST_TIMEOUT_SCALE", "1"))  # for every check and wait
WATCH_S = 2.5  # after each step, time to watch the lines flow
SOURCES, DESTS = ("src-a", "src-b"), ("dst-1", "dst-2")
COLOURS = {"demo": "1", "proxy": "33", "dst-1": "36", "dst-2": "34", "src-a": "32", "src-b": "35", "": "1;7"}
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
PEER_LINE = re.compile(r"^\d+\.\d+\.\d+\.\d+:\d+: (.*)$")  # a destination's "<peer>: <line>"


class Stop(Exception):
    """Ctrl-C or SIGTERM: leave the demo (cleanup runs in a finally)."""


def on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def die_with_parent():
    """Runs in each child before exec: SIGTERM it if the demo dies, even by kill -9."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_for(predicate, timeout=DEADLINE_S, interval=0.05):
    """Poll predicate until it returns something truthy (returned) or timeout seconds pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


class Narration:
    """What the cluster and mirror demos print: their own lines, a banner per part, and a PASS or
    FAIL line per check, kept in self.results as (heading, passed, detail, required)."""

    def say(self, text):
        print("demo    | " + text, flush=True)

    def banner(self, heading, *explain):
        print("\n=== %s %s" % (heading, "=" * max(3, 100 - len(heading))), flush=True)
        for line in explain:
            print("    " + line, flush=True)

    def record(self, heading, ok, detail, required=True):
        self.results.append((heading, bool(ok), detail, required))
        verdict = ("PASS" if ok else "FAIL") + ("" if required else " (target, informational)")
        self.say("%s  %s: %s" % (verdict, heading, detail))


def seq(line):
    """The sequence number of a fake source's line ('src-a #17 kqzjwpe 5a1c0e2f' -> 17); None for None."""
    return line and parse_line(line)[1]


def record_of(text):
    """(source, seq, line) when a destination's output line text carries a whole record of a fake source, else None."""
    match = PEER_LINE.match(text)
    found = match and parse_line(match[1])
    return found and (*found, match[1])


def numbers(lines, name, source):
    """The sequence numbers of source's records in lines printed by name, in order (sent ones for a source)."""
    if name == source:
        return [seq(t[6:]) for n, t in lines if n == name and t.startswith("sent: ")]
    return [rec[1] for n, t in lines if n == name and (rec := record_of(t)) and rec[0] == source]


def spans(values):
    """'#3-#7, #9' for [3, 4, 5, 6, 7, 9]."""
    runs = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join("#%d" % a if a == b else "#%d-#%d" % (a, b) for a, b in runs) or "none"


def running(procs):
    """The psutil processes of procs still running; first reaps every exited child (we are a subreaper)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    left = []
    for proc in procs:
        try:
            left += [proc] if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE else []
        except psutil.Error:
            pass
    return left


def free_ports(count):
    """Distinct free loopback ports below the ephemeral range, so no outgoing connection takes one."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = []
    while len(ports) < count:
        port = random.randint(10000, min(low, 32000) - 1)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports += [port] if port not in ports else []
    return ports


class Output:
    """Every line of every process: printed with a prefix (and a colour on a terminal), kept for the checks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines = []  # (name, text)
        self.colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def put(self, name, text, keep=True, colour=None):
        with self.lock:
            if keep:
                self.lines.append((name, text))
            line = "%-5s | %s" % (name, text) if name else text
            if self.colour and line:
                line = "\033[%sm%s\033[0m" % (colour or COLOURS[name], line)
            try:
                print(line, flush=True)
            except OSError:
                pass

    def since(self, mark, name=None):
        with self.lock:
            return [(n, t) for n, t in self.lines[mark:] if name in (None, n)]


class Demo:
    """Starts, breaks, checks and ends the processes."""

    def __init__(self):
        self.out = Output()
        self.procs = {}  # name -> latest Popen of that name
        self.readers = []  # one thread per process started, copying its stdout and stderr to self.out
        self.results = []  # (check, passed, seconds)
        self.cleaned = False
        self.listen_port, *ports = free_ports(3)
        self.dest_port = dict(zip(DESTS, ports))

    def say(self, text):
        self.out.put("demo", text, keep=False)

    def banner(self, title, *explain):
        bar = "=== %s %s" % (title, "=" * (95 - len(title)))
        for line in ["", bar, *("    " + e for e in explain)]:
            self.out.put("", line, False, None if line == bar else "1")

    def mark(self):
        return len(self.out.since(0))

    def pid(self, name):
        return self.procs[name].pid

    def start(self, name):
        """Start one process by name; a listener is started only once it listens."""
        if name == "proxy":
            argv = ["socketproxy.py", "--listen-host", "127.0.0.1", "--listen-port", str(self.listen_port),
                    "--retry-interval", "1", "--framing", "line",
                    *("127.0.0.1:%d" % self.dest_port[d] for d in DESTS)]
        elif name in DESTS:  # dst-2 closes a connection at a torn or malformed line, and says so
            argv = ["-m", "fakes.destination", "--port", str(self.dest_port[name])]
            argv += ["--strict-lines"] if name == "dst-2" else []
        else:
            argv = ["-m", "fakes.source", "--port", str(self.listen_port), "--interval", "0.3", "--id", name]
        mark = self.mark()
        proc = self.procs[name] = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.readers.append(threading.Thread(target=self.copy, args=(name, proc), daemon=True))
        self.readers[-1].start()
        self.say("started %s, pid %d: python %s" % (name, proc.pid, " ".join(argv)))
        if name in SOURCES:
            return
        wait_for(lambda: proc.poll() is not None or any("listening on" in t for _, t in self.out.since(mark, name)))
        if proc.poll() is not None:
            raise RuntimeError("%s exited (code %s) instead of listening" % (name, proc.returncode))

    def copy(self, name, proc):
        for raw in iter(proc.stdout.readline, b""):  # the proxy's log: drop the date, keep the time
            self.out.put(name, re.sub(r"^\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d\.\d{3})\S*", r"\1", raw.decode("utf-8", "replace").rstrip()))
        proc.stdout.close()

    def stop(self, name):
        """SIGTERM one process and wait for it (at most 5 s)."""
        if self.procs[name].poll() is None:
            self.procs[name].terminate()
            try:
                self.procs[name].wait(5)
            except subprocess.TimeoutExpired:
                pass

    def tree(self):
        """[(process, ppid, pgid, drawn title, source, destination)] of the proxy's live processes, in tree order."""
        addr = {t.split()[-1]: n for n, t in self.out.since(0) if n in SOURCES and t.startswith("connected:")}
        dest = {"127.0.0.1:%d" % port: name for name, port in self.dest_port.items()}
        rows = []

        def walk(proc, prefix, branch):
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return
                words = " ".join(proc.cmdline()).split()  # setproctitle pads the title
                role = words[1] if len(words) > 2 else None
                src = addr.get(words[2]) if role in ("receiver", "forwarder") else None
                dst = dest.get(words[4]) if role == "forwarder" and len(words) > 4 else None  # SRC -> DST | ...
                rows.append((proc, proc.ppid(), os.getpgid(proc.pid), prefix + branch + " ".join(words), src, dst))
                kids = sorted(proc.children(), key=lambda p: p.pid)
            except (psutil.Error, OSError):
                return
            prefix += "   " if branch in ("", "└─ ") else "│  "
            for i, kid in enumerate(kids):
                walk(kid, prefix, "└─ " if i == len(kids) - 1 else "├─ ")

        try:
            walk(psutil.Process(self.pid("proxy")), "", "")
        except psutil.Error:
            pass
        return rows

    def groups(self):
        """{source: [receiver, forwarder to dst-1, forwarder to dst-2]} (psutil processes) of complete groups."""
        rows = self.tree()
        found = {src: [proc] for proc, _, _, title, src, _ in rows if src and " receiver " in title}
        for proc, ppid, _, _, src, dst in sorted(rows, key=lambda row: row[5] or ""):
            if dst and src in found and found[src][0].pid == ppid:
                found[src].append(proc)
        return {src: procs for src, procs in found.items() if len(procs) == 1 + len(DESTS)}

    def group(self, source):
        """The processes serving source, receiver first, then its forwarders to dst-1 and dst-2."""
        if not wait_for(lambda: source in self.groups()):
            raise RuntimeError("no complete group of processes serves %s" % source)
        return self.groups()[source]

    def ready(self, not_receiver=None):
        groups = self.groups()
        return all(s in groups and groups[s][0].pid != not_receiver for s in SOURCES)

    def print_tree(self, heading):
        self.say(heading)
        self.say("%7s %7s %7s  %s" % ("PID", "PPID", "PGID", "TITLE"))
        for proc, ppid, pgid, title, src, dst in self.tree():
            note = "   [%s -> %s]" % (src, dst) if dst else "   [serves %s]" % src if src else ""
            self.say("%7d %7d %7d  %s%s" % (proc.pid, ppid, pgid, title, note))
        self.say("fakes: " + ", ".join("%s pid %d" % (n, self.pid(n)) for n in SOURCES + DESTS)
                 + "; dst-1 listens on :%d, dst-2 on :%d" % tuple(self.dest_port.values()))

    def record(self, title, ok, started, detail):
        self.results.append((title, bool(ok), time.monotonic() - started))
        self.say("%s  %s (%.1f s)%s" % ("PASS" if ok else "FAIL", title, time.monotonic() - started, detail))

    def check_flow(self, title, mark, dests=DESTS):
        """Poll until a line each source sent after mark has reached each of dests; record PASS or FAIL."""
        started = time.monotonic()

        def arrived():
            lines = self.out.since(mark)
            sent = {s: {t[6:] for n, t in lines if n == s and t.startswith("sent: ")} for s in SOURCES}
            got = {d: {rec[2] for n, t in lines if n == d and (rec := record_of(t))} for d in dests}
            return {(s, d): min(sent[s] & got[d], default=None, key=seq) for s in SOURCES for d in dests}

        ok = wait_for(lambda: all(arrived().values()))
        found = arrived()
        self.record(title, ok, started, ": first fresh lines " + "; ".join(
            "%s #%s" % (s, ", #".join("%s at %s" % (seq(found[s, d]), d) for d in dests)) for s in SOURCES))

    def check_no_gap(self, title, restarted):
        """Each source's numbers at dst-2 across its restart (at mark restarted): the lines it missed while down
        arrive first, then live ones, every number once, in order."""
        started = time.monotonic()
        lines = self.out.since(0)
        before, after = lines[:restarted], lines[restarted:]
        problems, shown = [], []
        for source in SOURCES:
            old, new = numbers(before, "dst-2", source), numbers(after, "dst-2", source)
            if not old or not new:
                problems.append("%s: no line at dst-2 %s its restart" % (source, "after" if old else "before"))
                continue
            missed = [n for n in numbers(before, source, source) if n > old[-1]]
            expected = list(range(old[-1] + 1, old[-1] + 1 + len(new)))
            bad = next((i for i, (got, want) in enumerate(zip(new, expected)) if got != want), None)
            if bad is not None:
                problems.append("%s: after #%d dst-2 got #%d (%s)" % (
                    source, new[bad - 1] if bad else old[-1], new[bad],
                    "a gap" if new[bad] > expected[bad] else "a repeat or reorder"))
            elif not missed:
                problems.append("%s: sent nothing while dst-2 was down" % source)
            elif len(new) <= len(missed):
                problems.append("%s: no live line at dst-2 after the kept ones" % source)
            arrived = ("%s first, then %s live" % (spans(new[:len(missed)]), spans(new[len(missed):]))
                       if bad is None else spans(new))
            self.say("%s at dst-2: %s before it stopped; %s sent while it was down; after the restart %s" % (
                source, spans(old), spans(missed), arrived))
            shown.append("%s %s kept, then live" % (source, spans(missed)))
        self.record(title, not problems, started, ": " + "; ".join(problems or shown))

    def check_records(self, title):
        """Every line either destination printed was a whole record; dst-2 (--strict-lines) reported none malformed."""
        started = time.monotonic()
        lines = [(n, t) for n, t in self.out.since(0) if n in DESTS]
        malformed = [t for n, t in lines if t.startswith("malformed record from ")]
        partial = [t for n, t in lines if PEER_LINE.match(t) and t.endswith(" [partial]")]
        broken = [t for n, t in lines if PEER_LINE.match(t) and not t.endswith(" [partial]") and not record_of(t)]
        whole = {d: sum(1 for n, t in lines if n == d and record_of(t)) for d in DESTS}
        problems = ["%d %s, first: %s" % (len(found), kind, found[0]) for kind, found in (
            ("malformed records reported by dst-2", malformed), ("partial lines", partial),
            ("lines that are not whole records", broken)) if found]
        self.record(title, not problems, started, ": " + ("; ".join(problems) or "%s, none torn or malformed" % (
            ", ".join("%d lines at %s" % (whole[d], d) for d in DESTS))))

    def check_ended(self, title, group):
        started = time.monotonic()
        pids = " ".join(str(p.pid) for p in group)
        self.record(title, bool(wait_for(lambda: not running(group), DEADLINE_S / 2)), started, ": pids " + pids)

    def run(self, live):
        port = self.listen_port
        self.banner("SocketProxy demo: two fake sources -> the proxy on :%d -> two fake destinations" % port,
                    "For each source that connects the proxy forks a receiver, and the receiver a forwarder per",
                    "destination, so every line src-a and src-b send shows up at both dst-1 and dst-2. A line is",
                    "'<source> #<number> <letters> <crc32>'; the proxy runs with --framing line, so each destination",
                    "connection starts at a line boundary, and dst-2 runs with --strict-lines: it would report a torn",
                    "line and close the connection.",
                    "Each line below is prefixed with the process that printed it; the proxy's lines are its log.")
        for name in DESTS + ("proxy",) + SOURCES:
            self.start(name)
        if not wait_for(self.ready):
            raise RuntimeError("the proxy did not start a group for each source")
        self.print_tree("the proxy's processes: main, one receiver per source, one forwarder per destination:")
        self.check_flow("start: lines from both sources reach both destinations", 0)
        if live:
            return self.live()
        time.sleep(WATCH_S)
        self.tour()
        self.cleanup()
        self.check_records("end: every line at both destinations whole, none torn or malformed (dst-2 strict)")
        return self.summary()

    def tour(self):
        group = self.group("src-a")
        receiver, victim = group[0].pid, group[1].pid
        self.banner("STEP 1/3: kill -9 %d, the forwarder src-a -> dst-1" % victim,
                    "Fate sharing: receiver %d sees its forwarder die and kills its whole group (pgid %d),"
                    % (receiver, receiver),
                    "which closes src-a's connection. Watch src-a say 'connection lost' and reconnect, and main fork",
                    "a new receiver with two new forwarders: new PIDs in the tree. src-b is not touched.")
        mark = self.mark()
        os.kill(victim, signal.SIGKILL)
        self.check_ended("step 1: the killed forwarder's whole group ended", group)
        wait_for(lambda: self.ready(not_receiver=receiver))
        self.print_tree("the tree after step 1: src-a is served by new PIDs:")
        self.check_flow("step 1: after kill -9 of a forwarder, both sources reach both destinations", mark)
        time.sleep(WATCH_S)

        self.banner("STEP 2/3: stop dst-2 (pid %d), then start it again on the same port" % self.pid("dst-2"),
                    "Its two forwarders log 'disconnected' and retry; meanwhile they keep its lines (--buffer, 4 MiB",
                    "by default), the sources stay connected and dst-1 keeps getting every line. Once dst-2 is back",
                    "the forwarders reconnect within --retry-interval (1 s) and resend the kept lines first, then live",
                    "ones: dst-2's numbers from each source go on without a gap.")
        mark = self.mark()
        self.stop("dst-2")
        wait_for(lambda: sum("disconnected from" in t for _, t in self.out.since(mark, "proxy")) >= 2, DEADLINE_S / 2)
        self.check_flow("step 2: while dst-2 is down, dst-1 still gets both sources", self.mark(), ("dst-1",))
        time.sleep(WATCH_S)
        mark = self.mark()
        self.start("dst-2")
        self.check_flow("step 2: dst-2 restarted, both sources reach both destinations", mark)
        time.sleep(WATCH_S)
        self.check_no_gap("step 2: dst-2 got the lines sent while it was down, first, then live ones: no gap", mark)

        group = self.group("src-b")
        self.banner("STEP 3/3: stop src-b (pid %d), then start it again" % self.pid("src-b"),
                    "Receiver %d sees its source close, delivers what it read, closes both destination "
                    "connections" % group[0].pid,
                    "and its group exits ('group ended: source closed' in the proxy's log). The new src-b gets a",
                    "new group; its numbering starts again at #1.")
        self.stop("src-b")
        self.check_ended("step 3: src-b's group ended when src-b closed", group)
        mark = self.mark()
        self.start("src-b")
        self.check_flow("step 3: src-b restarted, both sources reach both destinations", mark)
        time.sleep(WATCH_S)

    def live(self):
        receiver, forwarder = (p.pid for p in self.group("src-a")[:2])
        commands = [("ps -eo pid,ppid,pgid,args | grep 'socketproxy:'", "main, receivers, forwarders"),
                    ("kill -9 %d" % forwarder, "the forwarder src-a -> dst-1: its group goes, src-a reconnects"),
                    ("kill -- -%d" % receiver, "src-a's whole group at once (same effect)"),
                    ("kill %d" % self.pid("dst-2"), "dst-2: its forwarders retry, dst-1 keeps getting lines"),
                    ("kill %d" % self.pid("src-b"), "src-b: its group ends; the new src-b gets a new one")]
        self.banner("LIVE: everything keeps running until Ctrl-C. Try these in another terminal:",
                    *("%-16s # %s" % pair for pair in commands),
                    "The demo starts a fake you stop again after 3 s, and prints the tree whenever it changes.")
        shown, due = {row[0].pid for row in self.tree()}, {}
        try:
            while self.procs["proxy"].poll() is None:
                time.sleep(0.2)
                for name in [n for n in SOURCES + DESTS if self.procs[n].poll() is not None]:
                    if name not in due:
                        due[name] = time.monotonic() + 3
                        self.say("%s exited (code %s); starting it again in 3 s" % (name, self.procs[name].returncode))
                    elif time.monotonic() > due[name]:
                        del due[name]
                        self.start(name)
                pids = {row[0].pid for row in self.tree()}
                if pids != shown and self.ready():
                    shown = pids
                    self.print_tree("the tree changed:")
            self.say("the proxy exited (code %s); ending" % self.procs["proxy"].returncode)
            return 1
        except Stop:
            self.say("Ctrl-C: ending everything")
            return 0 if all(ok for _, ok, _ in self.results) else 1

    def summary(self):
        passed = sum(ok for _, ok, _ in self.results)
        self.banner("SUMMARY: %d of %d checks passed" % (passed, len(self.results)))
        for title, ok, seconds in self.results:
            row = "  %-4s %5.1f s  %s" % ("PASS" if ok else "FAIL", seconds, title)
            self.out.put("", row, False, "32" if ok else "1;31")
        return 0 if passed == len(self.results) else 1

    def cleanup(self):
        """End every process started: sources, then the proxy (its whole tree), then destinations; reap all."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.cleaned:
            return
        self.cleaned = True
        started = psutil.Process().children(recursive=True)
        for name in [n for n in SOURCES + ("proxy",) + DESTS if n in self.procs]:  # the proxy sees sources close
            self.stop(name)

        def all_ended():  # SIGKILL whatever is left: late forks and orphans adopted by us included
            left = running(psutil.Process().children(recursive=True))
            for proc in left:
                proc.kill()
            return not left

        ok = wait_for(all_ended, 5)
        for reader in self.readers:
            reader.join(2)
        self.say("%s every process it started (pids %s)" % ("ended" if ok else "COULD NOT END",
                                                            " ".join(str(p.pid) for p in started)))


def main():
    if sys.argv[1:] not in ([], ["--live"]):
        sys.stderr.write(__doc__)
        sys.exit(2)
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    demo, code = Demo(), 1
    try:
        code = demo.run(sys.argv[1:] == ["--live"])
    except Stop as stop:
        demo.say("interrupted by %s: ending everything" % stop)
        code = 130 if str(stop) == "SIGINT" else 143
    except RuntimeError as exc:
        demo.say("cannot run the demo: %s" % exc)
    finally:
        demo.cleanup()
    sys.exit(code)


if __name__ == "__main__":
    main()
