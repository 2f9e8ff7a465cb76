"""The reload and upgrade demo: change the proxy while a source streams through it, and stop nothing.

  python -m fakes.reload_demo     (make reload-demo)

A fake source streams lines through a proxy started with --config to fake destinations. The demo adds a
destination (SIGHUP), removes one, tries a bad file, upgrades the proxy in place (SIGUSR2) while a loop
opens 100 connections a second, and shows the process tree before and after. Then it checks: the
source's connection never ended, the destination added got a contiguous run of its lines up to the last,
the one removed got a contiguous run from the first, none got a torn line, no connection was refused,
and main kept its PID. Exit 0 only if every check held.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from .demo import DEADLINE_S, ROOT, Narration, die_with_parent, free_ports, numbers, spans, wait_for

WATCH_S = 1.5


class ReloadDemo(Narration):

    def __init__(self, workdir):
        self.results = []
        self.workdir = workdir
        self.port, self.d1, self.d2, self.d3 = free_ports(4)
        self.config = os.path.join(workdir, "socketproxy.toml")
        self.procs = {}
        self.outputs = {}

    def start(self, name, argv):
        path = os.path.join(self.workdir, name + ".out")
        handle = open(path, "w")
        self.procs[name] = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                            preexec_fn=die_with_parent)
        self.outputs[name] = path

    def lines(self, name):
        with open(self.outputs[name]) as handle:
            return [(name, line.rstrip("\n")) for line in handle]

    def write_config(self, *ports, extra=""):
        with open(self.config, "w") as handle:
            handle.write('framing = "line"\n%sdestinations = [%s]\n' % (
                extra, ", ".join('"127.0.0.1:%d"' % port for port in ports)))

    def tree(self, heading):
        self.say(heading)
        main = psutil.Process(self.procs["proxy"].pid)
        for proc in [main] + main.children(recursive=True):
            try:
                self.say("    %6d %6d  %s" % (proc.pid, proc.ppid(), " ".join(proc.cmdline())[:110]))
            except psutil.Error:
                pass

    def proxy_log(self):
        return open(self.outputs["proxy"]).read()

    def run(self):
        python = sys.executable
        for name, port in (("dst-1", self.d1), ("dst-2", self.d2)):
            self.start(name, [python, "-m", "fakes.destination", "--port", str(port), "--strict-lines"])
        self.write_config(self.d1)
        self.start("proxy", [python, os.path.join(ROOT, "socketproxy.py"), "--config", self.config,
                             "--listen-host", "127.0.0.1", "--listen-port", str(self.port)])
        wait_for(lambda: "listening on" in self.proxy_log())
        self.start("src-a", [python, "-m", "fakes.source", "--port", str(self.port), "--interval", "0.005",
                             "--id", "src-a"])
        main_pid = self.procs["proxy"].pid

        self.banner("1. one destination", "src-a streams lines through the proxy to dst-1 only.")
        wait_for(lambda: len(numbers(self.lines("dst-1"), "dst-1", "src-a")) > 50)
        self.tree("the process tree (main, src-a's receiver, its forwarder):")
        receiver_before = receivers(main_pid)

        self.banner("2. reload: add dst-2", "The file names dst-1 and dst-2; SIGHUP. src-a's live group joins dst-2.")
        self.write_config(self.d1, self.d2)
        os.kill(main_pid, signal.SIGHUP)
        wait_for(lambda: len(numbers(self.lines("dst-2"), "dst-2", "src-a")) > 50)
        self.say("dst-2 now gets src-a's lines: " + spans(numbers(self.lines("dst-2"), "dst-2", "src-a"))[:60])

        self.banner("3. reload: remove dst-1", "The file names dst-2 only; SIGHUP. The group leaves dst-1.")
        self.write_config(self.d2)
        os.kill(main_pid, signal.SIGHUP)
        wait_for(lambda: "removed by a reload" in self.proxy_log())
        time.sleep(WATCH_S)

        self.banner("4. reload: a bad file", "buffer = \"lots\": the proxy says why and keeps running as it was.")
        self.write_config(self.d2, extra='buffer = "lots"\n')
        os.kill(main_pid, signal.SIGHUP)
        wait_for(lambda: "reload failed" in self.proxy_log())
        self.say([line for line in self.proxy_log().splitlines() if "reload failed" in line][-1][30:])
        self.write_config(self.d2)

        self.banner("5. upgrade in place", "SIGUSR2 while a loop opens 100 connections a second: main execs the "
                    "installed command in its own process.")
        refused, opened, stop = [], [0], threading.Event()

        def connect_loop():
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S):
                        opened[0] += 1
                except OSError as exc:
                    refused.append(exc)
                time.sleep(0.01)

        loop = threading.Thread(target=connect_loop, daemon=True)
        loop.start()
        time.sleep(0.5)
        os.kill(main_pid, signal.SIGUSR2)
        wait_for(lambda: "upgraded in place" in self.proxy_log(), DEADLINE_S * 3)
        time.sleep(WATCH_S)
        stop.set()
        loop.join(DEADLINE_S)
        self.tree("the process tree after (same main; src-a's receiver still runs the code it started with):")
        receiver_after = receivers(main_pid)

        self.banner("checks")
        self.record("main kept its PID", self.procs["proxy"].poll() is None and
                    psutil.Process(main_pid).is_running(), "pid %d" % main_pid)
        self.record("src-a's group went on through 3 reloads and an upgrade",
                    bool(set(receiver_before) & set(receiver_after)), "receiver %s" % receiver_before)
        self.record("no connection refused or reset during the upgrade", not refused and opened[0] > 50,
                    "%d opened, %d failed" % (opened[0], len(refused)))
        self.procs["src-a"].send_signal(signal.SIGTERM)
        self.procs["src-a"].wait(DEADLINE_S)
        sent = numbers(self.lines("src-a"), "src-a", "src-a")
        time.sleep(WATCH_S)
        got1 = numbers(self.lines("dst-1"), "dst-1", "src-a")
        got2 = numbers(self.lines("dst-2"), "dst-2", "src-a")
        self.record("dst-1 (removed) got a contiguous run from the first line",
                    bool(got1) and got1 == list(range(sent[0], sent[0] + len(got1))), spans(got1))
        self.record("dst-2 (added) got a contiguous run up to the last line sent",
                    # (the source's log of what it sent may lag its last line by one)
                    bool(got2) and got2 == list(range(got2[0], got2[0] + len(got2))) and got2[-1] >= sent[-1],
                    "%s, last sent #%d" % (spans(got2), sent[-1] if sent else -1))
        torn = [text for name in ("dst-1", "dst-2") for _, text in self.lines(name) if "malformed" in text]
        self.record("no torn line at any destination", not torn, "%d malformed" % len(torn))
        return all(ok for _, ok, _, required in self.results if required)

    def stop(self):
        for name in ("src-a", "proxy", "dst-1", "dst-2"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(DEADLINE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def receivers(main_pid):
    """The pids of main's receivers now (the connect loop's come and go)."""
    found = []
    for proc in psutil.Process(main_pid).children():
        try:
            found += [proc.pid] if "receiver" in " ".join(proc.cmdline()) else []
        except psutil.Error:
            pass
    return found


def main():
    with tempfile.TemporaryDirectory(prefix="socketproxy-reload-demo-") as workdir:
        demo = ReloadDemo(workdir)
        try:
            ok = demo.run()
        finally:
            demo.stop()
    print("\nreload demo: %s" % ("every check held" if ok else "a check FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
