"""`python -m fakes.cluster_demo` (make cluster-demo): contrib/haproxy.cfg is valid for haproxy -c, the demo renders it
with its own ports, and end to end (3 instances behind HAProxy, 30 sources, one instance killed) every check passes
and nothing it started is left, also when it is interrupted. The end-to-end tests need haproxy (`make cluster-demo`
installs it from Debian) and are skipped without it."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fakes import cluster_demo
from support import ROOT, alive, scaled, wait_until

HAPROXY = cluster_demo.find_haproxy()
needs_haproxy = pytest.mark.skipif(not HAPROXY, reason="haproxy is not installed (make cluster-demo installs it)")
MARKERS = ("socketproxy", "fakes.", "haproxy")


def start_demo():
    """The demo as a subprocess, its output collected line by line in a thread; (Popen, lines, thread)."""
    proc = subprocess.Popen([sys.executable, "-m", "fakes.cluster_demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines, reader


def ours_left(procs):
    """Processes of the demo (proxies, fakes, haproxy) still running among procs and our descendants."""
    found = []
    for proc in alive(procs + psutil.Process().children(recursive=True)):
        try:
            if any(marker in " ".join(proc.cmdline()) for marker in MARKERS):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_render_config_puts_the_demo_ports_in_the_template_and_keeps_the_rest():
    with open(cluster_demo.TEMPLATE) as template:
        text = template.read()
    out = cluster_demo.render_config(text, 18000, [18001, 18002, 18003, 18004])
    assert re.findall(r"^\s*bind\s+(\S+)", out, re.M) == ["127.0.0.1:18000"]
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+)(.*)$", out, re.M)
    assert [(name, addr) for name, addr, _ in servers] == [("sp%d" % i, "127.0.0.1:1800%d" % i) for i in range(1, 5)]
    assert len({rest for _, _, rest in servers}) == 1  # every line made from the template's first
    for setting in ("balance leastconn", "option tcpka", "timeout client 1h", "timeout server 1h", "check inter 500ms",
                    "on-marked-down shutdown-sessions", "send-proxy-v2", "check-send-proxy"):
        assert setting in out and setting in text
    kept = [line for line in text.splitlines() if not re.match(r"^\s*(bind|server)\s", line)]
    assert [line for line in out.splitlines() if not re.match(r"^\s*(bind|server)\s", line)] == kept


def test_without_haproxy_the_demo_says_it_is_skipped_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(cluster_demo, "find_haproxy", lambda: None)
    monkeypatch.setattr(sys, "argv", ["cluster_demo"])
    with pytest.raises(SystemExit) as exited:
        cluster_demo.main()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "haproxy is not installed" in out and "skipped" in out, out


@needs_haproxy
def test_contrib_haproxy_cfg_is_valid():
    check = subprocess.run([HAPROXY, "-c", "-f", cluster_demo.TEMPLATE], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_haproxy
def test_cluster_demo_passes_every_check_and_ends_everything():
    started = time.monotonic()
    proc, lines, reader = start_demo()
    try:
        proc.wait(scaled(90))
    finally:
        proc.kill()
    elapsed = time.monotonic() - started
    reader.join(scaled(10))
    out = "".join(lines)
    assert proc.returncode == 0, out[-8000:]
    assert elapsed < scaled(60), "the cluster demo took %.1f s" % elapsed
    summary = out[out.index("=== SUMMARY"):]
    rows = re.findall(r"^  (PASS|FAIL)  (.*)$", summary, re.M)
    assert len(rows) == 11 and all(result == "PASS" for result, _ in rows), summary
    assert "11 of 11 checks passed" in summary
    counts = re.search(r"^demo +\| sources per instance: sp1 (\d+), sp2 (\d+), sp3 (\d+) ", out, re.M)
    assert counts and sum(map(int, counts.groups())) == 30 and all(int(n) for n in counts.groups()), out[:5000]
    after = re.search(r"^demo +\| sources per instance after the move: sp1 (\d+), sp3 (\d+) ", out, re.M)
    assert after and int(after[1]) + int(after[2]) == 30, out[-8000:]
    assert re.search(r"^demo +\| ended every process it started \(\d+\)$", out, re.M), out[-3000:]
    assert not ours_left([])


@needs_haproxy
def test_interrupted_cluster_demo_ends_everything_it_started():
    proc, lines, reader = start_demo()
    try:
        wait_until(lambda: proc.poll() is not None or any("sources per instance:" in line for line in lines), 60,
                   message=lambda: "".join(lines)[-3000:])
        assert proc.poll() is None, "".join(lines)[-3000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 3 + 2 + 1 + 30 + 30 * 3, len(started)  # mains, fakes, haproxy, every group
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(scaled(20))
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    reader.join(scaled(10))
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert took < scaled(20), "took %.1f s to end" % took
    assert "interrupted by SIGINT" in out
    assert not ours_left(started), ours_left(started)
    logs = re.search(r"logs of every process are in (\S+)", out)
    assert logs and not os.path.exists(logs[1]) and "logs kept" not in out, out[-3000:]
