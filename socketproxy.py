"""SocketProxy: copy every TCP source that connects to all destinations, one connection each.

Usage:
  socketproxy.py --listen-port PORT [options] [--allow CIDR]... [--accept-proxy CIDR]... DEST...
  socketproxy.py --config FILE [--listen-port PORT] [options] [--allow CIDR]... [--accept-proxy CIDR]... [DEST...]
  socketproxy.py --check-config FILE
  socketproxy.py (-h | --help | --version)

DEST is HOST:PORT; an IPv6 address is written [ADDR]:PORT; HOST may be a name,
resolved again at every (re)connect. tls://HOST:PORT speaks TLS to it, verifying
its certificate and name.

Options:
  --config FILE           settings from a TOML file (keys: the long options with _ for -, and
                          destinations); an option given on the command line wins over the file;
                          SIGHUP reads the file again
  --check-config FILE     check FILE and exit: 0, or 1 with one line naming the bad key or value
  --listen-port PORT      port to listen on
  --listen-host HOST      address to bind [default: 0.0.0.0]
  --max-connections N     sources served at once; more are closed at once with a warning [default: 256]
  --idle-timeout SEC      close a source that sent nothing this long; 0 = never [default: 0]
  --connect-timeout SEC   give up one connect attempt to a destination after this [default: 3]
  --retry-interval SEC    longest wait between reconnect attempts; backoff starts at 0.1 s [default: 3]
  --send-timeout SEC      a destination that takes no data this long while data waits counts as down [default: 5]
  --allow CIDR            accept sources only from these networks; repeatable [default: all]
  --log-level LEVEL       debug, info, warning or error [default: info]
  --framing MODE          none (a byte stream), line (records end with a newline) or resp (records
                          are Redis commands; a source that is not RESP is closed) [default: none]
  --buffer SIZE           per destination of each source, kept while it is down and resent when it is
                          back; K/M suffixes; 0 = keep nothing [default: 4M]
  --metrics HOST:PORT     serve Prometheus metrics at http://HOST:PORT/metrics [default: off]
  --primary               the first DEST is the primary: its replies go back to the source, and it is the
                          source's session (it failing, resetting or closing ends the source's connection)
  --mirror-policy POLICY  with --primary: drop (a mirror that cannot keep up loses data, never slowing the
                          primary) or wait (backpressure, lossless mirrors) [default: drop]
  --fin-timeout SEC       with --primary: after the source's FIN, end the session once nothing has moved
                          either way this long (the primary neither answers nor closes); 0 = never [default: 30]
  --accept-proxy CIDR     sources from these networks (a load balancer) must begin with a PROXY protocol
                          v1 or v2 header; the source it names is the source everywhere; repeatable
  --send-proxy VERSION    v1, v2 or off: every destination connection begins with a PROXY protocol
                          header naming the source [default: off]
  --tls-cert FILE         sources speak TLS (1.2 or later) with this certificate chain (PEM)
  --tls-key FILE          its private key, when not in the --tls-cert file
  --tls-client-ca FILE    sources must present a certificate signed by this CA (mutual TLS)
  --tls-ca FILE           verify tls://HOST:PORT destinations against this CA, not the system's
  --tls-dest-cert FILE    a client certificate (PEM) for tls:// destinations that ask for one
  --tls-dest-key FILE     its key, when not in the --tls-dest-cert file
  --spare-groups N        groups (a receiver and its forwarders) kept forked ahead of their sources; a
                          group whose source ended cleanly serves the next one; 0 = every group is
                          forked for its source and ends with it [default: 0]
  --session-preamble N    with --framing line or none: the source's first N lines (bytes without framing)
                          are sent again first on every new connection to a destination [default: 0]
  -h --help               show this help
  --version               show the version
"""
import collections
import encodings.idna  # noqa: F401  getaddrinfo in forwarders needs it: import once, before fork
import errno
import os
import re
import select
import signal
import socket
import sys
import time

import socketproxy_core
socketproxy_core.require_linux()  # before the modules that need splice and pidfds: one line, exit 1

import psutil  # noqa: E402
import setproctitle  # noqa: E402

