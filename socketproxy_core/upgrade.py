"""Upgrade in place (SIGUSR2): main runs the installed command again in its own process (exec), so
its PID (systemd's MainPID), its listening socket and its children stay.

1. A probe first: the new version is run with the same command line and SOCKETPROXY_PROBE set; it
   parses the command line (and the --config file), imports every module a process of the tree will
   run (the metrics process's too), prints PROBE_OK and exits. A version that cannot start (a syntax
   error, a missing module, a file it refuses) fails the probe, and the running image goes on.
2. Then exec, with the descriptors that must outlive it made inheritable and the rest of main's
   state (its children, the table's free slots, the destinations' columns, the counters) in the
   environment (SOCKETPROXY_INHERIT, JSON). The new main adopts it all (adopt): it serves new sources
   with the new code, and reaps and folds the groups started before, which run their old code until
   their sources end.

The shared table keeps its layout across an upgrade: a version that changes it must be started afresh.
"""
import importlib
import json
import os
import subprocess
import sys

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
