"""tee(2), which the standard library lacks (os.splice exists since Python 3.10)."""
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
