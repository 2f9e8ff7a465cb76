"""Upgrade in place (SIGUSR2): main runs the installed command again in its own process (exec), so
its PID (systemd's MainPID), its listening socket and its children stay.

1. A probe first: the new version is run with the same command line and SOCKETPROXY_PROBE set; it
   parses the command line (and the --config file), imports every module a process of the tree will
   run (the metrics process's too), prints PROBE_OK and exits. A version that cannot start (a syntax
   error, a missing module, a file it refuses) fails the probe, and the running image goes on.
2. Then exec, with the descriptors that must outlive it made inheritable and the rest of main's
   state (its children, the table's free slots, the destinations' columns, the counters) in the
   environment (SOCKETPROXY_INHERIT, JSON). The new main adopts it all (adopt, then Upgrading.take_over): it serves new sources
   with the new code, and reaps and folds the groups started before, which run their old code until
   their sources end.

The shared table keeps its layout across an upgrade: a version that changes it must be started afresh.
"""
import importlib
import json
import os
import select
import signal
import subprocess
import sys

from socketproxy_core import stats
from socketproxy_core.proxylog import log

PROBE_ENV = "SOCKETPROXY_PROBE"
STATE_ENV = "SOCKETPROXY_INHERIT"
PROBE_OK = "socketproxy: probe ok"


def command():
    """How this main was started: the interpreter, the script (the installed command), its arguments."""
    return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def start_probe(columns, column_of):
    """The probe, running: (Popen, the read end of its output) -- read it to its end, then check.
    It is told the table's size and the destinations' columns, which the new image inherits."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    env = dict(os.environ, **{PROBE_ENV: json.dumps({"columns": columns, "names": list(column_of)})})
    env.pop(STATE_ENV, None)
    proc = subprocess.Popen(command(), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=subprocess.STDOUT,
                            env=env, close_fds=True)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    return proc, read_fd


def probe_passed(output):
    """Whether the probe's whole output says the new version starts; else its last line (why)."""
    text = output.decode(errors="replace").strip()
    if text.endswith(PROBE_OK):
        return True, ""
    return False, text.splitlines()[-1] if text else "it exited without a word"


def run_probe(config):
    """In the new version, under SOCKETPROXY_PROBE, its command line parsed into config: import what
    every process runs, check that the destinations fit the inherited table; say so."""
    importlib.import_module("socketproxy_core.metrics")  # the metrics process's, imported lazily otherwise
    from socketproxy_core import endpoints
    from socketproxy_core import tls
    try:
        tls.server_context(config)  # the certificate files, read as the new image's start will
        tls.client_contexts(config)
    except endpoints.UsageError as exc:
        print(exc, flush=True)
        sys.exit(1)
    table = json.loads(os.environ[PROBE_ENV])
    names = set(table["names"]) | set(endpoints.mention_names(config.dests))
    if len(names) > table["columns"]:
        print("more destinations named since the start (%d) than the table holds (%d): restart instead"
              % (len(names), table["columns"]), flush=True)
        sys.exit(1)
    print(PROBE_OK, flush=True)
    sys.exit(0)


def exec_new(state, fds):
    """Replace this image by the installed command's, handing over fds and state (never returns)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    os.environ[STATE_ENV] = json.dumps(state)
    argv = command()
    os.execv(argv[0], argv)


def adopt():
    """The state the image before handed over (and its variable removed, so children do not see it);
    None at a plain start."""
    text = os.environ.pop(STATE_ENV, None)
    return json.loads(text) if text else None


class Upgrading:
    """Main's side of an upgrade in place, a mixin of its Proxy: the probe, the exec, and the new
    image's adoption of the state the image before handed over."""

    def take_over(self, state):
        """After an upgrade in place: the image before's listener (given to the constructor), table,
        lifeline, children and counters."""
        slots, columns, table_fd = state["table"]
        self.table = stats.Table(slots, columns, fd=table_fd)
        self.table.free = state["free"]
        self.table.retiring = {int(slot): pgid for slot, pgid in state["retiring"].items()}
        self.lifeline_r, self.lifeline_w = state["lifeline"]
        self.dests_fd = state["dests_fd"]
        self.receivers = {int(pid): peer for pid, peer in state["receivers"].items()}
        self.slots = {int(pid): slot for pid, slot in state["slots"].items()}
        self.column_of = state["column_of"]
        self.counters = state["counters"]
        self.metrics_pid = state["metrics_pid"]  # the old image's: ended and started again by serve

    def start_upgrade(self):
        """SIGUSR2: probe the installed command (py); the loop reads its word, then execs."""
        if self.probe is not None:
            log.info("SIGUSR2: an upgrade is under way already")
            return
        log.info("upgrade in place (SIGUSR2): checking that %s starts", " ".join(command()[1:2]))
        try:
            proc, fd = start_probe(self.table.dests, self.column_of)
        except OSError as exc:
            log.error("upgrade failed: cannot run the new version (%s); kept running this one", exc.strerror or exc)
            return
        self.probe = (proc, fd, bytearray())
        self.poller.register(fd, select.POLLIN)

    def probe_said(self):
        """The probe's output: once it ends, exec the new version, or keep this one and say why."""
        proc, fd, output = self.probe
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            output += chunk
            return
        self.poller.unregister(fd)
        os.close(fd)
        self.probe = None
        passed, why = probe_passed(output)
        if not passed:
            log.error("upgrade failed: the new version does not start (%s); kept running this one", why)
            return
        self.exec_new_version()

    def exec_new_version(self):
        """Hand everything over to the new image (this process, exec'd) and become it."""
        state = {"table": [self.table.slots, self.table.dests, self.table.fd], "free": self.table.free,
                 "retiring": self.table.retiring, "lifeline": [self.lifeline_r, self.lifeline_w],
                 "dests_fd": self.dests_fd, "receivers": self.receivers, "slots": self.slots,
                 "column_of": self.column_of, "counters": self.counters, "metrics_pid": self.metrics_pid,
                 "listener": self.listener.fileno(),
                 "metrics": self.metrics_sock.fileno() if self.metrics_sock is not None else None}
        fds = [self.table.fd, self.lifeline_r, self.lifeline_w, self.dests_fd, self.listener.fileno()] + (
            [self.metrics_sock.fileno()] if self.metrics_sock is not None else [])
        log.info("upgrading in place: %d sources keep their groups (and their code); exec %s",
                 len(self.receivers), " ".join(command()[1:]))
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            exec_new(state, fds)
        except OSError as exc:
            log.error("upgrade failed: exec: %s; kept running this one", exc.strerror or exc)
