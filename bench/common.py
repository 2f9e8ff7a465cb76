"""What bench.py, chaos.py and soak.py share: adopting orphans, collecting children, free ports."""
import ctypes
import os
import random
import socket
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Adopt the orphans of everything we start (PID 1 here never reaps them), so we can reap them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_exited():
    """Collect every exited child, ours or adopted; returns [(pid, wait status)]."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def free_port(taken=None):
    """A port free on 127.0.0.1, below the ephemeral range so outgoing connects never take it."""
    taken = set() if taken is None else taken
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for _ in range(500):
        port = random.randint(10000, min(low, 32000) - 1)
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port")


def kill_descendants(reap, timeout_s=5.0):
    """SIGKILL every process below us (all started or adopted by this run) and reap them all."""
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and psutil.Process().children():
        reap()
        time.sleep(0.02)
    reap()
