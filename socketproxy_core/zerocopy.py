"""Pipe tools the standard library lacks: tee(2) (os.splice exists since Python 3.10), pipe sizes
with refusals logged once, and a malloc setting."""
import ctypes
import errno
import fcntl
import mmap
import os
import select
import struct
import termios

from socketproxy_core.proxylog import log

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK  # moving pipe <-> socket without waiting
DRAIN_FLAGS = os.SPLICE_F_NONBLOCK  # moving a pipe into /dev/null
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032

_libc = ctypes.CDLL(None, use_errno=True)
_tee = _libc.tee
_tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_tee.restype = ctypes.c_ssize_t


def tee(fd_in, fd_out, count, flags=0):
    """Duplicate up to count bytes from pipe fd_in into pipe fd_out without consuming them.

    Retried when a signal interrupts it, as the standard library's calls are (PEP 475).
    """
    while True:
        moved = _tee(fd_in, fd_out, count, flags)
        if moved >= 0:
            return moved
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


M_MMAP_THRESHOLD = -3


def return_large_blocks(threshold=128 * 1024):
    """Make malloc map blocks of threshold bytes and more on their own, so freeing them gives the
    memory back. glibc otherwise raises the threshold after such a free, and a backlog that is
    resized again and again (while a destination is down) leaves its old blocks in the heap."""
    try:
        _libc.mallopt(M_MMAP_THRESHOLD, threshold)
    except AttributeError:
        pass  # not glibc


class PipeRefusal:
    """Whether a pipe size refusal was logged by any process of the tree (shared memory, one byte)."""

    flag = mmap.mmap(-1, 1)  # made in main at import, before any fork: every process shares it

    @classmethod
    def report(cls, size, got, exc):
        if cls.flag[0]:
            return
        cls.flag[0] = 1
        log.warning("the kernel refused a pipe of %d KiB (%s); this pipe has %d KiB, and others may too: this "
                    "user's pipe budget is used up (fs.pipe-user-pages-soft), so throughput suffers; raise it or "
                    "lower --max-connections", size // 1024, exc or "smaller", got // 1024)


def set_pipe_size(fd, size):
    """Give a pipe the planned size; a refusal by the kernel is logged once for the whole tree.
    Returns the size the pipe has."""
    error = None
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError as exc:
        error = exc.strerror
    got = fcntl.fcntl(fd, F_GETPIPE_SZ)
    if got < size:
        PipeRefusal.report(size, got, error)
    return got


def small_pipe():
    """A non-blocking pipe of one page, for wake-ups: the kernel's default (16 pages) would count
    against an unprivileged user's pipe budget for nothing."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, PAGE)
    except OSError:
        pass
    return read_fd, write_fd


def pipe_capacity(fd):
    """The size of a pipe (either end)."""
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def pipe_hung_up(fd):
    """Whether a pipe is at its end: its writers all gone (POLLHUP) and nothing left in it (no POLLIN,
    since bytes may have arrived, their writer gone, after the caller found the pipe empty)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(event & select.POLLHUP and not event & select.POLLIN for _, event in poller.poll(0))


def pipe_bytes(fd):
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


PIPE_SIZE_MAX = 1024 * 1024
PIPE_SIZE_MIN = 16 * 1024
PIPE_BUDGET_SHARE = 0.75  # of the user's pipe budget: the rest is left to its other programs
PAGE = os.sysconf("SC_PAGE_SIZE")
CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 21, 24


def pipe_budget():
    """Bytes of pipe buffers this user may hold (fs.pipe-user-pages-soft), None when unlimited.

    The kernel does not count the pipes of a process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN (root).
    """
    try:
        with open("/proc/self/status") as status:
            caps = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
        if caps & (1 << CAP_SYS_RESOURCE | 1 << CAP_SYS_ADMIN):
            return None
        with open("/proc/sys/fs/pipe-user-pages-soft") as soft:
            pages = int(soft.read())
    except (OSError, ValueError, StopIteration):
        return None
    return pages * PAGE if pages else None


def plan_pipe_size(max_connections, pipes_per_source, budget):
    """The size of each pipe: --max-connections sources of pipes_per_source pipes in a share of the
    budget, a power of two from PIPE_SIZE_MIN to PIPE_SIZE_MAX (where splice gains no more)."""
    if budget is None:
        return PIPE_SIZE_MAX
    fair = budget * PIPE_BUDGET_SHARE / (max_connections * pipes_per_source)
    size = PIPE_SIZE_MIN
    while size * 2 <= min(fair, PIPE_SIZE_MAX):
        size *= 2
    return size
