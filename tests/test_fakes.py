"""The fake source and destination used by the demo: line format, reconnects, many peers, resets, signals, bad args."""
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from support import ROOT, Recorder, free_port, scaled, wait_until

LINE = re.compile(r"^(?P<id>\S+) #(?P<seq>\d+) [a-z]{8,20}$")


class Fake:
    """A fake source or destination run as `python -m fakes.<name>`, its stdout and stderr in files."""

    def __init__(self, tmp_path, name, *args):
        self.out_path = tmp_path / ("%s-%d.out" % (name, time.monotonic_ns()))
        self.err_path = self.out_path.with_suffix(".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fakes." + name, *args],
                                         cwd=ROOT, stdout=out, stderr=err)

    def out(self):
        return self.out_path.read_text()

    def err(self):
        return self.err_path.read_text()

    def wait_for(self, pattern, count=1, timeout=20):
        """The matches of pattern in stdout once there are count of them (fails if the process ended)."""
        regex = re.compile(pattern, re.M)

        def found():
            assert self.proc.poll() is None, "exited %s:\n%s%s" % (self.proc.returncode, self.out(), self.err())
            matches = list(regex.finditer(self.out()))
            return matches if len(matches) >= count else None

        return wait_until(found, timeout, message=lambda: "no %d x %r in:\n%s" % (count, pattern, self.out()))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(scaled(10))


@pytest.fixture
def fake(tmp_path):
    """Factory: fake("source", *args) starts a fake; every one is killed and waited for at teardown."""
    started = []

    def start(name, *args):
        started.append(Fake(tmp_path, name, *args))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def recorders():
    """Factory of Recorder destinations, stopped at teardown."""
    made = []

    def make(**kwargs):
        made.append(Recorder(**kwargs))
        return made[-1]

    yield make
    for rec in made:
        rec.stop()


def received_lines(rec):
    """Complete lines each connection of rec delivered, per connection."""
    return [stream.decode().split("\n")[:-1] for stream in rec.streams()]


def seqs(lines, source_id):
    found = []
    for line in lines:
        match = LINE.match(line)
        assert match and match["id"] == source_id, "bad line %r" % line
        found.append(int(match["seq"]))
    return found


def start_destination(fake):
    """A fake destination on a kernel-chosen port, and that port."""
    dest = fake("destination", "--port", "0")
    port = int(dest.wait_for(r"^listening on 127\.0\.0\.1:(\d+)$")[0][1])
    return dest, port


def test_source_sends_tagged_lines_with_increasing_sequence(fake, recorders):
    """When connected, the source sends "<id> #<seq> <letters>" lines, seq counting up from 1."""
    rec = recorders()
    source = fake("source", "--port", str(rec.port), "--interval", "0.05", "--id", "src-t")
    wait_until(lambda: sum(map(len, received_lines(rec))) >= 5, message=lambda: source.out())
    [lines] = received_lines(rec)
    assert seqs(lines, "src-t") == list(range(1, len(lines) + 1))
    sent = source.wait_for(r"^sent: (.*)$", count=len(lines))
    assert [m[1] for m in sent[:len(lines)]] == lines


def test_source_default_id_is_pid(fake, recorders):
    """Without --id, lines are tagged src-<pid>."""
    rec = recorders()
    source = fake("source", "--port", str(rec.port), "--interval", "0.05")
    wait_until(lambda: any(received_lines(rec)), message=lambda: source.out())
    assert seqs(received_lines(rec)[0][:1], "src-%d" % source.proc.pid) == [1]


def test_source_waits_then_reconnects_and_continues_sequence(fake, recorders):
    """When nothing listens the source waits; when the destination restarts it reconnects, seq continuing."""
    port = free_port()
    source = fake("source", "--port", str(port), "--interval", "0.05", "--id", "src-r")
    source.wait_for(r"^waiting for 127\.0\.0\.1:%d .*retrying" % port)
    assert "sent:" not in source.out()
    first = recorders(port=port)
    wait_until(lambda: sum(map(len, received_lines(first))) >= 3, message=lambda: source.out())
    first.stop()
    source.wait_for(r"^connection lost: .*; reconnecting$")
    second = recorders(port=port)
    wait_until(lambda: sum(map(len, received_lines(second))) >= 3, message=lambda: source.out())
    before = [seq for lines in received_lines(first) for seq in seqs(lines, "src-r")]
    after = [seq for lines in received_lines(second) for seq in seqs(lines, "src-r")]
    assert before == sorted(before) and after == sorted(after)
    assert before[0] == 1 and after[0] > before[-1]
    assert source.out().count("waiting for") <= 2  # one line per outage, not one per attempt


def test_destination_prints_lines_of_many_peers(fake):
    """When several peers are connected at once, each line is printed once, prefixed by its peer."""
    dest, port = start_destination(fake)
    peers = [socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) for _ in range(4)]
    try:
        names = ["127.0.0.1:%d" % peer.getsockname()[1] for peer in peers]
        for name in names:
            dest.wait_for(r"^connected: %s$" % re.escape(name))
        for round_no in range(2):
            for index, peer in enumerate(peers):
                peer.sendall(b"line %d from peer %d\n" % (round_no, index))
        for index, name in enumerate(names):
            for round_no in range(2):
                dest.wait_for(r"^%s: line %d from peer %d$" % (re.escape(name), round_no, index))
    finally:
        for peer in peers:
            peer.close()
    for name in names:
        dest.wait_for(r"^disconnected: %s \(closed by peer\)$" % re.escape(name))
    assert len(re.findall(r"^127\.0\.0\.1:\d+: line", dest.out(), re.M)) == 8


