"""Deployment: an unprivileged user, systemd's stop and notify, dual-stack names, slow readers, signals."""
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import psutil
import pytest

from socketproxy_core import forking
from support import (AS_NOBODY, ROOT, CountingSink, alive, blackhole, by_role, connect_source, dual_address_prefix,
                     free_port, nobody_can_run_the_proxy, scaled, sees_close, send_in_thread, syn_sent_to, tcp_queues,
                     tree, wait_for_log, wait_until)



def serving(px, dests, sources=1, per_source=1):
    """Connect sources and wait until each destination has per_source connections from each."""
    socks = [connect_source(px.port) for _ in range(sources)]
    wait_until(lambda: all(d.open_count() == sources * per_source for d in dests))
    return socks


def errors_in(log_text):
    return [line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line]


# -- slow destinations ------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, rcvbuf", [(40_000, 65536), (10_000, 16384)], ids=["40kB/s", "10kB/s"])
def test_slow_destination_that_makes_progress_is_never_dropped(proxy, recorder, rate, rcvbuf):
    """A reader far slower than the source, with a small receive buffer: backpressure, one connection,
    every byte. The proxy's send buffer fills, and poll's POLLOUT (a third of it free) would take
    tens of seconds at this rate; progress is bytes acknowledged, so --send-timeout never fires.
    The reader is slow for longer than --send-timeout plus the time to fill the buffers, then fast.
    On loopback (64 KiB segments) a window reopens only once a segment's worth, or half the buffer, is
    free: every 1.6 s here in both cases, under the default --send-timeout of 5 s.
    """
    send_timeout = 5
    slow = recorder(read_rate=rate, rcvbuf=rcvbuf, slow_for=send_timeout + 6)
    fast = recorder()
    px = proxy(["127.0.0.1:%d" % slow.port, "127.0.0.1:%d" % fast.port])
    [source] = serving(px, [slow, fast])
    payload = os.urandom(12 << 20)
    port = source.getsockname()[1]
    sender = send_in_thread(source, payload, close=False)
    # The source is slowed down: the proxy stops reading it while the slow destination catches up
    # (its bytes wait in the source's send queue or, up to tcp_rmem's limit, in the proxy's receive queue).
    wait_until(lambda: sum(tcp_queues(port, px.port) or (0, 0)) + sum(tcp_queues(px.port, port) or (0, 0)) > 0, 30)
    wait_until(lambda: not sender.is_alive(), 60)
    source.close()
    wait_until(lambda: slow.closed_count() == 1 and fast.closed_count() == 1, 60)
    assert "send timeout" not in px.log() and "timed out" not in px.log(), px.log()
    assert slow.streams() == [payload] and fast.streams() == [payload]
    wait_for_log(px.log_path, r"forwarder done: sent %d bytes, dropped 0 bytes" % len(payload), count=2)


# -- names with several addresses -----------------------------------------------------------------

def test_every_address_of_a_name_is_tried_in_order(proxy, recorder, tmp_path):
    """A name resolving to ::1 first, then 127.0.0.1, with the service on 127.0.0.1 only (as localhost
    on Debian): the second address answers, and the log says which."""
    prefix = dual_address_prefix(tmp_path)
    dest = recorder()
    px = proxy(["dual.socketproxy.test:%d" % dest.port], prefix=prefix)
    source = connect_source(px.port)
    source.sendall(b"over the second address\n")
    wait_until(lambda: dest.streams() == [b"over the second address\n"])
    wait_for_log(px.log_path, r"connected to dual\.socketproxy\.test:%d \(127\.0\.0\.1\)$" % dest.port)
    assert "cannot connect" not in px.log()


# -- an unprivileged user -----------------------------------------------------------------------------

