"""The poll set of a process's loop: one owner of what is watched, and no stale events.

A poll reports a batch of events; handling one of them may stop watching (or close) a descriptor
whose event comes later in the same batch. Such an event is stale: events() skips it, so a handler
never runs for a descriptor it no longer owns (a closed source, a pipe already let go).
"""
import select


class Poller:
    """select.poll with idempotent watch/unwatch, and batches that skip what was unwatched meanwhile."""

    def __init__(self):
        self.poll_set = select.poll()
        self.watched = {}  # fd -> event mask

    def watch(self, fd, events):
        """Watch fd for events (replacing what it was watched for)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if self.watched.get(fd) == events:
            return
        self.poll_set.register(fd, events)
        self.watched[fd] = events

    def unwatch(self, fd):
        """Stop watching fd (nothing happens when it was not watched)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd < 0 or self.watched.pop(fd, None) is None:
            return
        self.poll_set.unregister(fd)

    def watching(self, fd):
        return fd in self.watched

    def events(self, timeout_s):
        """The events of one poll (timeout_s None: no timeout), as (fd, event) pairs; an fd unwatched
        by the handler of an earlier event of the batch is skipped."""
        timeout_ms = None if timeout_s is None else max(timeout_s, 0.0) * 1000
        for fd, event in self.poll_set.poll(timeout_ms):
            if fd in self.watched:
                yield fd, event
