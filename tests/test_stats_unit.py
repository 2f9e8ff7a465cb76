"""The shared counters: a process killed in the middle of writing its row never hangs a reader."""
import threading

from socketproxy_core import stats


def test_a_row_left_mid_write_by_a_killed_writer_is_read_and_folded():
    table = stats.Table(2, 1)
    slot = table.allocate()
    row = table.forwarder_row(slot, 0)
    row.write(1234, 10, 0, 0, 0, 0, 0, stats.STATE_UP, 0, 0)
    stats.FIELD.pack_into(table.buf, row.offset, 3)  # its writer died between "writing" and "written"
    done = []
    reader = threading.Thread(target=lambda: done.append(table.snapshot()), daemon=True)
    reader.start()
    reader.join(5)
    assert done, "the metrics reader spun on a row its writer left mid-write"
    table.retire(slot, 1234)
    table.fold_gone(lambda pgid: False)  # main's fold, once the group is gone
    assert table.snapshot()[1][0]["sent"] == 10
    reused = table.allocate()
    assert reused == slot
    table.forwarder_row(reused, 0).write(99, 5, 0, 0, 0, 0, 0, stats.STATE_UP, 0, 0)
    assert stats.FIELD.unpack_from(table.buf, row.offset)[0] % 2 == 0  # parity back: readers see whole writes
    assert table.snapshot()[1][0]["sent"] == 15