def test_fifty_sources_as_nobody_all_stream_alike(proxy):
    """As nobody (64 MiB of pipe buffers), 50 sources at D=2: every byte, and the last source streams
    within 2x the rate of the first (pipes that do not fit the budget shrink to 8 KiB silently)."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    sinks = [CountingSink(), CountingSink()]
    try:
        px = proxy(["127.0.0.1:%d" % sink.port for sink in sinks], prefix=AS_NOBODY)
        wait_for_log(px.log_path, r"pipes of \d+ KiB, growing while busy: 256 sources x 5 pipes fit")
        assert psutil.Process(px.pid).uids().effective == 65534
        block = os.urandom(1 << 20)
        blocks = 160
        expected = []  # (bytes, crc32) of every source

        def timed_stream():
            sock = connect_source(px.port)
            before = sinks[0].total()
            start = time.monotonic()
            crc = 0
            for _ in range(blocks):
                sock.sendall(block)
                crc = zlib.crc32(block, crc)
            wait_until(lambda: all(sink.total() == before + blocks * len(block) for sink in sinks), 120,
                       interval=0.005)
            expected.append((blocks * len(block), crc))
            return sock, blocks * len(block) / (time.monotonic() - start)

        first, first_rate = timed_stream()
        idle = []
        for i in range(48):
            sock = connect_source(px.port)
            sock.sendall(b"idle %d\n" % i)
            expected.append((len(b"idle %d\n" % i), zlib.crc32(b"idle %d\n" % i)))
            idle.append(sock)
        wait_until(lambda: len(by_role(px.pid, "forwarder")) == 2 * 49, 60)
        wait_until(lambda: all(sink.total() == blocks * len(block) + sum(n for n, _ in expected[1:])
                               for sink in sinks))
        last, last_rate = timed_stream()
        for sock in [first, last] + idle:
            sock.close()
        wait_until(lambda: all(sink.closed_count() == 50 for sink in sinks), 60)
        for sink in sinks:
            assert sink.summary() == sorted(expected)
        assert last_rate >= first_rate / 2, "first %.0f MB/s, 50th %.0f MB/s" % (first_rate / 1e6, last_rate / 1e6)
        assert "kernel refused a pipe" not in px.log()
    finally:
        for sink in sinks:
            sink.stop()


def pipe_sizes(pid):
    """The sizes of the pipes a process holds, an entry per descriptor (root opens them through /proc;
    F_GETPIPE_SZ). A receiver holds its staging pipe's two ends and a pipe per forwarder, a retaining
    forwarder its input pipe and its shadow's two ends; both hold signal pipes of the kernel's
    default size (64 KiB) besides."""
    sizes = []
    for name in os.listdir("/proc/%d/fd" % pid):
        path = "/proc/%d/fd/%s" % (pid, name)
        try:
            if not os.readlink(path).startswith("pipe:"):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            sizes.append(fcntl.fcntl(fd, 1032))
        finally:
            os.close(fd)
    return sizes


def test_as_nobody_a_busy_sources_pipes_grow_and_shrink_back_when_it_idles(proxy):
    """As nobody, pipes start small (a quarter of the budget's share for --max-connections sources); the
    pipes of a source that streams grow, its forwarders' shadow pipes with them, while 20 idle sources
    keep small ones and a source that connects meanwhile gets its pipes; once the stream pauses,
    they shrink back. Every byte arrives."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    sinks = [CountingSink(), CountingSink()]
    try:
        px = proxy(["127.0.0.1:%d" % sink.port for sink in sinks], prefix=AS_NOBODY)
        base = int(wait_for_log(px.log_path, r"pipes of (\d+) KiB, growing while busy")[0].group(1)) * 1024
        assert base < 64 * 1024  # told apart from the signal pipes below

        def grown(pid, count):
            return min(sorted(pipe_sizes(pid))[-count:]) >= 8 * base

        def small(pid, count):
            sizes = pipe_sizes(pid)
            return sizes.count(base) == count and max(sizes) <= 64 * 1024
        idle = [connect_source(px.port) for _ in range(20)]
        wait_until(lambda: len(by_role(px.pid, "forwarder")) == 40, 60)
        busy = connect_source(px.port)
        wait_until(lambda: len(by_role(px.pid, "receiver")) == 21, 30)
        receiver = next(proc for proc in by_role(px.pid, "receiver")
                        if ":%d " % busy.getsockname()[1] in " ".join(proc.cmdline()))
        block = os.urandom(1 << 20)
        stop = threading.Event()
        sent = [0]

        def stream():
            while not stop.is_set():
                busy.sendall(block)
                sent[0] += len(block)
        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            wait_until(lambda: grown(receiver.pid, 4), 60, message=lambda: (pipe_sizes(receiver.pid), base))
            forwarder = receiver.children()[0]
            wait_until(lambda: grown(forwarder.pid, 3), 30, message=lambda: (pipe_sizes(forwarder.pid), [(n, os.readlink("/proc/%d/fd/%s" % (forwarder.pid, n))) for n in os.listdir("/proc/%d/fd" % forwarder.pid)], forwarder.cmdline()))
            newcomer = connect_source(px.port)
            newcomer.sendall(b"a newcomer\n")
            wait_until(lambda: len(by_role(px.pid, "receiver")) == 22, 30)
            fresh = next(proc for proc in by_role(px.pid, "receiver")
                         if ":%d " % newcomer.getsockname()[1] in " ".join(proc.cmdline()))
            assert small(fresh.pid, 4), pipe_sizes(fresh.pid)
            others = [proc for proc in by_role(px.pid, "receiver") if proc.pid not in (receiver.pid, fresh.pid)]
            assert all(small(proc.pid, 4) for proc in others)
        finally:
            stop.set()
            sender.join(60)
        wait_until(lambda: all(sink.total() == sent[0] + len(b"a newcomer\n") for sink in sinks), 60)
        wait_until(lambda: small(receiver.pid, 4), 60, message=lambda: pipe_sizes(receiver.pid))
        wait_until(lambda: small(forwarder.pid, 3), 30, message=lambda: pipe_sizes(forwarder.pid))
        for sock in [busy, newcomer] + idle:
            sock.close()
        wait_until(lambda: all(sink.closed_count() == 22 for sink in sinks), 60)
        assert "kernel refused a pipe" not in px.log() and not errors_in(px.log())
    finally:
        for sink in sinks:
            sink.stop()


def test_a_refused_pipe_size_is_logged_once(proxy, recorder, tmp_path):
    """When the user's pipe budget is used up by another program, the log says so once, not per pipe."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    hog_code = ("import fcntl, os, sys\n"
                "pipes = []\n"
                "while True:\n"
                "    r, w = os.pipe(); pipes.append((r, w))\n"
                "    try: fcntl.fcntl(w, 1031, 1 << 20)\n"
                "    except OSError: break\n"
                "print('full', flush=True); sys.stdin.read()\n")
    hog = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", hog_code], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "full"
        dest = recorder()
        px = proxy(["127.0.0.1:%d" % dest.port], "--max-connections", "4", prefix=AS_NOBODY)
        socks = serving(px, [dest], sources=3)
        for sock in socks:
            sock.sendall(b"still delivered\n")
        wait_until(lambda: dest.total() == 3 * len(b"still delivered\n"))
        wait_for_log(px.log_path, r"the kernel refused a pipe of 1024 KiB .*fs\.pipe-user-pages-soft")
        assert px.log().count("the kernel refused a pipe") == 1
    finally:
        hog.kill()
        hog.wait()


# -- signals: handlers only record, systemd's stop, SIGHUP --------------------------------------------

def test_signals_during_churn_are_handled_by_the_loop(proxy, recorder):
    """Sources come and go (SIGCHLD, log lines) while SIGHUP arrives again and again, with the log on
    a pipe: no reentrant write, no traceback, main serves on, and every receiver is reaped."""
    dest = recorder()
    port = free_port()
    argv = [sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "127.0.0.1:%d" % dest.port]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(b"listening on" in line for line in lines))
        stop = threading.Event()

        def hup():
            while not stop.is_set():
                os.kill(proc.pid, signal.SIGHUP)
                time.sleep(0.002)

        spammer = threading.Thread(target=hup, daemon=True)
        spammer.start()
        for i in range(60):
            with connect_source(port) as sock:
                sock.sendall(b"%d\n" % i)
        wait_until(lambda: dest.closed_count() == 60, 60)
        stop.set()
        spammer.join()
        wait_until(lambda: sum(b"] receiver " in line and b" ended: exit status 0" in line for line in lines) == 60)
        assert proc.poll() is None
        assert not [p for p in psutil.Process(proc.pid).children() if p.status() == psutil.STATUS_ZOMBIE]
        with connect_source(port) as sock:
            sock.sendall(b"after\n")
        wait_until(lambda: dest.closed_count() == 61)
        assert sorted(dest.streams()) == sorted([b"%d\n" % i for i in range(60)] + [b"after\n"])
    finally:
        procs = tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(scaled(10))
        reader.join(5)
    text = b"".join(lines).decode()
    assert code == 0, text
    assert "SIGHUP ignored" in text
    assert "reentrant" not in text and "Traceback" not in text, text
    assert not alive(procs)


@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "with-metrics"])
def test_systemd_stop_signals_every_process_at_once(proxy, recorder, metrics):
    """KillMode=control-group: SIGTERM to every process of the tree together is the same orderly stop
    as SIGTERM to main: data already read is delivered, exit 0, no error line, nothing left (the
    metrics process included)."""
    slow = recorder(read_rate=3_000_000)
    fast = recorder()
    options = ["--metrics", "127.0.0.1:%d" % free_port()] if metrics else []
    px = proxy(["127.0.0.1:%d" % slow.port, "127.0.0.1:%d" % fast.port], *options)
    if metrics:
        wait_for_log(px.log_path, "serving metrics")
    socks = serving(px, [slow, fast], sources=2)
    payload = os.urandom(1_000_000)
    for sock in socks:
        sock.sendall(payload)
    ports = [sock.getsockname()[1] for sock in socks]
    wait_until(lambda: all(tcp_queues(p, px.port) == (0, 0) and tcp_queues(px.port, p) == (0, 0) for p in ports))
    procs = tree(px.pid)
    assert len(procs) == 1 + 2 * 3 + metrics
    for proc in reversed(procs):  # main last: its children's ends reach it before its own signal
        proc.send_signal(signal.SIGTERM)
    assert px.proc.wait(scaled(10)) == 0
    assert not alive(procs), "main exited before its tree was gone"
    wait_until(lambda: slow.closed_count() == 2 and fast.closed_count() == 2)
    assert slow.streams() == [payload, payload] and fast.streams() == [payload, payload]
    assert all(sees_close(sock) for sock in socks)
    assert not errors_in(px.log()), px.log()
    assert "WARNING" not in px.log(), px.log()


def test_main_exits_only_once_its_groups_are_gone(proxy, recorder):
    """SIGTERM to main alone: when its exit is observed, no process of its tree is left."""
    dest = recorder(read_rate=500_000)
    px = proxy(["127.0.0.1:%d" % dest.port, "127.0.0.1:%d" % dest.port])
    socks = serving(px, [dest], sources=3, per_source=2)
    for sock in socks:
        sock.sendall(os.urandom(300_000))
    procs = tree(px.pid)
    assert len(procs) == 1 + 3 * 3
    os.kill(px.pid, signal.SIGTERM)
    assert px.proc.wait(scaled(10)) == 0
    assert not alive(procs), alive(procs)


def test_sighup_stops_nothing(proxy, recorder):
    """SIGHUP to every process of the tree without --config: main logs that it has nothing to read again,
    nothing stops or is lost."""
    d1, d2 = recorder(), recorder()
    px = proxy(["127.0.0.1:%d" % d1.port, "127.0.0.1:%d" % d2.port])
    [source] = serving(px, [d1, d2])
    source.sendall(b"before\n")
    procs = tree(px.pid)
    for proc in procs:
        proc.send_signal(signal.SIGHUP)
    wait_for_log(px.log_path, r"SIGHUP ignored: no --config file to read again; serving 1 sources")
    source.sendall(b"after\n")
    wait_until(lambda: d1.streams() == d2.streams() == [b"before\nafter\n"])
    assert len(alive(procs)) == len(procs) == 4
    assert d1.open_count() == d2.open_count() == 1


def test_service_manager_is_notified_ready_and_stopping(proxy, recorder, tmp_path):
    """Type=notify: READY=1 once listening, STOPPING=1 when the stop begins."""
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(scaled(10))
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], env={"NOTIFY_SOCKET": path})
    assert listener.recv(4096).split(b"\n")[0] == b"READY=1"
    os.kill(px.pid, signal.SIGTERM)
    assert listener.recv(4096) == b"STOPPING=1"
    assert px.proc.wait(scaled(10)) == 0
    listener.close()


def test_log_lines_under_the_journal_and_elsewhere(proxy, recorder):
    """Under the journal: a syslog priority and no time; elsewhere an ISO 8601 time with the zone."""
    dest = recorder()
    plain = proxy(["127.0.0.1:%d" % dest.port])
    journal = proxy(["127.0.0.1:%d" % dest.port], journal=True)
    first = plain.log().splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO \[\d+\] ", first), first
    journal_first = journal.log().splitlines()[0]
    assert re.match(r"^<6>INFO \[\d+\] ", journal_first), journal_first
    connect_source(journal.port).close()
    os.kill(journal.pid, signal.SIGTERM)
    journal.proc.wait(scaled(10))
    assert all(line.startswith("<") for line in journal.log().splitlines())


# -- destinations that never answer -------------------------------------------------------------------

def test_first_attempt_holds_the_source_at_most_send_timeout(proxy, recorder):
    """--connect-timeout 10, --send-timeout 2, a destination that never answers a SYN: the source is held
    about 2 s, not 10 (its data for that destination is dropped and counted), the other gets it all."""
    hole, fillers = blackhole()
    fast = recorder()
    px = proxy(["127.0.0.1:%d" % hole.getsockname()[1], "127.0.0.1:%d" % fast.port],
               "--connect-timeout", "10", "--send-timeout", "2")
    try:
        source = connect_source(px.port)
        payload = os.urandom(96 << 20)  # more than the kernel may buffer (tcp_rmem allows 32 MiB)
        start = time.monotonic()
        sender = send_in_thread(source, payload)
        wait_until(lambda: not sender.is_alive(), 8, message="the source was held past --send-timeout")
        assert time.monotonic() - start < scaled(8)
        wait_until(lambda: fast.closed_count() == 1)
        assert fast.streams() == [payload]
        wait_for_log(px.log_path, r"forwarder done: sent 0 bytes, dropped %d bytes" % len(payload))
    finally:
        for sock in [hole] + fillers:
            sock.close()


@pytest.mark.parametrize("buffer", ["0", "4M"])
def test_no_spin_while_connecting_after_the_source_ended(proxy, buffer):
    """A reconnect attempt in flight to a destination that never answers, then the source closes: the
    forwarder never spins on its hung-up pipe. With nothing kept (--buffer 0) it gives the attempt
    up at once; with a backlog to deliver it lets the attempt run out, idle, then counts the drop."""
    port = free_port()
    px = proxy(["127.0.0.1:%d" % port], "--connect-timeout", "4", "--retry-interval", "0.2", "--buffer", buffer)
    source = connect_source(px.port)
    source.sendall(b"x" * 1000)
    wait_for_log(px.log_path, r"cannot connect to 127.0.0.1:%d: connection refused" % port)
    hole = socket.socket()
    hole.bind(("127.0.0.1", port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        wait_until(lambda: syn_sent_to(port), 10)
        [fwd] = by_role(px.pid, "forwarder")
        source.close()
        cpu_before = sum(fwd.cpu_times()[:2])
        spent = 0.0
        started = time.monotonic()
        while "forwarder done" not in px.log():
            try:
                spent = sum(fwd.cpu_times()[:2]) - cpu_before
            except psutil.NoSuchProcess:
                break
            assert spent < 0.5, "the forwarder spins"
            assert time.monotonic() - started < scaled(3 if buffer == "0" else 10), px.log()
            time.sleep(0.05)
        wait_for_log(px.log_path, r"forwarder done: sent 0 bytes, dropped 1000 bytes")
        wait_until(lambda: not by_role(px.pid, "receiver"))
    finally:
        filler.close()
        hole.close()


# -- forks, listening, refusals, dead receivers --------------------------------------------------------

def test_fork_closes_descriptors_only_up_to_the_limit(monkeypatch):
    """Where close_range(2) is missing or denied, CPython closes each number: the range ends at RLIMIT_NOFILE."""
    calls = []
    monkeypatch.setattr(forking.os, "closerange", lambda low, high: calls.append((low, high)))
    forking.close_fds_except([7, 9])
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert calls[:2] == [(3, 7), (8, 9)]
    assert calls[-1] == (10, soft)


FORK_SCRIPT = """
import json, os, socket, sys
sys.path.insert(0, %r)
from socketproxy_core import forking
extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)] + [socket.socket().detach(), os.dup2(0, 300)]
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()

