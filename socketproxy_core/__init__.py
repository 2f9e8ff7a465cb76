"""SocketProxy's parts other than main (socketproxy.py) and the forwarder (forwarder.py).

A package, so installing SocketProxy puts no generic module name (receiver, endpoints, ...) at the
top level of site-packages.
"""
import os
import platform
import sys

__version__ = "0.2.0"


def require_linux():
    """Exit 1 with one line unless this is Linux 5.3 or later (pidfd_open; splice and tee too)."""
    if sys.platform != "linux":
        reason = "this is %s" % (platform.system() or sys.platform)
    elif not hasattr(os, "pidfd_open") or not hasattr(os, "splice"):
        reason = "this Python %s has no os.pidfd_open or os.splice" % platform.python_version()
    else:
        try:
            os.close(os.pidfd_open(os.getpid()))
            return
        except OSError as exc:
            reason = "pidfd_open fails on this kernel %s (%s)" % (platform.release(), exc.strerror)
    sys.stderr.write("socketproxy: needs Linux 5.3 or later (pidfd_open, splice, tee): %s\n" % reason)
    sys.exit(1)