def test_destination_prints_a_fake_source(fake):
    """When a fake source sends to a fake destination, its lines appear there behind its peer address."""
    dest, port = start_destination(fake)
    fake("source", "--port", str(port), "--interval", "0.05", "--id", "src-d")
    matches = dest.wait_for(r"^127\.0\.0\.1:\d+: (src-d #\d+ [a-z]+)$", count=3)
    assert [int(m[1].split("#")[1].split()[0]) for m in matches[:3]] == [1, 2, 3]


def test_destination_survives_partial_line_and_reset(fake):
    """When a peer sends half a line then resets, the tail is printed as partial and the others keep working."""
    dest, port = start_destination(fake)
    steady = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
    rude = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
    try:
        steady_name = "127.0.0.1:%d" % steady.getsockname()[1]
        rude_name = "127.0.0.1:%d" % rude.getsockname()[1]
        steady.sendall(b"first half ")
        rude.sendall(b"complete\nhalf a li")
        dest.wait_for(r"^%s: complete$" % re.escape(rude_name))
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # linger 0: the close sends RST
        dest.wait_for(r"^%s: half a li \[partial\]$" % re.escape(rude_name))
        dest.wait_for(r"^disconnected: %s \(reset by peer\)$" % re.escape(rude_name))
        steady.sendall(b"second half\n")
        dest.wait_for(r"^%s: first half second half$" % re.escape(steady_name))
        with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as late:
            late.sendall(b"still serving\n")
            dest.wait_for(r"^127\.0\.0\.1:%d: still serving$" % late.getsockname()[1])
    finally:
        steady.close()
        rude.close()
    assert dest.proc.poll() is None and "Traceback" not in dest.err()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("state", ["source-sending", "source-waiting", "destination"])
def test_fakes_exit_0_promptly_on_signal(fake, recorders, state, signum):
    """When sent SIGTERM or SIGINT, either fake exits 0 within 1 s, without a traceback."""
    if state == "destination":
        proc_fake, _ = start_destination(fake)
    elif state == "source-sending":
        proc_fake = fake("source", "--port", str(recorders().port), "--interval", "0.2")
        proc_fake.wait_for(r"^sent: ")
    else:
        proc_fake = fake("source", "--port", str(free_port()), "--interval", "0.2")
        proc_fake.wait_for(r"^waiting for ")
    started = time.monotonic()
    proc_fake.proc.send_signal(signum)
    assert proc_fake.proc.wait(scaled(10)) == 0, proc_fake.err()
    assert time.monotonic() - started < scaled(1.0)
    assert "stopped (%s)" % signum.name in proc_fake.out()
    assert "Traceback" not in proc_fake.err()


@pytest.mark.parametrize("name, argv, named", [
    ("source", [], "--port"),
    ("source", ["--port"], "--port"),
    ("source", ["--port", "abc"], "'abc'"),
    ("source", ["--port", "1", "--host", "a..b"], "'a..b'"),
    ("destination", ["--port", "0", "--host", "a..b"], "'a..b'"),
    ("source", ["--port", "0"], "'0'"),
    ("source", ["--port", "70000"], "'70000'"),
    ("source", ["--port", "1", "--interval", "0"], "'0'"),
    ("source", ["--port", "1", "--interval=-1"], "'-1'"),
    ("source", ["--port", "1", "--interval", "soon"], "'soon'"),
    ("source", ["--port", "1", "--id", "two words"], "'two words'"),
    ("source", ["--port", "1", "--bogus"], "'--bogus'"),
    ("source", ["--port", "1", "extra"], "unexpected"),
    ("destination", [], "--port"),
    ("destination", ["--port", "-1"], "'-1'"),
    ("destination", ["--port", "http"], "'http'"),
    ("destination", ["--port", "65536"], "'65536'"),
    ("destination", ["--port", "1", "-x"], "'-x'"),
    ("destination", ["--port", "1", "--port", "2"], "repeated"),
])
def test_bad_arguments_exit_2_with_one_line(name, argv, named):
    """When the command line is bad, the fake exits 2 with one stderr line naming the problem, no traceback."""
    done = subprocess.run([sys.executable, "-m", "fakes." + name, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=scaled(30))
    assert done.returncode == 2, done
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["source", "destination"])
def test_help_exits_0_with_usage(name):
    done = subprocess.run([sys.executable, "-m", "fakes." + name, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=scaled(30))
    assert done.returncode == 0 and "Usage:" in done.stdout and "--port PORT" in done.stdout


def test_destination_port_in_use_exits_1(tmp_path):
    """When the port is taken, the destination says so in one line and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "fakes.destination", "--port", str(taken.getsockname()[1])],
                              cwd=ROOT, capture_output=True, text=True, timeout=scaled(30))
    assert done.returncode == 1, done
    assert len(done.stderr.splitlines()) == 1 and "in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
