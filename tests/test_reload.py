"""Reload on SIGHUP with --config: new sources get the new configuration, live groups join the
destinations added and leave those removed, a bad file changes nothing, counters go on."""
import os
import re
import signal
import socket
import threading
import time

from support import connect_source, free_port, scaled, scrape, wait_for_log, wait_until


def write(path, port, dests, extra=""):
    path.write_text("listen_port = %d\n%sdestinations = [%s]\n" % (
        port, extra, ", ".join('"127.0.0.1:%d"' % d.port for d in dests)))


class Lines(threading.Thread):
    """A source writing numbered lines, a few a millisecond, until stopped."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = connect_source(port)
        self.sent = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.sock.sendall(b"line %07d\n" % self.sent)
            self.sent += 1
            if self.sent % 10 == 0:
                time.sleep(0.002)  # pacing of the source only

    def wait_sent(self, more):
        target = self.sent + more
        wait_until(lambda: self.sent >= target, 30)

    def finish(self):
        self.stop.set()
        self.join(scaled(10))
        self.sock.close()


def numbers(stream):
    lines = stream.splitlines()
    assert all(re.fullmatch(rb"line \d{7}", line) for line in lines), [l for l in lines if not re.fullmatch(rb"line \d{7}", l)][:3]
    return [int(line[5:]) for line in lines]


def test_a_live_group_joins_an_added_destination_and_leaves_a_removed_one(proxy, recorder, tmp_path):
    """--framing line; a source streams numbered lines while the file adds B, then removes A. The
    group goes on (same receiver, the source's connection never ends); A gets lines 0..k, whole and in
    order, and ends with its last line acknowledged (no drop); B gets a contiguous run from the line
    after its join to the very last line; a new source after the reloads goes to B only."""
    a, b = recorder(), recorder()
    port = free_port()
    path = tmp_path / "proxy.toml"
    write(path, port, [a], 'framing = "line"\n')
    px = proxy([], "--config", str(path), listen_port=port)
    source = Lines(px.port)
    source.start()
    try:
        source.wait_sent(2000)
        write(path, port, [a, b], 'framing = "line"\n')
        os.kill(px.pid, signal.SIGHUP)
        wait_for_log(px.log_path, r"reloaded the configuration: destinations added: 127\.0\.0\.1:%d$" % b.port)
        wait_for_log(px.log_path, r"destination 127\.0\.0\.1:%d added by a reload: forwarder \d+ joins the stream "
                     r"from the next whole line" % b.port)
        wait_until(lambda: b.total() > 0, 20, message=lambda: px.log()[-2000:])
        source.wait_sent(2000)
        write(path, port, [b], 'framing = "line"\n')
        os.kill(px.pid, signal.SIGHUP)
        wait_for_log(px.log_path, r"destination 127\.0\.0\.1:%d removed by a reload" % a.port)
        wait_until(lambda: a.closed_count() == 1, 20, message=lambda: px.log()[-2000:])
        source.wait_sent(2000)
        assert not source.stop.is_set() and "group ended" not in px.log()
    finally:
        source.finish()
    wait_for_log(px.log_path, r"group ended: source closed")
    last = source.sent - 1
    got_a = numbers(b"".join(a.streams()))
    assert got_a == list(range(len(got_a))) and len(got_a) >= 4000, (got_a[:3], got_a[-3:])
    got_b = numbers(b"".join(b.streams()))
    assert got_b == list(range(got_b[0], last + 1)), (got_b[:3], got_b[-3:], last)
    assert 2000 <= got_b[0] <= got_a[-1] + 1
    assert re.search(r"dst=127\.0\.0\.1:%d forwarder done: sent %d bytes, dropped 0 bytes" % (a.port, 13 * len(got_a)),
                     px.log())
    with connect_source(px.port) as second:
        second.sendall(b"next source\n")
        wait_until(lambda: b.streams()[-1:] == [b"next source\n"], 20)
    assert a.streams()[-1] != b"next source\n" and len(a.streams()) == 1


def test_a_bad_file_changes_nothing(proxy, recorder, tmp_path):
    a, b = recorder(), recorder()
    port = free_port()
    path = tmp_path / "proxy.toml"
    write(path, port, [a])
    px = proxy([], "--config", str(path), listen_port=port)
    path.write_text('listen_port = %d\nbuffer = "lots"\ndestinations = ["127.0.0.1:%d"]\n' % (port, b.port))
    os.kill(px.pid, signal.SIGHUP)
    wait_for_log(px.log_path, r"ERROR .*reload failed: .*proxy\.toml: buffer 'lots': expected a size such as 4M, "
                 r"512K or 0; kept the running configuration")
    with connect_source(px.port) as sock:
        sock.sendall(b"still a\n")
        wait_until(lambda: a.streams() == [b"still a\n"], 20)
    assert b.streams() == []


def test_what_a_reload_cannot_change_is_said_and_kept(proxy, recorder, tmp_path):
    a = recorder()
    port = free_port()
    path = tmp_path / "proxy.toml"
    write(path, port, [a])
    px = proxy([], "--config", str(path), listen_port=port)
    other = free_port()
    path.write_text('listen_port = %d\nsend_timeout = 2\ndestinations = ["127.0.0.1:%d"]\n' % (other, a.port))
    os.kill(px.pid, signal.SIGHUP)
    wait_for_log(px.log_path, r"reloaded the configuration: send_timeout 5\.0 -> 2\.0")
    assert "listen_port" not in px.log()  # the command line's --listen-port wins over the file anyway
    with connect_source(px.port) as sock:
        sock.sendall(b"x\n")
        wait_until(lambda: a.total() == 2, 20)


def test_counters_go_on_across_reloads(proxy, recorder, tmp_path):
    """The metrics process starts again with the new list; a destination's counters never go down,
    one removed and added again takes its old series back."""
    a, b = recorder(), recorder()
    port, metrics_port = free_port(), free_port()
    path = tmp_path / "proxy.toml"
    extra = 'metrics = "127.0.0.1:%d"\n' % metrics_port
    write(path, port, [a, b], extra)
    px = proxy([], "--config", str(path), listen_port=port)
    wait_until(lambda: "serving metrics" in px.log())
    with connect_source(px.port) as sock:
        sock.sendall(b"x" * 1000)
        wait_until(lambda: a.total() == b.total() == 1000)
    sent = ("socketproxy_destination_sent_bytes_total", (("destination", "127.0.0.1:%d" % a.port),))
    wait_until(lambda: scrape(metrics_port).get(sent) == 1000, 20)
    for dests in ([b], [a, b]):
        write(path, port, dests, extra)
        os.kill(px.pid, signal.SIGHUP)
        wait_for_log(px.log_path, r"reloaded the configuration", count=len(dests))
        wait_until(lambda: (scrape(metrics_port).get(sent) is None) == (a not in dests), 20)
    assert scrape(metrics_port).get(sent) == 1000
    with connect_source(px.port) as sock:
        sock.sendall(b"y" * 500)
        wait_until(lambda: scrape(metrics_port).get(sent) == 1500, 20)
    # A destination a reload adds gets a column of its own: its finished groups are counted in it,
    # source after source (the next source takes the same slot of the table).
    c = recorder()
    write(path, port, [a, b, c], extra)
    os.kill(px.pid, signal.SIGHUP)
    wait_for_log(px.log_path, r"reloaded the configuration", count=3)
    sent_c = ("socketproxy_destination_sent_bytes_total", (("destination", "127.0.0.1:%d" % c.port),))
    for size, total in ((300, 300), (200, 500)):
        with connect_source(px.port) as sock:
            sock.sendall(b"z" * size)
            wait_until(lambda: c.total() == total)
        wait_until(lambda: scrape(metrics_port).get(("socketproxy_sources_active", ())) == 0, 20)
    wait_until(lambda: scrape(metrics_port).get(sent_c) == 500, 20)


def test_the_service_manager_hears_reloading_then_ready(proxy, recorder, tmp_path):
    a = recorder()
    port = free_port()
    path = tmp_path / "proxy.toml"
    write(path, port, [a])
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(scaled(10))
    px = proxy([], "--config", str(path), listen_port=port, env={"NOTIFY_SOCKET": notify_path})
    assert listener.recv(4096).startswith(b"READY=1")
    os.kill(px.pid, signal.SIGHUP)
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", listener.recv(4096))
    assert listener.recv(4096).startswith(b"READY=1")
    listener.close()


def test_without_config_sighup_changes_nothing(proxy, recorder):
    a = recorder()
    px = proxy(["127.0.0.1:%d" % a.port])
    os.kill(px.pid, signal.SIGHUP)
    wait_for_log(px.log_path, r"SIGHUP ignored: no --config file to read again")


def test_five_reloads_and_three_upgrades_under_a_stream_lose_and_repeat_no_line(proxy, recorder, tmp_path):
    """A line source streams while the file adds B, removes B, adds B again, is broken, then adds C, with
    an upgrade in place after the second, third and fifth reload. A (named throughout) gets every line
    once, in order; B gets one contiguous run (its join to its removal: added again, it is left out of
    this group, whose counters for it are kept); C gets a contiguous run from its join to the last line."""
    a, b, c = recorder(), recorder(), recorder()
    port = free_port()
    path = tmp_path / "proxy.toml"
    line = 'framing = "line"\n'
    write(path, port, [a], line)
    px = proxy([], "--config", str(path), listen_port=port)
    source = Lines(px.port)
    source.start()
    upgrades = 0
    try:
        steps = [([a, b], None), ([a], "upgrade"), ([a, b], "upgrade"), ("bad", None), ([a, b, c], "upgrade")]
        for number, (dests, then) in enumerate(steps, 1):
            source.wait_sent(1500)
            if dests == "bad":
                path.write_text('listen_port = %d\nbuffer = "lots"\ndestinations = ["127.0.0.1:%d"]\n' % (port, a.port))
            else:
                write(path, port, dests, line)
            os.kill(px.pid, signal.SIGHUP)
            wait_for_log(px.log_path, r"reloaded the configuration|reload failed", count=number)
            if then == "upgrade":
                upgrades += 1
                os.kill(px.pid, signal.SIGUSR2)
                wait_for_log(px.log_path, r"upgraded in place to", count=upgrades, timeout=30)
        wait_until(lambda: c.total() > 0, 20, message=lambda: px.log()[-3000:])
        source.wait_sent(1500)
    finally:
        source.finish()
    wait_for_log(px.log_path, r"group ended: source closed", timeout=30)
    last = source.sent - 1
    assert numbers(b"".join(a.streams())) == list(range(last + 1))
    got_b = numbers(b"".join(b.streams()))
    assert got_b and got_b == list(range(got_b[0], got_b[0] + len(got_b))) and got_b[-1] < last, (got_b[:2], got_b[-2:])
    assert len(b.streams()) == 1
    got_c = numbers(b"".join(c.streams()))
    assert got_c and got_c == list(range(got_c[0], last + 1)), (got_c[:2], got_c[-2:], last)
    assert re.search(r"destination 127\.0\.0\.1:%d added by a reload: it was left by this source's group" % b.port,
                     px.log())
    assert "Traceback" not in px.log() and px.proc.poll() is None
