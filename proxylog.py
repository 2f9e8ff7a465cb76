"""Logging shared by every process: one line per event to stderr with time, level, pid and connection."""
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(connection)s%(message)s"


class _ConnectionTag(logging.Filter):
    """Adds the process's connection tag (for example 'src=127.0.0.1:53422 ') to every record."""

    def __init__(self):
        super().__init__()
        self.tag = ""

    def filter(self, record):
        record.connection = self.tag
        return True


_tag = _ConnectionTag()
log = logging.getLogger("socketproxy")


def setup(level="info"):
    """Send the project's log lines to stderr at the given level (called once, in main)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_tag)
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def set_connection(tag):
    """Name the connection this process serves; it prefixes every later line of this process."""
    _tag.tag = tag + " " if tag else ""
