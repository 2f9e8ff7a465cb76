"""The service manager's side: systemd's notify protocol, and the subreaper that collects orphans."""
import ctypes
import os
import socket

from socketproxy_core.proxylog import log

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Adopt the forwarders of a receiver that died, so they are reaped here, never left as zombies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def notify_service_manager(state):
    """Tell systemd (Type=notify) our state, when it asked by setting NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager (%s) of %s: %s", address, state, exc.strerror or exc)
