"""The fake source and destination used by the demo: line format, reconnects, many peers, resets, strict lines,
signals, bad args."""
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from fakes.lines import make_line, parse_line
from support import ROOT, Recorder, free_port, scaled, wait_until

LINE = re.compile(r"^(?P<id>\S+) #(?P<seq>\d+) [a-z]{8,20} [0-9a-f]{8}$")


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


def start_destination(fake, *args):
    """A fake destination on a kernel-chosen port, and that port."""
    dest = fake("destination", "--port", "0", *args)
    port = int(dest.wait_for(r"^listening on 127\.0\.0\.1:(\d+)$")[0][1])
    return dest, port


def test_source_sends_tagged_lines_with_increasing_sequence(fake, recorders):
    """When connected, the source sends "<id> #<seq> <letters> <crc32>" lines, seq counting up from 1."""
    rec = recorders()
    source = fake("source", "--port", str(rec.port), "--interval", "0.05", "--id", "src-t")
    wait_until(lambda: sum(map(len, received_lines(rec))) >= 5, message=lambda: source.out())
    [lines] = received_lines(rec)
    assert seqs(lines, "src-t") == list(range(1, len(lines) + 1))
    assert [parse_line(line) for line in lines] == [("src-t", n) for n in range(1, len(lines) + 1)]
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


@pytest.mark.parametrize("strict", [[], ["--strict-lines"]], ids=["plain", "strict"])
def test_destination_prints_a_fake_source(fake, strict):
    """When a fake source sends to a fake destination, its lines appear there behind its peer address."""
    dest, port = start_destination(fake, *strict)
    fake("source", "--port", str(port), "--interval", "0.05", "--id", "src-d")
    matches = dest.wait_for(r"^127\.0\.0\.1:\d+: (src-d #\d+ [a-z]+ [0-9a-f]{8})$", count=3)
    assert [parse_line(m[1]) for m in matches[:3]] == [("src-d", 1), ("src-d", 2), ("src-d", 3)]
    assert "malformed" not in dest.out()


def test_line_check_rejects_every_torn_or_altered_line():
    """When a line is cut anywhere (even inside its id) or one character changes, it is not a record any more."""
    line = make_line("src-a", 17).rstrip("\n")
    assert parse_line(line) == ("src-a", 17)
    for cut in range(1, len(line)):
        assert parse_line(line[cut:]) is None, line[cut:]
        assert parse_line(line[:cut]) is None, line[:cut]
    for index, char in enumerate(line):
        for other in {"a", "b", "1", " "} - {char}:
            altered = line[:index] + other + line[index + 1:]
            assert parse_line(altered) is None, altered
    assert parse_line(line + "\r") is None and parse_line("src-a #17 abcdefgh") is None


def peer_name(sock):
    return re.escape("127.0.0.1:%d" % sock.getsockname()[1])


def closed_by_destination(sock):
    """True once the destination has closed sock (EOF or reset)."""
    sock.settimeout(scaled(10))
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_strict_destination_closes_a_connection_whose_first_record_is_torn(fake):
    """When a connection starts inside a record, --strict-lines reports it (peer, record), closes that connection
    and counts it; good lines, before and on other connections, are printed; the others carry on."""
    dest, port = start_destination(fake, "--strict-lines")
    good = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
    torn = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
    try:
        first, second = make_line("src-g", 1), make_line("src-g", 2)
        good.sendall((first + second).encode())
        dest.wait_for(r"^%s: %s$" % (peer_name(good), re.escape(second.rstrip("\n"))))
        dest.wait_for(r"^connected: %s$" % peer_name(torn))
        cut = make_line("src-t", 7)[2:]  # "c-t #7 ...": cut inside the id, so only the crc tells
        after = make_line("src-t", 8)
        torn.sendall((cut + after).encode())
        report = dest.wait_for(r"^malformed record from %s \(the first record of the connection\): (.*); "
                               r"closing the connection \(1 malformed so far\)$" % peer_name(torn))
        assert report[0][1] == repr(cut.rstrip("\n"))
        dest.wait_for(r"^disconnected: %s \(closed: malformed record\)$" % peer_name(torn))
        assert closed_by_destination(torn)
        assert after.rstrip("\n") not in dest.out(), "a line after the malformed one was printed"
        third = make_line("src-g", 3)
        good.sendall(third.encode())
        dest.wait_for(r"^%s: %s$" % (peer_name(good), re.escape(third.rstrip("\n"))))
    finally:
        good.close()
        torn.close()
    dest.proc.send_signal(signal.SIGTERM)
    assert dest.proc.wait(scaled(10)) == 0
    assert "stopped (SIGTERM); malformed records: 1 (each closed its connection)" in dest.out()
    assert len(re.findall(r"^malformed record", dest.out(), re.M)) == 1
    assert "Traceback" not in dest.err()


def test_strict_destination_reports_a_later_malformed_record_truncated(fake):
    """When a later record is malformed (here 300 bytes of junk), the report names its place in the connection
    and shows only its first 60 characters and its length; each malformed record is counted."""
    dest, port = start_destination(fake, "--strict-lines")
    for count in (1, 2):
        with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as peer:
            line = make_line("src-j", 1)
            peer.sendall((line + "x" * 300 + "\n").encode())
            dest.wait_for(r"^%s: %s$" % (peer_name(peer), re.escape(line.rstrip("\n"))))
            dest.wait_for(r"^malformed record from %s \(record 2 of the connection\): '%s' \.\.\. \(300 bytes\); "
                          r"closing the connection \(%d malformed so far\)$" % (peer_name(peer), "x" * 60, count))
            assert closed_by_destination(peer)


def test_strict_destination_closes_a_line_without_newline_past_the_limit(fake):
    """When 64 KiB arrive without a newline, --strict-lines reports a malformed record instead of buffering on."""
    dest, port = start_destination(fake, "--strict-lines")
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as peer:
        peer.sendall(b"y" * 70000)
        dest.wait_for(r"^malformed record from %s \(the first record of the connection; no newline in \d+ bytes\)"
                      % peer_name(peer))
        assert closed_by_destination(peer)


def test_destination_prints_what_it_had_received_when_stopped(fake):
    """When SIGTERM arrives while lines wait unread in its sockets, the destination prints them before it exits."""
    dest, port = start_destination(fake, "--strict-lines")
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as peer:
        name = peer_name(peer)
        dest.wait_for(r"^connected: %s$" % name)
        dest.proc.send_signal(signal.SIGSTOP)
        try:
            lines = [make_line("src-s", n) for n in range(1, 4)]
            peer.sendall("".join(lines).encode())
            dest.proc.send_signal(signal.SIGTERM)  # pending until SIGCONT: it lands with the lines unread
        finally:
            dest.proc.send_signal(signal.SIGCONT)
        assert dest.proc.wait(scaled(10)) == 0
    printed = re.findall(r"^%s: (.*)$" % name, dest.out(), re.M)
    assert printed == [line.rstrip("\n") for line in lines], dest.out()
    assert dest.out().rstrip().endswith("stopped (SIGTERM); malformed records: 0 (each closed its connection)")


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
    ("destination", ["--port", "1", "--strict"], "'--strict'"),
    ("source", ["--port", "1", "--strict-lines"], "'--strict-lines'"),
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
