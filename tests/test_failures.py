"""Destinations failing: down, killed, slow, stuck, unresolvable; the others are never hurt."""
import os
import re
import socket
import threading
import time

import pytest

from support import (by_role, connect_source, free_port, scaled, send_in_thread, stays_true,
                     wait_for_log, wait_until)

RETRY = 1.0


class Trickle:
    """A source that sends numbered lines continuously from a thread, so gaps can be found."""

    def __init__(self, port, interval=0.005):
        self.sock = connect_source(port)
        self.interval = interval
        self.sent = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                self.sock.sendall(b"%08d\n" % self.sent)
            except OSError:
                return
            self.sent += 1
            time.sleep(self.interval)

    def stop(self):
        self.stopping = True
        self.thread.join(10)
        self.sock.close()


def numbers(stream):
    return [int(line) for line in stream.split(b"\n") if len(line) == 8]


def assert_no_gap(stream):
    nums = numbers(stream)
    assert nums == list(range(nums[0], nums[0] + len(nums))), "gap or reorder"


def test_destination_down_at_start_then_started(proxy, recorder):
    """A destination down at start gets data within retry-interval + 1 s of starting; the other gets all."""
    up = recorder()
    late_port = free_port()
    px = proxy(["127.0.0.1:%d" % up.port, "127.0.0.1:%d" % late_port], "--retry-interval", str(RETRY),
               "--buffer", "0")  # nothing kept while down: what it missed is dropped and counted
    source = Trickle(px.port)
    try:
        wait_for_log(px.log_path, r"cannot connect to 127.0.0.1:%d: connection refused" % late_port)
        wait_until(lambda: up.total() > 1000)
        late = recorder(port=late_port)
        started = time.monotonic()
        wait_until(lambda: late.total() > 0, 10)
        assert time.monotonic() - started <= scaled(RETRY + 1.0)
        sent_before = source.sent
        wait_until(lambda: numbers(late.streams()[0])[-1:] and numbers(late.streams()[0])[-1] > sent_before)
    finally:
        source.stop()
    wait_until(lambda: up.closed_count() == 1)
    assert numbers(up.streams()[0]) == list(range(source.sent))
    assert_no_gap(late.streams()[0])
    wait_for_log(px.log_path, r"connected to 127.0.0.1:%d after \d+ attempts; dropped \d+ bytes" % late_port)


def test_destination_killed_mid_stream_and_restarted(proxy, recorder):
    """A destination that goes away mid-stream comes back within retry + 1 s; the other sees no gap."""
    steady = recorder()
    flaky = recorder()
    flaky_port = flaky.port
    px = proxy(["127.0.0.1:%d" % steady.port, "127.0.0.1:%d" % flaky_port], "--retry-interval", str(RETRY),
               "--buffer", "0")  # nothing kept while down: what it missed is dropped and counted
    source = Trickle(px.port)
    try:
        wait_until(lambda: flaky.total() > 2000)
        flaky.stop()  # closes its connection and its listener: down
        wait_for_log(px.log_path, r"disconnected from 127.0.0.1:%d: closed by destination" % flaky_port)
        wait_until(lambda: "cannot connect" in px.log() or "dropped" in px.log())
        count_at_restart = source.sent
        back = recorder(port=flaky_port)
        restarted = time.monotonic()
        wait_until(lambda: back.total() > 0, 10)
        assert time.monotonic() - restarted <= scaled(RETRY + 1.0)
        wait_until(lambda: numbers(back.streams()[0]) and numbers(back.streams()[0])[-1] > count_at_restart + 10)
    finally:
        source.stop()
    wait_until(lambda: steady.closed_count() == 1)
    assert numbers(steady.streams()[0]) == list(range(source.sent))
    assert_no_gap(back.streams()[0])
    dropped = wait_for_log(px.log_path, r"dropped (\d+) bytes while down")
    assert int(dropped[0].group(1)) > 0


@pytest.mark.parametrize("slow_first", [True, False], ids=["slow-first", "slow-last"])
def test_slow_destination_loses_nothing(proxy, recorder, slow_first):
    """A destination reading 100 KB/s slows the source down but nothing is lost for any of them."""
    fast = recorder()
    slow = recorder(read_rate=100_000)
    third = recorder()
    order = [slow, fast, third] if slow_first else [fast, third, slow]
    px = proxy(["127.0.0.1:%d" % d.port for d in order], "--send-timeout", "2")
    payload = os.urandom(600_000)
    source = connect_source(px.port)
    send_in_thread(source, payload)
    for dest in order:
        wait_until(lambda: dest.closed_count() == 1, 60, message=lambda: "%d bytes" % dest.total())
        assert dest.streams() == [payload]
    assert "dropped" not in re.sub(r"dropped 0 bytes", "", px.log())


def test_stuck_destination_does_not_stop_the_other(proxy, recorder):
    """A destination that stops reading is cut after --send-timeout; the other keeps receiving."""
    healthy = recorder()
    stuck = recorder()
    px = proxy(["127.0.0.1:%d" % healthy.port, "127.0.0.1:%d" % stuck.port], "--send-timeout", "1",
               "--retry-interval", "1")
    source = connect_source(px.port)
    wait_until(lambda: healthy.open_count() == 1 and stuck.open_count() == 1)
    stuck.paused.set()  # stops reading and accepting
    chunk = os.urandom(1 << 20)
    sender = send_in_thread(source, chunk * 40, close=False)
    wait_for_log(px.log_path, r"disconnected from 127.0.0.1:%d: no progress for 1.0 s" % stuck.port, 30)
    wait_until(lambda: healthy.total() >= 40 * len(chunk), 60, message=lambda: "%d bytes" % healthy.total())
    sender.join(30)
    source.close()
    wait_until(lambda: healthy.closed_count() == 1, 30)
    assert healthy.streams()[0] == chunk * 40


