#!/usr/bin/env python3
"""Memory bound of the per-destination backlog: every destination down while every source streams.

    .venv/bin/python bench/memory.py [--sources 100] [--seconds 30] [--buffer 4M] [--quick]

The contract (README, Records and backlog): with S sources and D destinations, all destinations down
while the sources stream, the proxy's tree stays within S x D x (SIZE + pipe) above the idle tree,
SIZE being --buffer and pipe the size of the proxy's pipes.

  1. Two destinations that are down: two free ports on 127.0.0.1 with nothing listening (connection
     refused), so every forwarder stays in its reconnect loop and keeps its backlog.
  2. The proxy: socketproxy.py --listen-host 127.0.0.1 --framing line --buffer SIZE, its log (info)
     in a temporary file.
  3. The idle tree: S sources connected, nothing sent, all 1 + S x (1 + D) processes there; memory
     summed over the tree (USS: pages only that process maps; PSS also shown). Median of 3 samples.
  4. The sources (a child process, one non-blocking socket each) send 100-byte lines at a paced rate,
     by default 2.5 x (SIZE + pipe) per source over the window, for --seconds; the tree's summed USS
     is sampled every second and the peak kept. The sources note any time they fall behind their
     schedule (a source the proxy holds back would).
  5. PASS when peak USS <= idle USS + S x D x (SIZE + pipe); exit 1 on FAIL.
  6. The sources close (so every forwarder logs what it sent and dropped), main gets SIGTERM and the
     bench waits until the whole tree is gone.

USS counts user-space pages only. Pipe buffers (and socket buffers) are kernel memory and never in
any process's USS: the bound allows one pipe per forwarder, the measurement cannot see it. The report
shows the machine's used memory (MemTotal - MemAvailable) for what it is worth (it includes
everything else running). The sampler sees the tree once a second; each forwarder's VmHWM (peak
resident set, kernel-tracked) over its idle RSS is also shown, which catches peaks between samples.

--pipe is the size the proxy logs at start (`pipes of N KiB`, only under a pipe budget); as root it
logs nothing and uses 1 MiB: the bench reads the size back from a forwarder's pipe (F_GETPIPE_SZ on
/proc/PID/fd) and uses the largest of what it logged and what it measured.
Roles (internal): --role source.
"""
import argparse
import fcntl
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from common import become_subreaper, free_port, reap_exited

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20
KIB = 1 << 10
DESTS = 2
F_GETPIPE_SZ = 1032
SIZE_SUFFIXES = {"": 1, "K": KIB, "M": MIB, "G": 1 << 30}


