"""accounting.Counts: every byte sent once or dropped, resent bytes apart, nothing ever goes down."""
from socketproxy_core.accounting import Counts


def test_a_connection_that_ends_with_bytes_unacknowledged_drops_only_those():
    counts = Counts()
    counts.start_connection()
    counts.handed(1000)
    lost = counts.settle(300)
    counts.drop(lost)
    assert (counts.sent, counts.dropped, counts.resent) == (700, 300, 0)


def test_resent_bytes_acknowledged_before_count_as_resent_not_sent():
    """The backlog's first 100 bytes were delivered on the last connection: resent, they are not sent
    again; bytes after them are."""
    counts = Counts()
    counts.acked_front = 100
    counts.start_connection()
    counts.handed(150)
    assert counts.settle(0) == 0
    assert (counts.sent, counts.resent) == (50, 100)


def test_a_resend_cut_short_loses_only_what_was_never_delivered():
    counts = Counts()
    counts.acked_front = 100
    counts.start_connection()
    counts.handed(150)
    lost = counts.settle(80)  # 70 acknowledged: all of them delivered before
    assert lost == 50 and counts.sent == 0 and counts.resent == 70


def test_dropping_delivered_bytes_from_the_backlog_is_not_a_drop():
    counts = Counts()
    counts.acked_front = 40
    counts.drop_kept(100)
    assert (counts.dropped, counts.acked_front) == (60, 0)


def test_sent_and_dropped_never_go_down_through_connections():
    counts = Counts()
    seen = []
    for handed, unacknowledged, front in ((500, 200, 0), (400, 400, 50), (300, 0, 120), (100, 10, 0)):
        counts.acked_front = front
        counts.start_connection()
        counts.handed(handed)
        counts.drop(counts.settle(unacknowledged))
        seen.append((counts.sent, counts.dropped, counts.resent))
    for before, after in zip(seen, seen[1:]):
        assert all(a >= b for a, b in zip(after, before)), seen