def test_unresolvable_destination_is_retried_not_fatal(proxy, recorder):
    """A destination name that does not resolve is logged and retried; the others are served."""
    good = recorder()
    px = proxy(["127.0.0.1:%d" % good.port, "no-such-host.invalid:9"], "--retry-interval", "0.5")
    source = connect_source(px.port)
    source.sendall(b"a" * 100)
    wait_for_log(px.log_path, r"cannot connect to no-such-host.invalid:9: name not resolved")
    source.sendall(b"b" * 100)
    wait_until(lambda: good.total() == 200)
    assert stays_true(lambda: len(by_role(px.pid, "forwarder")) == 2, 1.5)
    source.close()
    wait_until(lambda: good.closed_count() == 1)


def test_backoff_doubles_to_retry_interval_and_restarts_after_a_stable_connection(proxy, recorder):
    """Reconnect delays go 0.1, 0.2, 0.4 ... capped at --retry-interval; a connection that stayed up
    that long starts the schedule again from 0.1 s."""
    port = free_port()
    px = proxy(["127.0.0.1:%d" % port], "--retry-interval", "0.8", "--log-level", "debug")
    source = connect_source(px.port)
    delays = wait_for_log(px.log_path, r"cannot connect to 127.0.0.1:%d: .*reconnecting in ([\d.]+) s" % port,
                          count=6)
    assert [float(m.group(1)) for m in delays[:6]] == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    dest = recorder(port=port)
    wait_until(lambda: dest.open_count() == 1)
    source.sendall(b"x")
    wait_until(lambda: dest.total() == 1)
    time.sleep(1.0)  # let the connection stay up longer than --retry-interval
    dest.stop()
    again = wait_for_log(px.log_path, r"disconnected from 127.0.0.1:%d: .*reconnecting in ([\d.]+) s" % port)
    assert float(again[0].group(1)) == 0.1
    source.close()


@pytest.mark.parametrize("size", [300_000, 8 << 20], ids=["tail-in-socket", "stall-mid-stream"])
def test_destination_stalled_when_the_source_finishes_counts_the_tail(proxy, recorder, size):
    """When the source ends while a destination takes nothing, the forwarder waits --send-timeout,
    then logs the undelivered tail as dropped; sent + dropped adds up to what the source sent."""
    dest = recorder(rcvbuf=8192)
    px = proxy(["127.0.0.1:%d" % dest.port], "--send-timeout", "1")
    source = connect_source(px.port)
    wait_until(lambda: dest.open_count() == 1)
    dest.paused.set()
    payload = os.urandom(size)  # 300 kB fits in the forwarder's socket buffer; 8 MB does not
    send_in_thread(source, payload)
    done = wait_for_log(px.log_path, r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes", 60)
    sent, dropped = int(done[0].group(1)), int(done[0].group(2))
    assert dropped > 0 and sent + dropped == len(payload)
    wait_for_log(px.log_path, r"took no data for 1.0 s after the source finished; \d+ unsent bytes dropped"
                 if size == 300_000 else r"disconnected from .*no progress for 1.0 s")
    dest.paused.clear()
    wait_until(lambda: dest.closed_count() == 1, 30)
    assert dest.streams()[0] == payload[:sent]


def numbered_lines(size):
    """About size bytes of numbered lines whose lengths vary, so a cut ends anywhere in a record."""
    lines, total = [], 0
    while total < size:
        lines.append(b"%d:%s\n" % (len(lines), b"x" * (len(lines) % 13)))
        total += len(lines[-1])
    return b"".join(lines)


@pytest.mark.parametrize("size, empty, stall", [
    (300_000, False, "took no data for 1.0 s after the source finished"),
    (300_000, True, "took no data for 1.0 s after the source finished"),  # each byte a record: exact to the byte
    (2_000_000, False, "no progress for 1.0 s"),
], ids=["tail-in-socket", "tail-in-socket-empty-lines", "stall-mid-stream"])
def test_records_dropped_at_a_stalled_close_are_those_of_the_tail(proxy, size, empty, stall):
    """--framing line, a destination that accepts and never reads, a source that sends its lines and
    closes: the dropped bytes are the stream's tail, and the dropped records are its newlines."""
    payload = b"\n" * size if empty else numbered_lines(size)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted connection
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(scaled(30))
    px = proxy(["127.0.0.1:%d" % listener.getsockname()[1]], "--framing", "line", "--send-timeout", "1")
    source = connect_source(px.port)
    conn, _ = listener.accept()
    try:
        send_in_thread(source, payload)
        done = wait_for_log(px.log_path, r"forwarder done: sent (\d+) bytes, dropped (\d+) bytes \((\d+) records\)",
                            60)
        sent, dropped, records = (int(n) for n in done[0].groups())
        assert dropped > 0 and sent + dropped == len(payload), px.log()
        newlines = payload[-dropped:].count(b"\n")
        assert records == newlines, "%d records logged, %d newlines in the last %d bytes" % (records, newlines, dropped)
        assert stall in px.log(), px.log()
    finally:
        conn.close()
        listener.close()
