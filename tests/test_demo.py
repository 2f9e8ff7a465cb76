"""`python -m fakes.demo` end to end: every check of the tour passes, dst-2's numbers go on without a gap across
its restart, and nothing it started is left behind, also when it is interrupted by SIGINT (Ctrl-C) or SIGTERM in
the middle of the tour. The gap and torn-line checks themselves are also fed made-up output, to see them fail."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fakes.demo import Demo
from fakes.lines import make_line
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
    assert len(rows) == 9 and all(result == "PASS" for result, _ in rows), summary
    assert "9 of 9 checks passed" in summary
    for step in ("start:", "step 1:", "step 2:", "step 3:", "end:"):
        assert any(title.startswith(step) for _, title in rows), summary
    assert any("no gap" in title for _, title in rows) and any("torn" in title for _, title in rows), summary
    assert re.search(r"^demo  \| started proxy, pid \d+: .* --framing line ", out, re.M), out[:3000]
    assert re.search(r"^demo  \| started dst-2, pid \d+: .* --strict-lines$", out, re.M), out[:3000]
    for source in ("src-a", "src-b"):  # the lines sent while dst-2 was down came first after its restart
        shown = re.search(r"^demo  \| %s at dst-2: .*; (#\d+-#\d+) sent while it was down; "
                          r"after the restart (#\d+-#\d+) first, then #\d+-#\d+ live$" % source, out, re.M)
        assert shown and shown[1] == shown[2], out[-6000:]
    assert "malformed record from" not in out and "[partial]" not in out
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


def fed_demo(before, after, sent=6):
    """A Demo object (nothing started) whose output is made up: both sources sent #1..#sent, dst-1 got them all and
    dst-2 printed the numbers before (from each source), then after once restarted (or raw text); and that mark."""
    demo = Demo()
    put = demo.out.put
    for number in range(1, sent + 1):
        for source in ("src-a", "src-b"):
            line = make_line(source, number).rstrip("\n")
            put(source, "sent: " + line)
            put("dst-1", "127.0.0.1:40000: " + line)

    def show(numbers):
        for entry in numbers:
            for source in ("src-a", "src-b"):
                put("dst-2", entry if isinstance(entry, str) else
                    "127.0.0.1:40001: " + make_line(source, entry).rstrip("\n"))

    show(before)
    mark = demo.mark()
    show(after)
    return demo, mark


def test_gap_check_passes_when_the_kept_lines_come_first_after_the_restart():
    """When dst-2 had #1-#2, #3-#6 were sent while it was down, and after its restart it got #3-#8, it passes."""
    demo, mark = fed_demo([1, 2], [3, 4, 5, 6, 7, 8])
    demo.check_no_gap("no gap", mark)
    assert demo.results[-1][:2] == ("no gap", True)
    assert demo.summary() == 0


@pytest.mark.parametrize("after", [[4, 5, 6, 7], [3, 5, 6, 7], [2, 3, 4, 5, 6, 7], [4, 3, 5, 6, 7], [3, 4, 5, 6], []],
                         ids=["gap-at-restart", "gap-later", "repeat", "reorder", "no-live-line", "nothing"])
def test_gap_check_fails_the_demo_on_a_gap_repeat_or_reorder(after):
    """When dst-2's numbers from a source skip, repeat or go back across its restart, or nothing live follows the
    kept lines, the check and the demo fail."""
    demo, mark = fed_demo([1, 2], after)
    demo.check_no_gap("no gap", mark)
    assert demo.results[-1][:2] == ("no gap", False)
    assert demo.summary() == 1


@pytest.mark.parametrize("bad", [
    "malformed record from 127.0.0.1:40001 (the first record of the connection): 'c-a #3 x'; closing the connection",
    "127.0.0.1:40001: rc-a #3 abcdefghij 00000000",
    "127.0.0.1:40001: src-a #3 abcde [partial]",
], ids=["reported-by-strict", "bad-crc", "partial"])
def test_torn_check_fails_the_demo_on_a_torn_or_malformed_line(bad):
    """When a destination printed a malformed report, a line that is not a whole record or a partial one, the end
    check and the demo fail; with whole lines only it passes."""
    demo, _ = fed_demo([1, 2, 3], [4, 5])
    demo.check_records("whole")
    assert demo.results[-1][:2] == ("whole", True)
    demo.out.put("dst-2", bad)
    demo.check_records("whole")
    assert demo.results[-1][:2] == ("whole", False)
    assert demo.summary() == 1


def test_the_reload_demo_passes_every_check():
    """make reload-demo: three reloads and an upgrade under a streaming source, every check held, and
    nothing of it left running."""
    done = subprocess.run([sys.executable, "-m", "fakes.reload_demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=scaled(120), env=dict(os.environ, NO_COLOR=""))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert done.stdout.count("PASS") == 6 and "FAIL" not in done.stdout, done.stdout[-3000:]
    assert "reload demo: every check held" in done.stdout
    assert not ours_left()
