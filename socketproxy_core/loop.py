"""One loop per process: what it watches, its named timers, and the handler of each.

A poll reports a batch of events; handling one of them may stop watching (or close) a descriptor
whose event comes later in the same batch. Such an event is stale: it is skipped, so a handler never
runs for a descriptor it no longer owns (a closed source, a pipe already let go).

Handlers never block and never sleep: a wait is a descriptor watched or a timer set, and the loop
returns to its poll.
"""
import select
import time


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


class Loop:
    """A Poller whose descriptors each have a handler, and one list of named timers.

    watch(fd, events, handler): handler(event) runs for each event of fd. set_timer(name, delay,
    handler): handler() runs once, delay seconds from now (a timer of the same name is replaced).
    """

    def __init__(self):
        self.poller = Poller()
        self.handlers = {}  # fd -> handler(event)
        self.timers = {}  # name -> (deadline, handler)
        self.first = None  # the earliest deadline, None when it must be looked for again

    def watch(self, fd, events, handler):
        fd = fd if isinstance(fd, int) else fd.fileno()
        self.poller.watch(fd, events)
        self.handlers[fd] = handler

    def unwatch(self, fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        self.poller.unwatch(fd)
        self.handlers.pop(fd, None)

    def watching(self, fd):
        return self.poller.watching(fd)

    def set_timer(self, name, delay_s, handler):
        self.set_deadline(name, time.monotonic() + delay_s, handler)

    def set_deadline(self, name, deadline, handler):
        self.timers[name] = (deadline, handler)
        self.first = None

    def cancel(self, *names):
        for name in names:
            if self.timers.pop(name, None) is not None:
                self.first = None

    def has_timer(self, name):
        return name in self.timers

    def run_once(self):
        """One poll (until the next timer at most), its handlers, then the timers that are due."""
        if self.first is None and self.timers:
            self.first = min(deadline for deadline, _ in self.timers.values())
        first = self.first
        timeout_ms = None if first is None else max(first - time.monotonic(), 0.0) * 1000
        handlers = self.handlers
        for fd, event in self.poller.poll_set.poll(timeout_ms):
            handler = handlers.get(fd)  # None: unwatched by an earlier handler of this batch (stale)
            if handler is not None:
                handler(event)
        if first is None:
            return
        now = time.monotonic()
        if now < first:
            return
        self.first = None
        for name, (deadline, handler) in list(self.timers.items()):
            if deadline <= now and self.timers.get(name) == (deadline, handler):
                del self.timers[name]
                handler()
