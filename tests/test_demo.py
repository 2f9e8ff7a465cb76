"""`python -m fakes.demo` end to end: every check of the tour passes, and nothing it started is left behind,
also when it is interrupted by SIGINT (Ctrl-C) or SIGTERM in the middle of the tour."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from support import ROOT, alive, scaled, wait_until

MARKERS = ("socketproxy", "fakes.")


def start_demo():
    """The demo as a subprocess, its output collected line by line in a thread; (Popen, lines, thread)."""
    proc = subprocess.Popen([sys.executable, "-m", "fakes.demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, NO_COLOR=""))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines, reader


def ours_left(pids=()):
    """Project processes still running that descend from the test or carry one of pids."""
    found = []
    candidates = psutil.Process().children(recursive=True)
    for pid in pids:
        try:
            candidates.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in alive(candidates):
        try:
            if any(marker in " ".join(proc.cmdline()) for marker in MARKERS):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_scripted_demo_passes_every_check_and_ends_everything():
    started = time.monotonic()
    proc, lines, reader = start_demo()
    try:
        proc.wait(scaled(120))
    finally:
        proc.kill()
    elapsed = time.monotonic() - started
    reader.join(scaled(10))
    out = "".join(lines)
    assert proc.returncode == 0, out[-6000:]
    assert elapsed < scaled(60), "the scripted demo took %.1f s" % elapsed
    summary = out[out.index("=== SUMMARY"):]
    rows = re.findall(r"^  (PASS|FAIL) +[\d.]+ s  (.*)$", summary, re.M)
    assert len(rows) == 7 and all(result == "PASS" for result, _ in rows), summary
    assert "7 of 7 checks passed" in summary
    for step in ("start:", "step 1:", "step 2:", "step 3:"):
        assert any(title.startswith(step) for _, title in rows), summary
    assert "\x1b[" not in out, "colour codes although stdout is not a terminal"
    ended = re.search(r"demo  \| ended every process it started \(pids ([\d ]+)\)", out)
    assert ended, out[-3000:]
    pids = [int(pid) for pid in ended.group(1).split()]
    assert len(pids) >= 11, pids  # 2 destinations, 2 sources, main, 2 receivers, 4 forwarders
    assert not ours_left(pids)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_tour_ends_the_demo_promptly_and_everything_it_started(signum, code):
    proc, lines, reader = start_demo()
    try:
        wait_until(lambda: proc.poll() is not None or any(line.startswith("=== STEP 2/3") for line in lines), 60,
                   message=lambda: "".join(lines)[-3000:])
        assert proc.poll() is None, "".join(lines)[-3000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 9, started  # the proxy's tree and the fakes
        sent = time.monotonic()
        proc.send_signal(signum)
        proc.wait(scaled(15))
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    reader.join(scaled(10))
    out = "".join(lines)
    assert proc.returncode == code, out[-3000:]
    assert took < scaled(15), "took %.1f s to end" % took
    assert "interrupted by %s" % signal.Signals(signum).name in out
    assert not alive(started), alive(started)
    assert not ours_left([p.pid for p in started])
