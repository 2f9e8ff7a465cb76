"""Record ends in a stream: lines and Redis commands, whatever the cuts; invalid RESP is named."""
import random

import pytest

from socketproxy_core.backlog import Backlog
from socketproxy_core.framing import LineScanner, NotRecords, RespScanner


def resp(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def commands(rng, count):
    """Redis commands whose values hold \\r\\n, *, $ and newlines; some inline, some empty."""
    out = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.1:
            out.append(b"PING\r\n")
        elif kind < 0.15:
            out.append(b"*0\r\n")
        else:
            value = bytes(rng.choice(b"ab\r\n*$0") for _ in range(rng.randint(0, 60)))
            out.append(resp(b"SET", b"k%d" % i, value + b"\r\nINCR injected\r\n"))
    return out


def ends_of(records):
    ends, pos = [], 0
    for record in records:
        pos += len(record)
        ends.append(pos)
    return ends


def test_resp_scanner_finds_every_command_end_whatever_the_cuts():
    rng = random.Random(3)
    records = commands(rng, 500)
    stream = b"".join(records)
    for _ in range(20):
        scan, found, pos = RespScanner(), [], 0
        while pos < len(stream):
            step = rng.randint(1, 300)
            chunk = stream[pos:pos + step]
            start = 0
            while True:  # every end, one at a time, as the backlog's searches do
                count, end = scan.scan(chunk, start, until=start)
                if end < 0:
                    break
                assert count == 1
                found.append(pos + end)
                start = end
            pos += len(chunk)
        assert found == ends_of(records)


def test_resp_scanner_counts_and_reports_the_last_end():
    records = commands(random.Random(5), 50)
    stream = b"".join(records)
    count, last = RespScanner().scan(stream, 0, len(stream) - 1)
    assert (count, last) == (49, ends_of(records)[-2])


@pytest.mark.parametrize("whole", [False, True], ids=["byte-by-byte", "whole"])
@pytest.mark.parametrize("stream, why", [
    (b"*2\r\n$3\r\nGET\r\nXYZ\r\n", "expected a bulk string length"),
    (b"*x\r\n", "not a number"),
    (b"*1\r\n$3\r\nGETX\r\n", "not followed by"),
    (b"*1\r\n$4\r\nGET\r\n", "not followed by"),  # one byte short: the next command's "*" would end it
    (b"*1\n", "not ended by"),
    (b"*1\r\n$-1\r\n", "out of range"),
    (b"x" * 70000, "a line of more than"),
], ids=["not-a-bulk-string", "not-a-number", "bulk-too-long", "bulk-one-short", "no-cr", "negative", "long-line"])
def test_resp_scanner_names_what_is_not_resp(stream, why, whole):
    """Byte by byte the state carries every check across cuts; whole (a valid command after it) the
    fast path for whole commands must reject it too."""
    stream += resp(b"PING")
    with pytest.raises(NotRecords, match=why):
        scan = RespScanner()
        if whole:
            scan.scan(stream)
        else:
            for i in range(len(stream)):
                scan.scan(stream, i, i + 1)


def test_line_scanner_matches_find():
    assert LineScanner().scan(b"ab\ncd\nef") == (2, 6)
    assert LineScanner().scan(b"ab\ncd\nef", until=4) == (2, 6)
    assert LineScanner().scan(b"abcdef") == (0, -1)


def test_resp_backlog_keeps_whole_commands_and_counts_exactly():
    rng = random.Random(11)
    records = commands(rng, 1500)
    stream = b"".join(records)
    ends = set(ends_of(records))
    for limit in (0, 60, 500, 8192):
        backlog = Backlog(limit, "resp")
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 400)
            backlog.add(stream[pos:pos + step])
            pos = min(pos + step, len(stream))
            kept = bytes(backlog.data)
            assert len(kept) <= limit and len(kept) + backlog.dropped == pos
            assert not kept or pos - len(kept) in ends | {0}  # starts at a command
        assert backlog.dropped_records + RespScanner().scan(backlog.data)[0] == len(records)
