"""tee(2), which the standard library lacks (os.splice exists since Python 3.10)."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_tee = _libc.tee
_tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_tee.restype = ctypes.c_ssize_t


def tee(fd_in, fd_out, count, flags=0):
    """Duplicate up to count bytes from pipe fd_in into pipe fd_out without consuming them."""
    moved = _tee(fd_in, fd_out, count, flags)
    if moved < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return moved