import docopt  # noqa: E402
from socketproxy_core import configfile  # noqa: E402
from socketproxy_core import endpoints  # noqa: E402
from socketproxy_core import forking  # noqa: E402
from socketproxy_core import membership  # noqa: E402
from socketproxy_core import proxylog  # noqa: E402
from socketproxy_core import receiver  # noqa: E402
from socketproxy_core import stats  # noqa: E402
from socketproxy_core import tls  # noqa: E402
from socketproxy_core import upgrade  # noqa: E402
from socketproxy_core import zerocopy  # noqa: E402
from socketproxy_core.pipesizes import plan_pipes  # noqa: E402
from socketproxy_core.pool import Pool  # noqa: E402
from socketproxy_core.reloading import Reloading, table_columns, title_base  # noqa: E402
from socketproxy_core.service import become_subreaper, notify_service_manager  # noqa: E402
from socketproxy_core.upgrade import Upgrading  # noqa: E402
from socketproxy_core.proxylog import log  # noqa: E402
from socketproxy_core.sockets import format_address, keep_sources_alive  # noqa: E402

VERSION = "socketproxy " + socketproxy_core.__version__
BACKLOG = 1024
STOP_TERM_S = 2.0  # receivers get this long after SIGTERM (they flush for at most 1 s) ...
STOP_KILL_S = 0.8  # ... then SIGKILL to their groups and this long to be collected
ACCEPT_PAUSE_S = 0.1  # out of descriptors: pause, then accept again
TRANSIENT_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR2)
TITLE_PERIOD_S = 1.0  # the title is refreshed this often at most (SIGALRM when one is due)
ACCEPT_BATCH = 64  # sources accepted per wake-up before signals are looked at again
REFUSAL_SUMMARY_S = 1.0  # refused sources in a burst: one summary line per this period
COLLECT_POLL_S = 0.05


def usage_error(message):
    """Usage and one line naming the bad value on stderr, exit 2."""
    usage = __doc__.split("\n\n")[1]
    sys.stderr.write("%s\nsocketproxy: error: %s\n" % (usage, message))
    sys.exit(2)


def known_options():
    return set(re.findall(r"(--[a-z-]+|-h)\b", __doc__.split("Options:")[1]))


def positionals(argv):
    """The arguments that are neither options nor option values."""
    flags = {"-h", "--help", "--version", "--primary"}
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
    if args.get("--check-config"):
        check_config(args["--check-config"])
    try:
        return load_config(args, given_options(argv))
    except configfile.FileError as exc:
        sys.stderr.write("socketproxy: error: %s\n" % exc)
        sys.exit(1)
    except endpoints.UsageError as exc:
        usage_error(str(exc))


def config_reloader(argv):
    """With --config: a function reading the configuration again (the file, under the same command
    line); None without."""
    args = docopt.docopt(__doc__, argv=argv, version=VERSION)
    if not args.get("--config"):
        return None
    given = given_options(argv)
    return lambda: load_config(args, given)


def given_options(argv):
    """The options named on the command line (they win over --config's file)."""
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def load_config(args, given):
    """The Config of the command line (docopt's args), merged with --config's file when there is one;
    raises UsageError (configfile.FileError for the file's own faults)."""
    if not args.get("--config"):
        return endpoints.build_config(args)
    path = args["--config"]
    merged, dests = configfile.merge(args, given, path)
    try:
        return endpoints.build_config(merged, dests)
    except endpoints.UsageError as exc:
        bad = re.match(r"invalid (--[a-z-]+) (.*)", str(exc))
        if bad and bad.group(1) in given:
            raise
        if bad:  # the file's value: named by its key
            raise configfile.FileError("%s: %s %s" % (path, bad.group(1)[2:].replace("-", "_"), bad.group(2))) from None
        raise configfile.FileError("%s: %s" % (path, exc)) from None


def check_config(path):
    """--check-config FILE: exit 0 when it would start, else 1 with one line (as nginx -t does)."""
    try:
        config = load_config({**docopt.docopt(__doc__, argv=["--config", path]), "--config": path}, set())
        tls.server_context(config)  # its certificates and keys are read as a start would
        tls.client_contexts(config)
    except endpoints.UsageError as exc:
        sys.stderr.write("socketproxy: error: %s\n" % exc)
        sys.exit(1)
    print("socketproxy: %s is valid: listen on %s port %d, %d destinations" % (
        path, config.listen_host, config.listen_port, len(config.dests)))
    sys.exit(0)


