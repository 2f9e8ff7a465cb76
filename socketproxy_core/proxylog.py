"""Logging shared by every process: one line per event to stderr with time, level, pid and connection.

Under systemd's journal (JOURNAL_STREAM is set) a line carries no time of its own, the journal adds
one, and starts with its syslog priority (<4> for a warning), so `journalctl -p warning` works.
Elsewhere it starts with an ISO 8601 time with the zone, e.g. 2026-12-02T08:51:56.123+00:00.
"""
import datetime
import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(connection)s%(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s [%(process)d] %(connection)s%(message)s"
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _ConnectionTag(logging.Filter):
    """Adds the process's connection tag (for example 'src=127.0.0.1:53422 ') to every record."""

    def __init__(self):
        super().__init__()
        self.tag = ""

    def filter(self, record):
        record.connection = self.tag
        record.priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return True


class IsoFormatter(logging.Formatter):
    """Times as ISO 8601 with milliseconds and the local zone's offset."""

    def formatTime(self, record, datefmt=None):
        return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


_tag = _ConnectionTag()
log = logging.getLogger("socketproxy")


def under_journal():
    """Whether stderr is systemd's journal stream (JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == "%d:%d" % (stat.st_dev, stat.st_ino)


def setup(level="info"):
    """Send the project's log lines to stderr at the given level (called once, in main). A line
    names no source file, thread or multiprocessing process, so the logging module does not look
    them up (the logging HOWTO's "Optimization"): that halves what a line costs, and a source logs
    five lines or more."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(JOURNAL_FORMAT) if under_journal() else IsoFormatter(FORMAT))
    handler.addFilter(_tag)
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def set_level(level):
    """A reloaded --log-level (main's, and so every process it forks from then on)."""
    log.setLevel(level.upper())


def set_connection(tag):
    """Name the connection this process serves; it prefixes every later line of this process."""
    _tag.tag = tag + " " if tag else ""
