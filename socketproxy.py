"""SocketProxy: copy every TCP source that connects to all destinations, one connection each.

Usage:
  socketproxy.py --listen-port PORT [options] [--allow CIDR]... DEST...
  socketproxy.py (-h | --help | --version)

DEST is HOST:PORT; an IPv6 address is written [ADDR]:PORT; HOST may be a name,
resolved again at every (re)connect.

Options:
  --listen-port PORT      port to listen on
  --listen-host HOST      address to bind [default: 0.0.0.0]
  --max-connections N     sources served at once; more are closed at once with a warning [default: 256]
  --idle-timeout SEC      close a source that sent nothing this long; 0 = never [default: 0]
  --connect-timeout SEC   give up one connect attempt to a destination after this [default: 3]
  --retry-interval SEC    longest wait between reconnect attempts; backoff starts at 0.1 s [default: 3]
  --send-timeout SEC      a destination that takes no data this long while data waits counts as down [default: 5]
  --allow CIDR            accept sources only from these networks; repeatable [default: all]
  --log-level LEVEL       debug, info, warning or error [default: info]
  -h --help               show this help
  --version               show the version
"""
import ctypes
import encodings.idna  # noqa: F401  getaddrinfo in forwarders needs it: import once, before fork
import errno
import os
import re
import signal
import socket
import sys
import time

import setproctitle

import docopt
import endpoints
import forking
import proxylog
import receiver
from proxylog import log

VERSION = "socketproxy 0.1.0"
BACKLOG = 1024
STOP_TERM_S = 2.0  # receivers get this long after SIGTERM (they flush for at most 1 s) ...
STOP_KILL_S = 0.8  # ... then SIGKILL to their groups and this long to be collected
ACCEPT_PAUSE_S = 0.1  # out of descriptors: pause, then accept again
PR_SET_CHILD_SUBREAPER = 36
TRANSIENT_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


class Shutdown(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the blocking accept()."""


def usage_error(message):
    """Usage and one line naming the bad value on stderr, exit 2."""
    usage = __doc__.split("\n\n")[1]
    sys.stderr.write("%s\nsocketproxy: error: %s\n" % (usage, message))
    sys.exit(2)


def known_options():
    return set(re.findall(r"(--[a-z-]+|-h)\b", __doc__.split("Options:")[1]))


def positionals(argv):
    """The arguments that are neither options nor option values."""
    flags = {"-h", "--help", "--version"}
    found, expect_value = [], False
    for arg in argv:
        if expect_value:
            expect_value = False
        elif arg.startswith("-") and len(arg) > 1:
            expect_value = "=" not in arg and arg not in flags
        else:
            found.append(arg)
    return found


def parse_args(argv):
    """A validated Config, or exit 2 with one line naming what is wrong."""
    known = known_options()
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if arg.startswith("-") and len(arg) > 1 and name not in known and not re.match(r"^-\d", arg):
            usage_error("unknown option %r" % name)
    try:
        args = docopt.docopt(__doc__, argv=argv, version=VERSION)
    except docopt.DocoptExit as exc:
        if "--listen-port" not in " ".join(argv):
            usage_error("missing --listen-port PORT")
        if not positionals(argv):
            usage_error("missing DEST (HOST:PORT)")
        detail = str(exc).splitlines()[0] if str(exc) else "invalid command line"
        usage_error(detail.replace("Warning: found unmatched (duplicate?) arguments", "unexpected arguments"))
    try:
        return endpoints.build_config(args)
    except endpoints.UsageError as exc:
        usage_error(str(exc))


def become_subreaper():
    """Adopt the forwarders of a receiver that died, so they are reaped here, never left as zombies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def bind_listener(config):
    """The listening socket, or exit 1 with one line when the address is in use or not permitted."""
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.listen_host, config.listen_port))
        listener.listen(BACKLOG)
    except OSError as exc:
        listener.close()
        log.error("cannot listen on %s port %d: %s", config.listen_host, config.listen_port, exc.strerror)
        sys.exit(1)
    return listener


