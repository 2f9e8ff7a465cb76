"""The backlog kept while a destination is down: newest bytes, whole records, exact drop counts."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from socketproxy_core.backlog import Backlog


def test_unframed_keeps_the_newest_bytes():
    backlog = Backlog(10, "none")
    backlog.add(b"0123456789")
    backlog.add(b"abcd")
    assert bytes(backlog.data) == b"456789abcd"
    assert backlog.dropped == 4 and backlog.dropped_records == 0


def test_framed_keeps_whole_records_only():
    backlog = Backlog(10, "line")
    backlog.add(b"aaa\nbbb\nccc\n")  # 12 bytes: the oldest record goes
    assert bytes(backlog.data) == b"bbb\nccc\n"
    assert (backlog.dropped, backlog.dropped_records) == (4, 1)
    backlog.add(b"dd")  # 10 bytes: fits
    assert bytes(backlog.data) == b"bbb\nccc\ndd"
    backlog.add(b"d\n")  # 12: "bbb\n" goes, the record in progress stays whole
    assert bytes(backlog.data) == b"ccc\nddd\n"


def test_a_record_longer_than_the_limit_is_dropped_whole_even_as_it_goes_on():
    backlog = Backlog(8, "line")
    backlog.add(b"ok\n" + b"x" * 10)
    assert bytes(backlog.data) == b"" and backlog.skipping
    backlog.add(b"xxxx")
    backlog.add(b"xx\nnext\n")
    assert bytes(backlog.data) == b"next\n" and not backlog.skipping
    assert backlog.dropped == 3 + 10 + 4 + 3
    assert backlog.dropped_records == 2


def test_limit_zero_keeps_nothing_and_finds_the_next_boundary():
    backlog = Backlog(0, "line")
    backlog.add(memoryview(b"a\nbc"))  # the forwarder passes views of its read buffer
    assert bytes(backlog.data) == b"" and backlog.skipping
    backlog.add(memoryview(b"x"))
    assert backlog.skip_partial_record(b"d") == b""
    assert backlog.skip_partial_record(b"e\nfresh\n") == b"fresh\n"
    assert backlog.dropped == 8 and backlog.dropped_records == 2


def test_random_cuts_keep_whole_records_and_count_exactly():
    """Whatever the chunking, the kept bytes are whole records, the newest, and kept + dropped = added."""
    rng = random.Random(7)
    stream = b"".join(b"%d:%s\n" % (i, b"r" * rng.randint(0, 40)) for i in range(2000))
    for limit in (0, 50, 333, 4096):
        backlog = Backlog(limit, "line")
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 200)
            backlog.add(stream[pos:pos + step])
            pos = min(pos + step, len(stream))
            kept = bytes(backlog.data)
            assert len(kept) <= limit
            assert len(kept) + backlog.dropped == pos
            assert stream[:pos].endswith(kept)
            if kept:
                assert pos == len(kept) or stream[:pos - len(kept)].endswith(b"\n")  # starts a record
        assert backlog.dropped_records + bytes(backlog.data).count(b"\n") == stream.count(b"\n")


def test_a_record_that_exactly_fills_the_limit_is_kept():
    """Dropping the oldest record leaves exactly limit bytes: the newest record stays, whole."""
    backlog = Backlog(10, "line")
    backlog.add(b"aaaa\n")
    backlog.add(b"bbbbbbbbb\n")  # 15 bytes: dropping "aaaa\n" leaves exactly 10
    assert bytes(backlog.data) == b"bbbbbbbbb\n"
    assert (backlog.dropped, backlog.dropped_records) == (5, 1)


def newest_fitting(stream, limit):
    """The model: the longest tail of stream that starts at a record boundary and fits in limit."""
    boundaries = [0] + [i + 1 for i, byte in enumerate(stream) if byte == 10]
    fitting = [b for b in boundaries if len(stream) - b <= limit]
    return stream[fitting[0]:] if fitting else b""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12).map(lambda body: body.replace(b"\n", b"") + b"\n"), max_size=12),
       st.integers(0, 40), st.data())
def test_backlog_holds_the_newest_whole_records_that_fit(lines, limit, data):
    """Whatever the records, limit and cuts: after each add the backlog holds the longest tail of whole
    records (and the record in progress) that fits, and the drop counters account for the rest."""
    stream = b"".join(lines)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(stream) - 1, 1))), label="cuts"))
    backlog = Backlog(limit, "line")
    pos = 0
    for end in [c for c in cuts if c < len(stream)] + [len(stream)]:
        backlog.add(stream[pos:end])
        pos = end
        kept = bytes(backlog.data)
        assert kept == newest_fitting(stream[:pos], limit)
        assert backlog.dropped == pos - len(kept)
        assert backlog.dropped_records == stream[:pos - len(kept)].count(b"\n")
    assert backlog.dropped_records + bytes(backlog.data).count(b"\n") == len(lines)
