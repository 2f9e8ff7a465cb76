"""The backlog kept while a destination is down: newest bytes, whole records, exact drop counts."""
import random

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
