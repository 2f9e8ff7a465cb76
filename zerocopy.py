"""tee(2), which the standard library lacks (os.splice exists since Python 3.10), and a malloc setting."""
import ctypes
import errno
import os

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
