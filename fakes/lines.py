"""The fake source's line format, shared by the source (makes lines), the destination (checks them) and the demo.

A line is "<id> #<seq> <letters> <crc>\\n": the source's id (printable, no spaces), a sequence number counting
up from 1 per source (it keeps counting across reconnects), 8-20 random lowercase letters, and the crc32 of
everything before the last space as 8 lowercase hex digits. The crc makes a torn record visible: the tail of a
line cut anywhere, even inside the id ("c-a #17 ..."), fails it.
"""
import random
import re
import string
import zlib

RECORD = re.compile(r"(?P<id>\S+) #(?P<seq>[1-9]\d*) (?P<letters>[a-z]{8,20}) (?P<crc>[0-9a-f]{8})")


def crc(text):
    return "%08x" % zlib.crc32(text.encode())


def make_line(source_id, seq):
    """One record with a newline: "<id> #<seq> <8-20 random letters> <crc32>"."""
    letters = "".join(random.choices(string.ascii_lowercase, k=random.randint(8, 20)))
    body = "%s #%d %s" % (source_id, seq, letters)
    return "%s %s\n" % (body, crc(body))


def parse_line(text):
    """(id, seq) of a complete record without its newline, or None when it is not one (torn, altered, other)."""
    match = RECORD.fullmatch(text)
    if not match or crc(text[:match.start("crc") - 1]) != match["crc"]:
        return None
    return match["id"], int(match["seq"])
