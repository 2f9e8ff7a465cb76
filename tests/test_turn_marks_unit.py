"""mirrors.TurnMarks: where a mirror's turns begin, shared by the receiver and the mirror's forwarder."""
import os

from socketproxy_core.mirrors import TurnMarks


def test_marks_made_before_a_fork_are_taken_in_order_by_the_child():
    marks = TurnMarks()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mirror's side: waits for the parent's word, then takes
        os.close(write_fd)
        os.read(read_fd, 1)
        taken = marks.take()
        os._exit(0 if list(taken) == [0, 45, 90] and not marks.take() else 1)
    os.close(read_fd)
    for position in (0, 45, 90):
        assert marks.mark(position)
    os.write(write_fd, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not marks.take()  # taken by the child: the count is shared


def test_a_full_ring_takes_no_mark_and_wraps_around_once_taken():
    marks = TurnMarks()
    for position in range(marks.SLOTS):
        assert marks.mark(position)
    assert not marks.mark(marks.SLOTS)  # a mirror far behind: the turns it is not told of merge
    assert list(marks.take()) == list(range(marks.SLOTS))
    for position in range(marks.SLOTS, marks.SLOTS + 5):
        assert marks.mark(position)
    assert list(marks.take()) == list(range(marks.SLOTS, marks.SLOTS + 5))