def child():
    os.write(ready_w, b"x")  # descriptors closed: the parent may look
    os.read(go_r, 1)

pid = forking.fork_child("fd-check", child, keep=[extra[2], go_r, ready_w])
os.read(ready_r, 1)
fds = sorted(int(fd) for fd in os.listdir("/proc/%%d/fd" %% pid))
os.write(go_w, b"x")
os.waitpid(pid, 0)
print(json.dumps({"fds": fds, "kept": [extra[2], go_r, ready_w]}))
"""


def test_forked_child_holds_exactly_the_kept_descriptors():
    """A child of fork_child has 0, 1, 2 and the kept descriptors open, nothing else (low or high)."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT % ROOT], capture_output=True, text=True,
                            timeout=scaled(30))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = sorted([0, 1, 2] + report["kept"])
    assert report["fds"] == expected, "open in the child: %s, expected %s" % (report["fds"], expected)


def test_listen_on_any_ipv6_accepts_ipv4_whatever_the_host_default():
    """--listen-host :: takes IPv4 sources even where net.ipv6.bindv6only=1 (in a network namespace)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to set net.ipv6.bindv6only=1 in a network namespace")
    code = ("import socket, sys\n"
            "sys.path.insert(0, %r)\n"
            "import socketproxy\nfrom socketproxy_core import endpoints\n"
            "config = endpoints.Config(listen_host='::', listen_port=8000, dests=())\n"
            "listener = socketproxy.bind_listener(config)\n"
            "client = socket.create_connection(('127.0.0.1', 8000), timeout=5)\n"
            "conn, peer = listener.accept()\n"
            "print(peer[0])\n" % ROOT)
    result = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && sysctl -qw '
                             'net.ipv6.bindv6only=1 && exec "$0" -c "$1"', sys.executable, code],
                            capture_output=True, text=True, timeout=scaled(30))
    if "sysctl" in result.stderr or "RTNETLINK" in result.stderr:
        pytest.skip("cannot make a network namespace here: %s" % result.stderr.strip())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "::ffff:127.0.0.1"


def test_a_burst_of_refused_sources_is_summarised(proxy, recorder):
    """--max-connections 1 and a burst of 40 more: one line for the first, then a summary, not 40 lines."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--max-connections", "1")
    [kept] = serving(px, [dest])
    refused = [connect_source(px.port) for _ in range(40)]
    wait_until(lambda: all(sees_close(sock) for sock in refused))
    wait_for_log(px.log_path, r"refused \d+ more sources in the last 1 s: \d+ already serving --max-connections 1")
    lines = [line for line in px.log().splitlines() if "refused" in line]
    assert len(lines) <= 4, lines
    counted = sum(int(m.group(1)) for m in (re.search(r"refused (\d+) more", line) for line in lines) if m)
    assert counted + sum("refused 127.0.0.1:" in line for line in lines) == 40
    kept.sendall(b"unaffected\n")
    wait_until(lambda: dest.streams() == [b"unaffected\n"])


def test_forwarders_of_a_killed_receiver_say_it_died(proxy, recorder):
    """kill -9 of a receiver: its forwarders log that it died and what its pipe still held, never a
    clean 'source finished' (main is held stopped so they outlive it long enough to be heard)."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port, "127.0.0.1:%d" % dest.port])
    [source] = serving(px, [dest], per_source=2)
    source.sendall(b"some data\n")
    wait_until(lambda: dest.total() == 20)
    [rec] = by_role(px.pid, "receiver")
    members = [rec] + rec.children()
    os.kill(px.pid, signal.SIGSTOP)
    try:
        rec.send_signal(signal.SIGKILL)
        wait_for_log(px.log_path, r"receiver %d died: the source's connection is lost; its pipe still held \d+ "
                     r"bytes, dropped" % rec.pid, count=2)
    finally:
        os.kill(px.pid, signal.SIGCONT)
    wait_until(lambda: not alive(members) and sees_close(source))
    assert "source finished" not in px.log()