def bind_listener(config):
    """The listening socket, or exit 1 with one line when the address is in use or not permitted."""
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:  # "::" takes IPv4 sources too, whatever net.ipv6.bindv6only says
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    keep_sources_alive(listener)
    try:
        listener.bind((config.listen_host, config.listen_port))
        listener.listen(BACKLOG)
    except OSError as exc:
        listener.close()
        log.error("cannot listen on %s port %d: %s", config.listen_host, config.listen_port, exc.strerror)
        sys.exit(1)
    return listener


class RefusalLog:
    """Refused sources as one line each when rare, as one summary line a second in a burst."""

    def __init__(self):
        self.counts = collections.Counter()  # reason -> refusals not yet logged
        self.window_end = 0.0

    def refused(self, peer, reason):
        now = time.monotonic()
        if not self.counts and now >= self.window_end:
            log.warning("refused %s: %s", peer, reason)
            self.window_end = now + REFUSAL_SUMMARY_S
        else:
            self.counts[reason] += 1

    def timeout_s(self):
        """How long main may sleep before a summary is due (None: none pending)."""
        if not self.counts:
            return None
        return max(0.0, self.window_end - time.monotonic())

    def flush(self):
        if self.counts and time.monotonic() >= self.window_end:
            log.warning("refused %d more sources in the last %.0f s: %s", sum(self.counts.values()),
                        REFUSAL_SUMMARY_S, ", ".join("%d %s" % (n, why) for why, n in self.counts.items()))
            self.counts.clear()
            self.window_end = time.monotonic() + REFUSAL_SUMMARY_S