def format_peer(address):
    host, port = address[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class Proxy:
    """The parent process: accept loop, one receiver per source, reaping, shutdown."""

    def __init__(self, config, listener):
        self.config = config
        self.listener = listener
        self.receivers = {}  # pid (== pgid) -> peer
        self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)

    def handle_chld(self, *_):
        """Reap every exited child; a receiver that died abnormally has its group killed."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            peer = self.receivers.pop(pid, None)
            if peer is None:
                continue  # an orphaned forwarder we adopted: reaped, nothing more to do
            code, text = forking.decode_exit(status)
            if code != 0:
                self.kill_group(pid)
                log.warning("receiver %d for %s ended: %s; its group is killed", pid, peer, text)
            else:
                log.info("receiver %d for %s ended: %s", pid, peer, text)

    def handle_stop(self, signum, _frame):
        raise Shutdown(signal.Signals(signum).name)

    def kill_group(self, pgid, sig=signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def serve(self):
        """Accept until SIGTERM/SIGINT; returns the signal's name."""
        signal.signal(signal.SIGCHLD, self.handle_chld)
        signal.signal(signal.SIGTERM, self.handle_stop)
        signal.signal(signal.SIGINT, self.handle_stop)
        log.info("listening on %s port %d; destinations: %s", self.config.listen_host,
                 self.config.listen_port, " ".join(str(d) for d in self.config.dests))
        try:
            while True:
                try:
                    source, address = self.listener.accept()
                except OSError as exc:
                    self.accept_failed(exc)
                    continue
                try:
                    self.admit(source, address)
                finally:
                    source.close()  # the receiver has its own copy
        except Shutdown as stop:
            return str(stop)

    def accept_failed(self, exc):
        if exc.errno in TRANSIENT_ACCEPT_ERRORS:
            log.warning("accept failed: %s; pausing %.1f s", exc.strerror, ACCEPT_PAUSE_S)
            time.sleep(ACCEPT_PAUSE_S)
        else:
            log.warning("accept failed: %s", exc.strerror)

    def admit(self, source, address):
        """Refuse the source, or fork its receiver."""
        peer = format_peer(address)
        if not endpoints.is_allowed(address[0], self.config.allow):
            log.warning("refused %s: not in --allow", peer)
            return
        if len(self.receivers) >= self.config.max_connections:
            log.warning("refused %s: already serving --max-connections %d sources", peer,
                        self.config.max_connections)
            return
        # A child that dies at once must not be reaped before it is recorded, and a Shutdown
        # must not leave a receiver unrecorded: hold the signals across fork + record.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = forking.fork_child("socketproxy: receiver %s" % peer, receiver.run_receiver,
                                     source, peer, self.config, self.lifeline_r,
                                     keep=[source.fileno(), self.lifeline_r], close=[self.listener])
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass  # it already did, or it is already gone (reaped below)
            self.receivers[pid] = peer
        except OSError as exc:
            log.error("cannot start a receiver for %s: %s", peer, exc.strerror)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def shutdown(self, why):
        """Stop accepting, end every group (bounded), collect every child; no process is left."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.listener.close()
        log.info("stopping (%s): ending %d receivers", why, len(self.receivers))
        for pid in self.receivers:
            self.signal_receiver(pid)
        self.collect(time.monotonic() + STOP_TERM_S)
        for pid in list(self.receivers):
            self.kill_group(pid)
        self.collect(time.monotonic() + STOP_KILL_S, until_no_children=True)
        os.close(self.lifeline_w)
        log.info("stopped")

    def signal_receiver(self, pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def collect(self, deadline, until_no_children=False):
        """Reap children until the receivers (or, with until_no_children, all children) are gone."""
        while time.monotonic() < deadline:
            self.handle_chld()
            if not self.receivers:
                if not until_no_children:
                    return
                try:
                    if os.waitpid(-1, os.WNOHANG) == (0, 0):
                        time.sleep(0.02)
                        continue
                except ChildProcessError:
                    return
            time.sleep(0.02)


def main(argv=None):
    """Entry point of the socketproxy command."""
    setproctitle.getproctitle()  # before anything touches os.environ (the title reuses its memory)
    config = parse_args(sys.argv[1:] if argv is None else argv)
    proxylog.setup(config.log_level)
    seen = set()
    for dest in config.dests:
        if dest in seen:
            log.warning("destination %s is named more than once: it gets one connection per mention", dest)
        seen.add(dest)
    listener = bind_listener(config)
    become_subreaper()
    setproctitle.setproctitle("socketproxy: main %s:%d -> %s" % (
        config.listen_host, config.listen_port, " ".join(str(d) for d in config.dests)))
    proxy = Proxy(config, listener)
    why = proxy.serve()
    proxy.shutdown(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
