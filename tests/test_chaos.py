"""The 10-second chaos run (bench/chaos.py) as part of the suite: it must pass and print its table."""
import os
import signal
import subprocess
import sys

import psutil
import pytest

from support import ROOT, reap_orphans

CHAOS = os.path.join(ROOT, "bench", "chaos.py")
RUN_TIMEOUT_S = 240  # a 10 s run takes about 20 s; this only bounds a hung run


def stop(proc):
    """SIGTERM chaos.py (it cleans up what it started), then SIGKILL whatever of its tree is left."""
    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    reap_orphans()


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_chaos_10_seconds_passes():
    """Ten seconds of random kills, stops and resets: every check of the chaos table passes."""
    proc = subprocess.Popen([sys.executable, CHAOS, "--seconds", "10"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(proc)
        output, _ = proc.communicate()
        pytest.fail("chaos run did not finish within %d s:\n%s" % (RUN_TIMEOUT_S, output[-6000:]))
    reap_orphans()
    tail = output[-8000:]
    table_printed = "fault injected" in output and "detail" in output
    assert table_printed, tail
    passed = proc.returncode == 0 and "result: PASS" in output
    assert passed, tail