class Proxy(Reloading, Upgrading, Pool):
    """The parent process: accept loop, one receiver per source, reaping, orderly stop.

    Signal handlers only record the signal; the wake-up pipe (signal.set_wakeup_fd) makes the
    loop's poll return, and the loop accepts, reaps, logs and stops outside any handler.
    """

    def __init__(self, config, listener, metrics_sock=None, reload_config=None, inherited=None,
                 tls_contexts=(None, None)):
        self.reload_config = reload_config  # --config: reads the file again (SIGHUP), else None
        # TLS contexts: the sources' (--tls-cert; each receiver does its handshake), the tls:// destinations'
        self.tls_context, self.tls_client = tls_contexts
        self.listener = listener
        self.metrics_sock = metrics_sock
        self.metrics_pid = None
        self.inherited = inherited  # after an upgrade in place: the state the image before handed over
        self.probe = None  # an upgrade's probe of the new version: (Popen, its output's fd, the output)
        self.receivers = {}  # pid (== pgid) -> peer
        self.slots = {}  # receiver pid -> its slot in the shared counters
        self.column_of = {}  # a destination's name (endpoints.mention_names) -> its column
        self.counters = dict.fromkeys(("accepted", "refused_allow", "refused_full", "group_kills", "refused_tls",
                                       "refused_proxy"), 0)
        if inherited:
            self.take_over(inherited)
        else:
            # Slots for twice --max-connections: a slot is reused only once its whole group is gone.
            # A destination keeps its column of the table for the life of the process (its counters
            # go on across reloads and upgrades), with room for destinations added by reloads.
            self.table = stats.Table(2 * config.max_connections, table_columns(config))
            self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)
            # The destinations as every group can read them again at a reload.
            self.dests_fd = os.memfd_create("socketproxy-destinations", os.MFD_CLOEXEC)
        self.config = config = self.with_columns(config)
        membership.write_list(self.dests_fd, config)
        self.title_base = title_base(config)
        self.title_shown, self.title_at = None, 0.0
        self.wake_r, self.wake_w = zerocopy.small_pipe()
        self.signals = set()  # signal numbers received and not yet handled
        self.refusals = RefusalLog()
        self.poller = select.poll()
        self.accept_paused_until = None  # out of descriptors: accepting again then
        self.init_pool()

    def record_signal(self, signum, _frame):
        self.signals.add(signum)

    def install_signal_handlers(self):
        listener_fd = self.listener.fileno()
        self.listener.setblocking(False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.record_signal)
        self.poller.register(self.wake_r, select.POLLIN)
        self.poller.register(listener_fd, select.POLLIN)
        self.listener_watched = True

    def serve(self):
        """Accept until SIGTERM/SIGINT; returns the signal's name."""
        self.install_signal_handlers()
        if self.inherited:
            log.info("upgraded in place to %s (pid %d): listening on %s port %d; destinations: %s; %d sources "
                     "started before keep their groups", VERSION, os.getpid(), self.config.listen_host,
                     self.config.listen_port, " ".join(str(d) for d in self.config.dests), len(self.receivers))
            if self.metrics_pid is not None:  # the old image's, running the old code: started again
                old, self.metrics_pid = self.metrics_pid, None
                os.kill(old, signal.SIGKILL)
            self.reap()  # children that ended during the exec (their SIGCHLD came before our handler)
        else:
            log.info("listening on %s port %d; destinations: %s", self.config.listen_host,
                     self.config.listen_port, " ".join(str(d) for d in self.config.dests))
        notify_service_manager("READY=1\nSTATUS=listening on port %d" % self.config.listen_port)
        if self.metrics_sock is not None:
            self.start_metrics()
        self.update_title()
        self.fill_spares()
        while True:
            timeouts = [self.refusals.timeout_s(), self.refill_timeout_s(), self.grace_timeout_s()]
            if self.accept_paused_until is not None:
                timeouts.append(max(0.0, self.accept_paused_until - time.monotonic()))
            timeout_s = min((t for t in timeouts if t is not None), default=None)
            events = self.poller.poll(None if timeout_s is None else timeout_s * 1000)
            self.resume_accepting()
            stop = self.handle_signals()
            if stop:
                return stop
            if self.probe is not None and any(fd == self.probe[1] for fd, _ in events):
                self.probe_said()
            for fd, _ in events:
                if fd in self.pool_by_fd:
                    self.group_said(fd)
            self.end_grace()
            if any(fd == self.listener.fileno() for fd, _ in events):
                self.accept_some()
            self.refusals.flush()
            self.refill()

    def handle_signals(self):
        """Act on the signals recorded since the last call; the name of a stop signal, if any."""
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        received, self.signals = self.signals, set()
        if signal.SIGCHLD in received:
            self.reap()
        if signal.SIGHUP in received:
            self.reload()
        if signal.SIGUSR2 in received:
            self.start_upgrade()
        if signal.SIGALRM in received:
            self.update_title()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig in received:
                return signal.Signals(sig).name
        return None

    def accept_some(self):
        """Accept the sources waiting now (a bounded batch, so signals are seen between batches)."""
        for _ in range(ACCEPT_BATCH):
            if self.wait_for_group():
                return
            try:
                source, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.accept_failed(exc)
                return
            try:
                forked = self.admit(source, address)
            finally:
                source.close()  # the receiver has its own copy
            if forked and self.config.spare_groups:
                return  # a spare group may have come back meanwhile: the poll says (pool.Pool.wait_for_group)

    def reap(self):
        """Reap every exited child; a receiver that died abnormally has its group killed."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.metrics_pid:
                self.metrics_pid = None
                log.warning("the metrics server %d ended: %s", pid, forking.decode_exit(status)[1])
                continue
            peer = self.receivers.pop(pid, None)
            if peer is None:
                if pid in self.pool or pid in self.unexpected:
                    self.spare_ended(pid, *forking.decode_exit(status))
                continue  # else an orphaned forwarder we adopted, or a spare we let go: nothing more to do
            self.forget_group(pid)
            slot = self.slots.pop(pid)
            self.count_refusal(peer, self.table.receiver_row(slot).read()[stats.RCV_REFUSED])
            self.table.retire(slot, pid)
            code, text = forking.decode_exit(status)
            if code != 0:
                self.kill_group(pid)
                self.count(group_kills=1)
                log.warning("receiver %d for %s ended: %s; its group is killed", pid, peer, text)
            else:
                log.info("receiver %d for %s ended: %s", pid, peer, text)
        self.fold_finished()

    def count_refusal(self, peer, why):
        """A receiver that closed its source before serving it (TLS, the PROXY protocol, --allow on the
        source a balancer named): counted by reason, logged once per burst as main's own refusals are."""
        if why == stats.REFUSED_TLS:
            self.refusals.refused(peer, "TLS refused (see the receiver's line)")
            self.count(refused_tls=1)
        elif why == stats.REFUSED_PROXY:
            self.refusals.refused(peer, "no valid PROXY protocol header (see the receiver's line)")
            self.count(refused_proxy=1)
        elif why == stats.REFUSED_ALLOW:
            self.refusals.refused(peer, "the source its balancer names is not in --allow")
            self.count(refused_allow=1)

    def fold_finished(self):
        """Fold the shared counters of groups that are entirely gone into the totals."""
        self.table.fold_gone(group_alive)
        self.table.set_main(active=len(self.receivers), spares=len(self.idle), **self.counters)
        self.update_title()

    def count(self, **increments):
        for name, value in increments.items():
            self.counters[name] += value
        self.table.set_main(active=len(self.receivers), spares=len(self.idle), **self.counters)

    def update_title(self):
        """Main's title says how many sources it serves: when that changed, at most once a second."""
        text = "%s | %d sources" % (self.title_base, len(self.receivers))
        if self.config.spare_groups:
            text += ", %d spare groups" % len(self.idle)
        if text == self.title_shown:
            return
        wait = self.title_at + TITLE_PERIOD_S - time.monotonic()
        if wait > 0:
            signal.setitimer(signal.ITIMER_REAL, wait)  # SIGALRM brings us back here
            return
        setproctitle.setproctitle(text)
        self.title_shown, self.title_at = text, time.monotonic()

    def start_metrics(self):
        """Fork the process that serves --metrics (see socketproxy_core.metrics); main keeps the
        listening socket, to start it again with a reloaded configuration."""
        host, port = self.metrics_sock.getsockname()[:2]
        self.metrics_pid = forking.fork_child(
            "socketproxy: metrics %s" % format_address((host, port)), serve_metrics, self.metrics_sock, self.table,
            self.config, self.lifeline_r, keep=[self.metrics_sock.fileno(), self.lifeline_r], close=[self.listener])
        log.info("serving metrics at http://%s/metrics", format_address((host, port)))

    def kill_group(self, pgid, sig=signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def accept_failed(self, exc):
        """Out of descriptors (or memory): the listener is not watched for ACCEPT_PAUSE_S, then the
        loop accepts again; signals and reaping go on meanwhile."""
        if exc.errno in TRANSIENT_ACCEPT_ERRORS:
            log.warning("accept failed: %s; pausing %.1f s", exc.strerror, ACCEPT_PAUSE_S)
            self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
            self.update_listener()
        else:
            log.warning("accept failed: %s", exc.strerror)

    def resume_accepting(self):
        if self.accept_paused_until is not None and time.monotonic() >= self.accept_paused_until:
            self.accept_paused_until = None
            self.update_listener()

    def update_listener(self):
        """Watch the listener unless accepting is paused (out of descriptors) or sources are left in
        its queue a moment for a spare group (pool.Pool.wait_for_group)."""
        wanted = self.accept_paused_until is None and self.grace_until is None
        if wanted != self.listener_watched:
            self.listener_watched = wanted
            if wanted:
                self.poller.register(self.listener.fileno(), select.POLLIN)
            else:
                self.poller.unregister(self.listener.fileno())

    def admit(self, source, address):
        """Refuse the source, hand it to a spare group, or fork its receiver; whether a fork it took."""
        peer = format_address(address)
        # A balancer of --accept-proxy is let in: its receiver applies --allow to the source it names.
        trusted = self.config.accept_proxy and endpoints.is_allowed(address[0], self.config.accept_proxy)
        if not trusted and not endpoints.is_allowed(address[0], self.config.allow):
            self.refusals.refused(peer, "not in --allow")
            self.count(refused_allow=1)
            return
        slot = self.table.allocate() if len(self.receivers) < self.config.max_connections else None
        if slot is None:
            self.refusals.refused(peer, "already serving --max-connections %d sources" % self.config.max_connections)
            self.count(refused_full=1)
            return
        source.setblocking(True)
        pid = self.hand_to_spare(source, peer, slot) if self.config.spare_groups else None
        handed = pid is not None
        try:
            if handed:
                pass
            elif self.config.spare_groups:
                pid = self.fork_group((source, peer, slot))
            else:
                pid = forking.fork_child("socketproxy: receiver %s" % peer, receiver.run_receiver,
                                         source, peer, self.config, self.lifeline_r, self.table, slot, self.dests_fd,
                                         (self.tls_context, self.tls_client),
                                         keep=self.receiver_keeps(source.fileno()), close=[self.listener])
                self.own_group(pid)
        except OSError as exc:
            self.table.free.append(slot)
            log.error("cannot start a receiver for %s: %s", peer, exc.strerror)
            return
        self.receivers[pid] = peer
        self.slots[pid] = slot
        self.count(accepted=1)
        self.update_title()
        return not handed

    def receiver_keeps(self, *fds):
        """The descriptors a receiver keeps at its fork: fds, main's lifeline, the destinations' list."""
        return [*fds, self.lifeline_r] + ([self.dests_fd] if self.dests_fd is not None else [])

    def own_group(self, pid):
        """A receiver just forked leads its own process group."""
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # it already did, or it is already gone (reaped by the loop, which knows it now)

    def shutdown(self, why):
        """Stop accepting, end every group (bounded), collect every process of the tree."""
        notify_service_manager("STOPPING=1")
        if self.listener_watched:
            self.poller.unregister(self.listener.fileno())
        self.listener.close()
        self.retire_spares(stopping=True)
        log.info("stopping (%s): ending %d receivers", why, len(self.receivers))
        if self.metrics_pid is not None:  # it ignores stop signals (see metrics.serve), and holds no state
            os.kill(self.metrics_pid, signal.SIGKILL)
            self.metrics_pid = None  # its end is expected now: reaped as any other child
        for pid in self.receivers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.collect(time.monotonic() + STOP_TERM_S, lambda: not self.receivers)
        for pid in self.receivers:
            self.kill_group(pid)
        # Forwarders whose receiver is gone are our children now (subreaper): wait for them too.
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.collect(time.monotonic() + STOP_KILL_S, lambda: not psutil.Process().children())
        os.close(self.lifeline_w)
        # A title refresh may still be due (a one-shot SIGALRM): at exit Python gives the signal its
        # default action back, which would end us "Alarm clock" (status 142) instead of 0.
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.set_wakeup_fd(-1)
        log.info("stopped")

    def collect(self, deadline, done):
        """Reap children (woken by SIGCHLD) until done() or the deadline."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.poller.poll(min(remaining, COLLECT_POLL_S) * 1000)
            self.handle_signals()
            self.reap()


def serve_metrics(*args):
    """Body of the metrics process: prometheus-client is loaded there only, not in main (nor so in
    every receiver and forwarder main forks)."""
    from socketproxy_core import metrics
    return metrics.serve(*args)


def group_alive(pgid):
    """Whether any process of the group is left (a zombie counts until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def bind_metrics(config):
    """The --metrics listening socket (bound in main, so a bad address is one line and exit 1)."""
    host, port = config.metrics
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        log.error("cannot serve metrics on %s: %s", format_address((host, port)), exc.strerror or exc)
        sys.exit(1)
    return sock


def main(argv=None):
    """Entry point of the socketproxy command."""
    setproctitle.getproctitle()  # before anything touches os.environ (the title reuses its memory)
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get(upgrade.PROBE_ENV):
        upgrade.run_probe(config)
    inherited = upgrade.adopt()
    proxylog.setup(config.log_level)
    try:
        tls_contexts = tls.server_context(config), tls.client_contexts(config)
    except endpoints.UsageError as exc:
        log.error("%s", exc)
        return 1
    seen = set()
    for dest in config.dests:
        if dest in seen:
            log.warning("destination %s is named more than once: it gets one connection per mention", dest)
        seen.add(dest)
    config = plan_pipes(config)
    if inherited:  # an upgrade in place: the sockets are the image before's
        listener = socket.socket(fileno=inherited["listener"])
        keep_sources_alive(listener)  # (an image before this one may have set it on each source instead)
        metrics_sock = socket.socket(fileno=inherited["metrics"]) if inherited["metrics"] is not None else None
    else:
        listener = bind_listener(config)
        metrics_sock = bind_metrics(config) if config.metrics else None
    become_subreaper()
    proxy = Proxy(config, listener, metrics_sock, config_reloader(sys.argv[1:] if argv is None else argv),
                  inherited, tls_contexts)
    why = proxy.serve()
    proxy.shutdown(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
