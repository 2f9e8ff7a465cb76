"""What a new destination connection is sent before the stream resumes (sessions.py), and how Redis
replies are read: unit tests, the streams cut at every offset."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes.mirror_demo import encode
from socketproxy_core import sessions


command = encode  # a RESP array of bulk strings


def fed(stream, cuts):
    """A RespSession fed stream in pieces cut at the given offsets."""
    session = sessions.RespSession()
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        session.feed(bytearray(stream[start:cut]))
        start = cut
    return session


STREAM = (command("AUTH", "secret") + command("SET", "a", "x\r\nSELECT 9\r\n") + command("select", "5")
          + b"CLIENT SETNAME feed\r\n" + command("SET", "b", "1") + command("AUTH", "user", "newer")
          + command("READONLY") + command("SET", "c", b"*2\r\n$6\r\nSELECT\r\n$1\r\n7\r\n"))


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
@settings(max_examples=300, deadline=None)
def test_the_last_state_commands_are_kept_however_the_stream_is_cut(cuts):
    data, replies, checked, what = fed(STREAM, cuts).preamble()
    # AUTH first (the latest), then the name, the database and READONLY; nothing read inside a value
    assert data == (command("AUTH", "user", "newer") + b"CLIENT SETNAME feed\r\n" + command("select", "5")
                    + command("READONLY"))
    assert replies == checked == 4
    assert what == "AUTH, CLIENT SETNAME, SELECT 5, READONLY"
    assert b"secret" not in what.encode()  # a password never reaches the log


def test_readwrite_and_reset_undo_what_they_undo():
    session = fed(command("SELECT", "3") + command("READONLY") + command("READWRITE"), [])
    assert session.preamble()[0] == command("SELECT", "3")
    session.feed(bytearray(command("RESET")))
    assert session.preamble() == (b"", 0, 0, "")


def test_an_open_transaction_is_sent_again_whole_and_a_finished_one_is_not():
    multi = command("MULTI") + command("INCR", "n") + command("SET", "k", "v")
    session = fed(command("SELECT", "2") + multi, [3, 17])
    data, replies, checked, _ = session.preamble()
    assert data == command("SELECT", "2") + multi
    assert (replies, checked) == (4, 1)  # only SELECT's reply decides; +OK and +QUEUED come for the rest
    session.feed(bytearray(command("EXEC")))
    assert session.preamble()[0] == command("SELECT", "2")


def test_a_cut_command_is_forgotten_at_a_boundary():
    session = sessions.RespSession()
    session.feed(bytearray(command("SELECT", "4")[:9]))
    session.at_boundary()  # the cut command is resent whole on the new connection
    session.feed(bytearray(command("SELECT", "4")))
    assert session.preamble()[0] == command("SELECT", "4")


def test_first_records_keep_whole_lines_only():
    memory = sessions.FirstRecords(2, "line")
    memory.feed(bytearray(b"name,age\nbo"))
    assert memory.preamble()[0] == b"name,age\n"
    memory.at_boundary()  # "bo" is resent on the next connection
    memory.feed(bytearray(b"bob,3\ncarol,4\n"))
    assert memory.preamble()[0] == b"name,age\nbob,3\n" and not memory.hungry()
    raw = sessions.FirstRecords(5, "none")
    raw.feed(bytearray(b"LOGIN xyz"))
    assert raw.preamble()[0] == b"LOGIN"


REPLIES = [b"+OK\r\n", b"-NOAUTH Authentication required.\r\n", b":42\r\n", b"$5\r\nhe\r\nl\r\n", b"$-1\r\n",
           b"*2\r\n$1\r\na\r\n-ERR inner\r\n", b"*0\r\n", b"%1\r\n+k\r\n:1\r\n", b"_\r\n", b"!3\r\nbad\r\n",
           b"|1\r\n+ttl\r\n:3\r\n+value\r\n", b">2\r\n+message\r\n$2\r\n-x\r\n", b"*-1\r\n", b",1.5\r\n"]


@given(st.lists(st.sampled_from(REPLIES), max_size=30), st.lists(st.integers(min_value=0, max_value=400), max_size=10))
@settings(max_examples=300, deadline=None)
def test_replies_and_errors_are_counted_however_the_stream_is_cut(replies, cuts):
    stream = b"".join(replies)
    parser = sessions.RespReplies()
    parser.capture = captured = []
    start = 0
    for cut in sorted(c for c in set(cuts) if c < len(stream)) + [len(stream)]:
        parser.feed(memoryview(stream)[start:cut])
        start = cut
    assert parser.replies == len(replies)
    assert captured == replies  # each whole reply, as it came
    errors = {b"-NOAUTH Authentication required.\r\n": 1, b"*2\r\n$1\r\na\r\n-ERR inner\r\n": 1, b"!3\r\nbad\r\n": 1}
    assert parser.errors == sum(errors.get(reply, 0) for reply in replies)
    assert not parser.broken


def test_an_error_reply_says_which_reply_and_what():
    parser = sessions.RespReplies()
    assert parser.feed(b"+OK\r\n-WRONGPASS invalid username-password pair\r\n") == [
        (2, "WRONGPASS invalid username-password pair")]


def test_a_stream_that_is_not_resp_stops_the_reading():
    parser = sessions.RespReplies()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    assert parser.broken and parser.replies == 0


@pytest.mark.parametrize("seed", range(5))
def test_plain_replies_cut_anywhere_are_all_counted(seed):
    rng = random.Random(seed)
    stream = b"".join(rng.choice([b"+OK\r\n", b":12\r\n", b"+QUEUED\r\n"]) for _ in range(5000))
    parser = sessions.RespReplies()
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 20000)
        parser.feed(stream[pos:pos + step])
        pos += step
    assert parser.replies == 5000 and parser.errors == 0
