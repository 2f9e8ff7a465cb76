"""What a receiver does in a spare group (spares.py): it hands a pipe to each forwarder that waits
already, hears each say it is done with the source, and gives back what the source held, so that the
process can serve the next one.

A mixin of receiver.Receiver: the state is the receiver's.
"""
import os
import select

from socketproxy_core.proxylog import log
from socketproxy_core.zerocopy import set_pipe_size


class SpareReceiver:
    """The spare group's side of a receiver (see the module docstring)."""

    def hand_pipe(self, index, dest):
        """A spare group's forwarder (spares.py), waiting already, gets a new pipe for this source."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            size = set_pipe_size(write_fd, self.pipe_sizes.size_for_new())
            pid, pidfd, control = self.group.hand_pipe(index, read_fd, {
                "peer": self.peer, "slot": self.slot, "proxy_header": self.proxy_header.hex()})
        except OSError:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self.add_pipe(index, dest, write_fd, size, pid, pidfd)
        self.loop.watch(control, select.POLLIN, lambda _event: self.forwarder_done(pidfd, control))

    def forwarder_done(self, pidfd, control):
        """A spare group's forwarder has finished this source (its pipe ended) and waits for the next,
        as a forwarder of a group forked for its source would have exited 0."""
        self.loop.unwatch(control)
        if not self.group.said_done(control) or pidfd not in self.forwarders:
            return  # it is exiting: its pidfd says how
        pid, dest = self.forwarders.pop(pidfd)
        self.loop.unwatch(pidfd)
        if self.pipes and pid not in self.leaving:
            log.error("group ended: forwarder %d to %s finished before its pipe closed", pid, dest)
            self.kill_group()

    def release(self):
        """A spare group serves its next source in this process: what this one held is given back."""
        for fd in (self.stage_r, self.stage_w, *self.pipes):
            if fd is not None:
                os.close(fd)
        self.pipes.clear()
        if self.source.fileno() >= 0:
            self.source.close()
