"""The project's only fork: a child that holds exactly the descriptors it needs and never returns."""
import gc
import os
import resource
import signal
import sys
import traceback

import setproctitle

FALLBACK_MAX_FD = 1 << 20  # when RLIMIT_NOFILE is unlimited
# Signals whose handlers or mask the child must not inherit from its parent.
RESET_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)


def fd_limit():
    """One more than the highest descriptor this process can hold (RLIMIT_NOFILE).

    os.closerange uses close_range(2), which skips what is not open; where that call is missing
    (kernels before 5.9) or denied (seccomp), CPython closes every number one by one, so the range
    must end at the limit, not at some huge constant.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (soft, hard):
        if limit != resource.RLIM_INFINITY:
            return limit
    return FALLBACK_MAX_FD


def close_fds_except(keep):
    """Close every descriptor above 2 that is not in keep."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, max(fd_limit(), low))


def fork_child(title, target, *args, keep=(), close=()):
    """Fork; the child closes `close` objects and every fd not in `keep`, sets its title, runs target.

    The parent gets the child's pid. The child runs target(*args) and leaves by os._exit with its
    return value (0 for None), 1 on an unexpected exception: it never returns into the parent's code.
    Objects of the parent that own descriptors stay referenced by the frames below us, which the child
    never unwinds, so their finalizers cannot close a reused descriptor number.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # Objects alive now go to the permanent generation: the child's collections never walk (and
    # so never copy) the pages they share with the parent.
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for obj in close:
            obj.close()
        close_fds_except(keep)
        setproctitle.setproctitle(title)
        code = target(*args) or 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def decode_exit(status):
    """A wait status as (exit code or -signal, text) for log lines."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return -sig, "killed by %s" % signal.Signals(sig).name
    code = os.waitstatus_to_exitcode(status)
    return code, "exit status %d" % code
