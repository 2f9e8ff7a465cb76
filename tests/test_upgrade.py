"""Upgrade in place on SIGUSR2: main execs the installed command in its own process; its PID, the
listening socket and every group stay; a new version that cannot start leaves the running one."""
import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest

from support import (AS_NOBODY, ROOT, alive, connect_source, free_port, nobody_can_run_the_proxy, scaled, scrape,
                     start_proxy, tree, wait_for_log, wait_until)


class ConnectLoop(threading.Thread):
    """Opens, writes a line to and closes a connection about 100 times a second; counts failures."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.done, self.failures = 0, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=scaled(10)) as sock:
                    sock.sendall(b"hello\n")
                self.done += 1
            except OSError as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)  # pacing: about 100 connections a second


def test_three_upgrades_under_load_refuse_nothing_and_lose_no_line(proxy, recorder, tmp_path):
    """A line source streams and a connect loop runs at ~100/s while main is upgraded three times: the
    PID stays, no connection is refused or reset, the streaming source's group (still on the code it
    started with) delivers every line in order, and the counters go on (accepted never goes down)."""
    dest = recorder()
    port, metrics_port = free_port(), free_port()
    path = tmp_path / "proxy.toml"
    path.write_text('framing = "line"\nmetrics = "127.0.0.1:%d"\ndestinations = ["127.0.0.1:%d"]\n'
                    % (metrics_port, dest.port))
    px = proxy([], "--config", str(path), listen_port=port)
    wait_until(lambda: "serving metrics" in px.log())
    source = connect_source(px.port)
    sent = 0
    loop = ConnectLoop(px.port)
    loop.start()
    accepted = []
    try:
        for upgrade in range(1, 4):
            for _ in range(200):
                source.sendall(b"line %06d\n" % sent)
                sent += 1
            os.kill(px.pid, signal.SIGUSR2)
            wait_for_log(px.log_path, r"upgraded in place to socketproxy \S+ \(pid %d\)" % px.pid, count=upgrade,
                         timeout=30)
            wait_until(lambda: scrape(metrics_port).get(("socketproxy_sources_accepted_total", ())), 20)
            accepted.append(scrape(metrics_port)[("socketproxy_sources_accepted_total", ())])
            before = loop.done
            wait_until(lambda: loop.done >= before + 20, 20)
    finally:
        loop.stop.set()
        loop.join(scaled(10))
    for _ in range(200):
        source.sendall(b"line %06d\n" % sent)
        sent += 1
    source.close()
    assert px.proc.poll() is None
    assert not loop.failures, loop.failures[:5]
    assert loop.done > 100
    assert accepted == sorted(accepted) and accepted[0] > 1
    lines = [line for stream in dest.streams() for line in stream.splitlines() if line.startswith(b"line")]
    wait_until(lambda: len([l for s in dest.streams() for l in s.splitlines() if l.startswith(b"line")]) == sent, 20)
    lines = [line for stream in dest.streams() for line in stream.splitlines() if line.startswith(b"line")]
    assert lines == [b"line %06d" % i for i in range(sent)]
    assert "Traceback" not in px.log()


def copy_of_the_code(tmp_path):
    """The proxy's code in a directory of its own, to be broken and mended by the test."""
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(os.path.join(ROOT, "socketproxy.py"), code)
    shutil.copytree(os.path.join(ROOT, "socketproxy_core"), code / "socketproxy_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return code


def test_a_new_version_that_cannot_start_leaves_the_running_one(recorder, tmp_path):
    """The installed code is broken (a syntax error in the receiver's module): SIGUSR2 logs why the
    upgrade failed, the same image goes on serving (a new source's bytes arrive); mended, the next
    SIGUSR2 upgrades."""
    dest = recorder()
    code = copy_of_the_code(tmp_path)
    proc, port, log_path = start_proxy(tmp_path, ["127.0.0.1:%d" % dest.port],
                                       env={"PYTHONPATH": str(code)}, script=str(code / "socketproxy.py"))
    try:
        receiver_py = code / "socketproxy_core" / "receiver.py"
        good = receiver_py.read_text()
        receiver_py.write_text(good + "\ndef broken(:\n")
        os.kill(proc.pid, signal.SIGUSR2)
        wait_for_log(log_path, r"ERROR .*upgrade failed: the new version does not start \(SyntaxError: invalid "
                     r"syntax\); kept running this one", timeout=30)
        with connect_source(port) as sock:
            sock.sendall(b"still served\n")
            wait_until(lambda: dest.streams()[-1:] == [b"still served\n"], 20)
        receiver_py.write_text(good)
        os.kill(proc.pid, signal.SIGUSR2)
        wait_for_log(log_path, r"upgraded in place to socketproxy \S+ \(pid %d\)" % proc.pid, timeout=30)
        with connect_source(port) as sock:
            sock.sendall(b"after the upgrade\n")
            wait_until(lambda: dest.streams()[-1:] == [b"after the upgrade\n"], 20)
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(scaled(10)) == 0
    assert re.search(r"INFO \[\d+\] stopped", log_path.read_text())


def test_an_upgrade_with_a_certificate_file_that_no_longer_loads_leaves_the_running_one(recorder, tmp_path):
    """--tls-cert's file replaced by a broken one: the probe reads it as the new image would, and the
    upgrade fails with the reason; the running image goes on serving TLS sources."""
    import ssl
    import trustme
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    dest = recorder()
    proc, port, log_path = start_proxy(tmp_path, ["127.0.0.1:%d" % dest.port], "--tls-cert", str(cert))
    try:
        cert.write_text("not a certificate any more\n")
        os.kill(proc.pid, signal.SIGUSR2)
        wait_for_log(log_path, r"ERROR .*upgrade failed: the new version does not start \(cannot use --tls-cert %s"
                     % re.escape(str(cert)), timeout=30)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                 server_hostname="127.0.0.1") as sock:
            sock.sendall(b"still served\n")
            wait_until(lambda: dest.streams()[-1:] == [b"still served\n"], 20)
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(scaled(10)) == 0


def test_an_upgrade_as_nobody_under_systemds_kind_of_stop(proxy, recorder):
    """As the unprivileged user a service runs as (the memfds, the exec and the probe need nothing
    more): a source streams into a 10 kB/s reader across an upgrade; then every process of the tree
    gets SIGTERM at once, as systemd stops a unit. The source's bytes all reached the reader, main
    exited 0, nothing is left."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    dest = recorder(read_rate=10_000)
    px = proxy(["127.0.0.1:%d" % dest.port], "--framing", "line", prefix=AS_NOBODY)
    data = b"".join(b"line %06d\n" % i for i in range(2000))  # 24 kB: a couple of seconds at 10 kB/s
    with connect_source(px.port) as source:
        source.sendall(data[:12000])
        os.kill(px.pid, signal.SIGUSR2)
        wait_for_log(px.log_path, r"upgraded in place to socketproxy \S+ \(pid %d\)" % px.pid, timeout=30)
        source.sendall(data[12000:])
        wait_until(lambda: dest.total() == len(data), 30, message=lambda: (dest.total(), px.log()[-2000:]))
        procs = tree(px.pid)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert px.proc.wait(scaled(10)) == 0, px.log()[-3000:]
    assert b"".join(dest.streams()) == data
    assert not alive(procs), alive(procs)
    assert "Traceback" not in px.log()