def log(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def parse_size(text):
    number, suffix = text[:-1], text[-1:].upper()
    if suffix.isdigit():
        number, suffix = text, ""
    if suffix not in SIZE_SUFFIXES or not number.isdigit():
        raise argparse.ArgumentTypeError("expected a size such as 4M, 512K or 0")
    return int(number) * SIZE_SUFFIXES[suffix]


def mib(n):
    return n / MIB


# -- role: source (S paced streams of lines, in a process of its own) ------------------------------

def run_source(args):
    """Connect S sockets, print "connected", wait for "go RATE", stream for --seconds at RATE bytes/s
    each (whole lines of --line-size bytes), print "result {json}", wait for "close", close."""
    line = (b"x" * (args.line_size - 1)) + b"\n"
    lines_per_block = max(1, MIB // args.line_size)
    block = line * lines_per_block
    data = memoryview(block * 2)  # any slice of <= len(block) at an offset < len(block) is contiguous
    period = len(block)
    socks = []
    for _ in range(args.count):
        sock = socket.create_connection(("127.0.0.1", args.port), timeout=30)
        sock.setblocking(False)
        socks.append(sock)
    print("connected", flush=True)
    words = sys.stdin.readline().split()  # "go RATE": decided once the pipe size is known
    if len(words) != 2 or words[0] != "go":
        return 1
    rate = int(words[1])
    sent = [0] * len(socks)
    would_block = 0
    worst_lag = 0  # bytes behind schedule, the most any source ever was (after its send)
    tick = 0.02
    max_send = 256 * KIB
    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int(rate * (now - start))
        for i, sock in enumerate(socks):
            want = due - sent[i]
            while want > 0:
                off = sent[i] % period
                n = min(want, max_send, period)
                try:
                    got = sock.send(data[off:off + n])
                except BlockingIOError:
                    would_block += 1
                    break
                sent[i] += got
                want -= got
                if got < n:
                    would_block += 1
                    break
            worst_lag = max(worst_lag, due - sent[i])
        time.sleep(max(0.0, tick - (time.monotonic() - now)))
    elapsed = time.monotonic() - start
    scheduled = int(rate * args.seconds)
    print("result " + json.dumps({"sent": sent, "scheduled_each": scheduled, "elapsed_s": elapsed,
                                  "would_block": would_block, "worst_lag_bytes": worst_lag,
                                  "cpu_s": time.process_time()}), flush=True)
    sys.stdin.readline()  # "close"
    for sock in socks:
        sock.close()
    return 0


# -- the proxy's tree ------------------------------------------------------------------------------

def role(proc):
    try:
        cmd = proc.cmdline()
        if cmd and cmd[0].startswith("socketproxy: "):
            return cmd[0].split()[1]
        return proc.name()
    except psutil.Error:
        return "?"


def tree(pid):
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


class Sample:
    """One pass over the tree: summed USS/PSS, per role, per pid (uss, rss)."""

    def __init__(self, pid, roles_by_pid):
        self.t = time.monotonic()
        self.uss = self.pss = self.count = 0
        self.by_role = {}
        self.per_pid = {}
        for proc in tree(pid):
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            name = roles_by_pid.get(proc.pid) or roles_by_pid.setdefault(proc.pid, role(proc))
            self.count += 1
            self.uss += info.uss
            self.pss += getattr(info, "pss", 0)
            entry = self.by_role.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += info.uss
            self.per_pid[proc.pid] = (info.uss, info.rss)
        self.took = time.monotonic() - self.t


def meminfo_used():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * KIB
    return fields["MemTotal"] - fields["MemAvailable"]


def tcp_mem():
    """Bytes of TCP socket buffers on the machine (/proc/net/sockstat `mem`, in pages)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    return None


def vm_hwm(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    return None


def smaps_private(pid, large=MIB):
    """Private (dirty + clean) bytes of a process by kind of mapping: "large" anonymous blocks of
    `large` bytes or more (malloc maps a backlog's bytearray on its own), "heap" ([heap], which
    pages inherited from main join once written: copy-on-write), "other"."""
    kinds = {"large": 0, "heap": 0, "other": 0}
    kind = "other"
    try:
        with open("/proc/%d/smaps" % pid) as f:
            for line in f:
                head = line.split(None, 6)
                if "-" in head[0] and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    name = head[5].strip() if len(head) > 5 else ""
                    kind = "heap" if name == "[heap]" else "large" if not name and hi - lo >= large else "other"
                elif head[0] in ("Private_Dirty:", "Private_Clean:"):
                    kinds[kind] += int(head[1]) * KIB
    except OSError:
        return None
    return kinds


def measured_pipe_size(pids):
    """The largest pipe of a few forwarders: F_GETPIPE_SZ on a read-only, non-blocking open of each
    pipe through /proc/PID/fd (opened and closed at once; nothing is read)."""
    best = 0
    for pid in pids[:3]:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            path = "/proc/%d/fd/%s" % (pid, fd)
            try:
                if not os.readlink(path).startswith("pipe:"):
                    continue
                probe = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                best = max(best, fcntl.fcntl(probe, F_GETPIPE_SZ))
            except OSError:
                pass
            finally:
                os.close(probe)
    return best


def wait_listening(popen, port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError("the proxy exited with status %s at start" % popen.returncode)
        try:
            conns = psutil.Process(popen.pid).net_connections("tcp")
        except psutil.NoSuchProcess:
            conns = []
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return
        time.sleep(0.02)
    raise RuntimeError("the proxy is not listening on %d after %.0f s" % (port, timeout))


def wait_tree(pid, want, timeout):
    """Wait until the tree of pid has `want` processes; the count it had last."""
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        reap_exited()
        try:
            count = len(tree(pid))
        except psutil.NoSuchProcess:
            return 0
        if count == want:
            return count
        time.sleep(0.1)
    return count


def stop_proxy(popen, timeout=15.0):
    """SIGTERM to main, then wait until no process of its tree is left (SIGKILL by pid as a last
    resort, to the processes of this tree only). True when it ended by itself."""
    try:
        procs = tree(popen.pid)
    except psutil.NoSuchProcess:
        procs = []
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    clean = True
    while True:
        reap_exited()  # we are a subreaper: orphans of the tree are ours to collect
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if popen.poll() is not None and not alive:
            break
        if time.monotonic() >= deadline:
            clean = False
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
            break
        time.sleep(0.05)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        clean = False
    reap_exited()
    return clean


def parse_log(text):
    received = [int(n) for n in re.findall(r"group ended: [^\n]*?received (\d+) bytes from source", text)]
    done = re.findall(r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes(?: \((\d+) records\))?", text)
    planned = re.search(r"pipes of (\d+) KiB", text)
    return {
        "groups_ended": len(received),
        "received": sum(received),
        "forwarders_done": len(done),
        "sent": sum(int(s) for s, _, _ in done),
        "dropped": sum(int(d) for _, d, _ in done),
        "dropped_records": sum(int(r or 0) for _, _, r in done),
        "pipe_logged": int(planned.group(1)) * KIB if planned else None,
        "errors": [l for l in text.splitlines() if " ERROR " in l or "Traceback" in l][:5],
        "refusal": re.search(r"the kernel refused a pipe[^\n]*", text),
    }


# -- the run ---------------------------------------------------------------------------------------

def run(args):
    become_subreaper()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    taken = set()
    listen_port = free_port(taken)
    down = [free_port(taken) for _ in range(DESTS)]  # nothing listens there: connection refused
    expected_procs = 1 + args.sources * (1 + DESTS)
    tmpdir = tempfile.mkdtemp(prefix="socketproxy-memory-")
    log_path = os.path.join(tmpdir, "proxy.log")
    logfile = open(log_path, "w")
    cmd = [sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-host", "127.0.0.1",
           "--listen-port", str(listen_port), "--buffer", str(args.buffer), "--framing", "line",
           "--max-connections", str(max(256, args.sources + 16)), "--log-level", "info"]
    cmd += ["127.0.0.1:%d" % p for p in down]
    log("memory: proxy on 127.0.0.1:%d, destinations 127.0.0.1:%d and :%d down (nothing listens), log %s"
        % (listen_port, down[0], down[1], log_path))
    proxy = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    source = None
    result = None
    try:
        wait_listening(proxy, listen_port)
        source = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--role", "source", "--port", str(listen_port),
             "--count", str(args.sources), "--seconds", str(args.seconds), "--line-size", str(args.line_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if source.stdout.readline().strip() != "connected":
            raise RuntimeError("the sources did not connect")
        count = wait_tree(proxy.pid, expected_procs, 60)
        if count != expected_procs:
            raise RuntimeError("the tree has %d processes, not 1 + %d x (1 + %d) = %d"
                               % (count, args.sources, DESTS, expected_procs))
        time.sleep(1.5)  # first connect attempts refused, forwarders in their backoff
        roles = {}
        idle_samples = []
        for _ in range(3):
            idle_samples.append(Sample(proxy.pid, roles))
            time.sleep(0.5)
        idle = sorted(idle_samples, key=lambda s: s.uss)[1]
        idle_per_pid = {}
        for s in idle_samples:  # per process: its median over the three samples
            for pid in s.per_pid:
                idle_per_pid.setdefault(pid, []).append(s.per_pid[pid])
        idle_per_pid = {pid: (statistics.median(u for u, _ in v), statistics.median(r for _, r in v))
                        for pid, v in idle_per_pid.items()}
        forwarders = sorted(pid for pid, name in roles.items() if name == "forwarder")
        probes = forwarders[:3]
        smaps_idle = {pid: smaps_private(pid) for pid in probes}
        logfile.flush()
        with open(log_path) as f:
            logged_pipe = parse_log(f.read())["pipe_logged"]
        measured_pipe = measured_pipe_size(forwarders)
        pipe = max(logged_pipe or 0, measured_pipe or 0) or 1 * MIB
        if args.rate == 0:
            args.rate = int(2.5 * (args.buffer + pipe) / args.seconds)
        bound = idle.uss + args.sources * DESTS * (args.buffer + pipe)
        used_idle, tcp_idle = meminfo_used(), tcp_mem()
        used_max = used_idle
        log("memory: idle tree %d processes, USS %.1f MiB; pipes %d KiB; streaming %d sources x %.2f MiB/s "
            "for %.0f s" % (idle.count, mib(idle.uss), pipe // KIB, args.sources, mib(args.rate), args.seconds))

        source.stdin.write("go %d\n" % args.rate)
        source.stdin.flush()
        samples = []
        peak_uss_pid = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
            s = Sample(proxy.pid, roles)
            samples.append(s)
            used_max = max(used_max, meminfo_used())
            for pid, (uss, _) in s.per_pid.items():
                peak_uss_pid[pid] = max(peak_uss_pid.get(pid, 0), uss)
            if args.verbose:
                log("  t=%4.1f s  tree USS %.1f MiB  (%d processes, sample took %.2f s)"
                    % (s.t - t0, mib(s.uss), s.count, s.took))
        hwm = {pid: vm_hwm(pid) for pid in forwarders}
        smaps_end = {pid: smaps_private(pid) for pid in probes}
        tcp_end = tcp_mem()
        line = source.stdout.readline()
        if not line.startswith("result "):
            raise RuntimeError("the sources reported nothing")
        sent = json.loads(line[len("result "):])
        peak = max(samples, key=lambda s: s.uss)
        last = samples[-1]

        # The sources close: every forwarder drops its backlog, counts it and logs it; groups end.
        source.stdin.write("close\n")
        source.stdin.flush()
        source.wait(timeout=30)
        ended = wait_tree(proxy.pid, 1, 30)
        clean = stop_proxy(proxy)
        time.sleep(0.5)
        used_after = meminfo_used()
        logfile.close()
        with open(log_path) as f:
            summary = parse_log(f.read())
        result = report(args, idle, peak, last, samples, bound, pipe, logged_pipe, measured_pipe, roles,
                        idle_per_pid, peak_uss_pid, hwm, sent, summary, ended, clean,
                        (used_max - used_idle, used_after - used_idle),
                        None if tcp_idle is None or tcp_end is None else tcp_end - tcp_idle,
                        (smaps_idle, smaps_end), t0, log_path)
    finally:
        if source is not None and source.poll() is None:
            source.kill()
            source.wait()
        if proxy.poll() is None:
            stop_proxy(proxy)
        if not logfile.closed:
            logfile.close()
        reap_exited()
    if result and not args.keep_log:
        os.unlink(log_path)
        os.rmdir(tmpdir)
    return 0 if result else 1


def report(args, idle, peak, last, samples, bound, pipe, logged_pipe, measured_pipe, roles, idle_per_pid,
           peak_uss_pid, hwm, sent, summary, ended, clean, used_delta, tcp_delta, smaps, t0, log_path):
    S, size = args.sources, args.buffer
    per_fwd = size + pipe
    ok = peak.uss <= bound
    total_sent = sum(sent["sent"])
    print()
    print("Backlog memory: %d sources x %d destinations, all down for %.0f s while the sources stream"
          % (S, DESTS, args.seconds))
    print("  --buffer %s (%d bytes) --framing line; pipes of %d KiB (%s)" % (
        args.buffer_text, size, pipe // KIB,
        "logged at start" if logged_pipe else "not logged (root: no pipe budget); F_GETPIPE_SZ of a forwarder's pipe"
        if measured_pipe else "assumed"))
    print("  sources: %d-byte lines at %.2f MiB/s each; sent %.1f MiB each (min %.1f, scheduled %.1f), "
          "%.0f MiB in all; worst lag behind schedule %d KiB, sends that would block: %d" % (
              args.line_size, mib(args.rate), mib(total_sent / S), mib(min(sent["sent"])),
              mib(sent["scheduled_each"]), mib(total_sent), sent["worst_lag_bytes"] // KIB, sent["would_block"]))
    print("  tree: %d processes (1 main + %d receivers + %d forwarders); %d samples, one a second, "
          "each %.2f s at most" % (idle.count, S, S * DESTS, len(samples), max(s.took for s in samples)))
    print()
    print("  %-44s %10s %10s" % ("", "USS MiB", "PSS MiB"))
    print("  %-44s %10.1f %10.1f" % ("idle tree (sources connected, nothing sent)", mib(idle.uss), mib(idle.pss)))
    print("  %-44s %10.1f" % ("bound: idle + %d x %d x (%s + %d KiB)" % (S, DESTS, args.buffer_text, pipe // KIB),
                              mib(bound)))
    print("  %-44s %10.1f %10.1f" % ("peak (t=%.0f s)" % (peak.t - t0), mib(peak.uss), mib(peak.pss)))
    print("  %-44s %10.1f %10.1f" % ("last sample (t=%.0f s)" % (last.t - t0), mib(last.uss), mib(last.pss)))
    print("  %-44s %10.2f" % ("peak / bound", peak.uss / bound))
    print("  %-44s %10.2f" % ("(peak - idle) / (bound - idle)", (peak.uss - idle.uss) / (bound - idle.uss)))
    print()
    print("  at the peak, USS over idle by role:")
    for name in ("main", "receiver", "forwarder"):
        n, now = peak.by_role.get(name, (0, 0))
        n0, before = idle.by_role.get(name, (0, 0))
        if n:
            print("    %-10s %4d x  %8.1f MiB in all, %8.3f MiB each (idle %.2f MiB each)"
                  % (name, n, mib(now - before), mib(now - before) / n, mib(before) / max(n0, 1)))
    fwd = [pid for pid, name in roles.items() if name == "forwarder" and pid in idle_per_pid]
    over = sorted(peak_uss_pid.get(pid, 0) - idle_per_pid[pid][0] for pid in fwd)
    hwm_over = sorted(hwm[pid] - idle_per_pid[pid][1] for pid in fwd if hwm.get(pid))
    if over:
        print("  per forwarder over its idle (allowed %.2f MiB = SIZE + pipe):" % mib(per_fwd))
        print("    peak USS of the 1 s samples: median %.2f, max %.2f MiB" % (mib(statistics.median(over)),
                                                                           mib(over[-1])))
    if hwm_over:
        above = sum(1 for h in hwm_over if h > per_fwd)
        print("    VmHWM (kernel's peak RSS) over idle RSS: median %.2f, max %.2f MiB; %d of %d forwarders above "
              "SIZE + pipe at some instant" % (mib(statistics.median(hwm_over)), mib(hwm_over[-1]), above,
                                               len(hwm_over)))
    smaps_idle, smaps_end = smaps
    for pid in smaps_idle:
        a, b = smaps_idle[pid], smaps_end.get(pid)
        if a and b:
            print("    forwarder %d, private bytes over idle: large blocks (the backlog's bytearray) %+.2f MiB, "
                  "[heap] %+.2f MiB (copy-on-write of pages inherited from main), other %+.2f MiB" % (
                      pid, mib(b["large"] - a["large"]), mib(b["heap"] - a["heap"]), mib(b["other"] - a["other"])))
    print("  kernel memory is in no USS: pipes (the bound's `+ pipe`; a forwarder that is down drains its pipe, so "
          "they stay nearly empty) and socket buffers%s." % (
              " (TCP buffers on the machine %+.1f MiB at the end of the window)" % mib(tcp_delta)
              if tcp_delta is not None else ""))
    print("  The machine's used memory (MemTotal - MemAvailable, everything running on it) rose by at most %.0f MiB "
          "over idle during the window, %+.0f MiB once the tree was gone" % (mib(used_delta[0]), mib(used_delta[1])))
    print()
    dropped_ok = summary["dropped"] + summary["sent"] == DESTS * summary["received"]
    print("  proxy log: received %.1f MiB from the sources (the sources sent %.1f MiB); %d forwarders done: sent %d "
          "bytes, dropped %.1f MiB (%d records) = %s" % (
              mib(summary["received"]), mib(total_sent), summary["forwarders_done"], summary["sent"],
              mib(summary["dropped"]), summary["dropped_records"],
              "%d x received, exact" % DESTS if dropped_ok else "NOT %d x received" % DESTS))
    for line in summary["errors"]:
        print("  log: " + line)
    if summary["refusal"]:
        print("  log: " + summary["refusal"].group(0))
    if ended != 1:
        print("  after the sources closed the tree still had %d processes after 30 s" % ended)
    print("  stop: SIGTERM to main, %s" % ("the whole tree gone" if clean else "tree not gone in 15 s: killed"))
    if args.keep_log:
        print("  proxy log kept: %s" % log_path)
    print()
    print("%s: peak %.1f MiB %s bound %.1f MiB (idle %.1f + %d x %d x %.1f MiB)" % (
        "PASS" if ok else "FAIL", mib(peak.uss), "<=" if ok else ">", mib(bound), mib(idle.uss), S, DESTS,
        mib(per_fwd)))
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=None, help="default 100 (20 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="default 30 (8 with --quick)")
    parser.add_argument("--buffer", default="4M", help="--buffer of the proxy; default 4M")
    parser.add_argument("--rate", type=int, default=0,
                        help="bytes/s per source; default 2.5 x (SIZE + pipe) / seconds")
    parser.add_argument("--line-size", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="20 sources, 8 s")
    parser.add_argument("--keep-log", action="store_true", help="keep the proxy's log and print its path")
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "source":
        return run_source(args)
    if args.sources is None:
        args.sources = 20 if args.quick else 100
    if args.seconds is None:
        args.seconds = 8.0 if args.quick else 30.0
    try:
        args.buffer_text = args.buffer
        args.buffer = parse_size(args.buffer)
    except argparse.ArgumentTypeError as exc:
        parser.error("--buffer %r: %s" % (args.buffer, exc))
    if args.buffer <= 0:
        parser.error("--buffer must be above 0: there is no backlog to measure otherwise")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
