#!/usr/bin/env python3
"""Soak: the proxy with two destinations under continuous connection churn; main must not grow.

    python bench/soak.py [--seconds N] [--interval S] [--rate R] [--concurrency C]
    (make soak; SOAK_SECONDS=N, SOAK_INTERVAL=S)

Several clients at once open a connection, send a little (1-8 KiB, in two parts up to 0.15 s apart),
close it and open the next, at about --rate connections per second in all. Every --interval seconds
it prints main's descriptors, resident memory (RSS) and the number of processes of the proxy's tree
(and its zombies: an exit not yet collected is normal for an instant). At the end the churn stops,
the last groups finish, and the verdict says whether they stayed flat:
  - descriptors: never above the start + 2 (an accept in progress), and back to the start at the end;
  - memory: the median of the last third of the samples no higher than that of the first third by
    more than --rss-margin-kib, and the end no higher than the first sample by more than that;
  - processes: the last third's median no higher than the first third's + --concurrency, no zombie
    still there half a second later (sampled every 0.5 s), main alone at the end;
  - nothing lost: every byte the clients sent reached each destination;
  - metrics (--metrics on, unless --no-metrics; scraped at every sample): the metrics process's
    descriptors and memory flat too, no file opened by main or by it, and at the end the scrape's
    totals equal what the clients sent and what each destination got.
Exit status 0 only when all hold; every process it started is gone when it returns.
Stdlib, psutil and the project's own code only. Roles (internal): --role sink / --role churn.
"""
import argparse
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from common import become_subreaper, free_port, kill_descendants, reap_exited

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DESTS = 2


def now():
    return time.monotonic()


# -- role: sink (a destination that reads and counts) ----------------------------------------------

def run_sink(args):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(512)
    listener.setblocking(False)
    print("listening", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    total = conns = 0
    while not stop:
        for key, _ in sel.select(0.2):
            if key.data is None:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    continue
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, True)
                conns += 1
                continue
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                total += len(data)
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
    print("result " + json.dumps({"bytes": total, "connections": conns, "open": len(sel.get_map()) - 1}), flush=True)
    return 0


# -- role: churn (clients opening, sending a little, closing) --------------------------------------

def run_churn(args):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    stats = {"connections": 0, "bytes": 0, "failed": 0}
    period = args.concurrency / float(args.rate)  # each client's pace

    def client(seed):
        rng = random.Random(seed)
        next_t = now() + rng.uniform(0, period)
        while not stop.is_set():
            delay = next_t - now()
            if delay > 0 and stop.wait(delay):
                break
            next_t = max(next_t + period, now() - period)
            payload = os.urandom(rng.randint(1024, 8192))
            try:
                with socket.create_connection(("127.0.0.1", args.port), timeout=10) as sock:
                    cut = rng.randint(0, len(payload))
                    sock.sendall(payload[:cut])
                    stop.wait(rng.uniform(0, 0.15))  # hold it open a little: groups overlap
                    sock.sendall(payload[cut:])
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(1)  # the proxy closes us once its receiver read our EOF
            except OSError:
                with lock:
                    stats["failed"] += 1
                continue
            with lock:
                stats["connections"] += 1
                stats["bytes"] += len(payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    while not stop.is_set():
        stop.wait(1.0)
        with lock:
            line = json.dumps(stats)
        with open(args.stats, "w") as out:
            out.write(line)
    for thread in threads:
        thread.join()
    print("result " + json.dumps(stats), flush=True)
    return 0


# -- the soak --------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.popens = []
        self.workdir = "/tmp/soak-%d" % os.getpid()
        os.makedirs(self.workdir, exist_ok=True)

    def reap(self):
        for pid, status in reap_exited():
            for popen in self.popens:
                if popen.pid == pid and popen.returncode is None:
                    popen.returncode = os.waitstatus_to_exitcode(status)

    def spawn(self, argv, **kwargs):
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT, **kwargs)
        self.popens.append(popen)
        return popen

    def wait_exit(self, popen, timeout):
        deadline = now() + timeout
        while now() < deadline:
            self.reap()
            if popen.returncode is not None:
                return True
            time.sleep(0.02)
        return False

    def metrics_proc(self):
        for proc in psutil.Process(self.proxy.pid).children():
            try:
                if " ".join(proc.cmdline()).startswith("socketproxy: metrics"):
                    return proc
            except psutil.Error:
                pass
        return None

    def scrape(self):
        """{(name, destination label or None): value} from --metrics."""
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port, timeout=10) as response:
            text = response.read().decode()
        return {(sample.name, sample.labels.get("destination")): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def sample(self):
        main = psutil.Process(self.proxy.pid)
        procs = [main] + main.children(recursive=True)
        extra = {}
        if self.args.metrics:
            self.scrape()
            metrics = self.metrics_proc()
            extra = {"m_fds": metrics.num_fds(), "m_rss": metrics.memory_info().rss,
                     "files": len(main.open_files()) + len(metrics.open_files())}
        zombies = set()
        for proc in procs:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    zombies.add(proc.pid)
            except psutil.Error:
                pass
        return dict(extra, t=now() - self.start, fds=len(os.listdir("/proc/%d/fd" % main.pid)),
                    rss=main.memory_info().rss, procs=len(procs), zombies=len(zombies), zombie_pids=zombies)

    def churn_stats(self):
        try:
            return json.load(open(self.stats_path))
        except (OSError, ValueError):
            return {"connections": 0, "bytes": 0, "failed": 0}

    def result_line(self, popen):
        out = popen.stdout.read().decode()
        for line in out.splitlines():
            if line.startswith("result "):
                return json.loads(line[7:])
        return None

    def run(self):
        a = self.args
        become_subreaper()
        taken = set()
        listen_port = free_port(taken)
        dest_ports = [free_port(taken) for _ in range(N_DESTS)]
        self.sinks = []
        for port in dest_ports:
            sink = self.spawn([sys.executable, __file__, "--role", "sink", "--port", str(port)], stdout=subprocess.PIPE)
            assert sink.stdout.readline().strip() == b"listening"
            self.sinks.append(sink)
        log_path = os.path.join(self.workdir, "proxy.log")
        self.metrics_port = free_port(taken)
        metrics = ["--metrics", "127.0.0.1:%d" % self.metrics_port] if a.metrics else []
        with open(log_path, "wb") as log:
            self.proxy = self.spawn([sys.executable, os.path.join(ROOT, "socketproxy.py"), "--listen-host", "127.0.0.1",
                                     "--listen-port", str(listen_port)] + metrics +
                                    ["127.0.0.1:%d" % p for p in dest_ports], stdout=log, stderr=subprocess.STDOUT)
        self.dest_names = ["127.0.0.1:%d" % p for p in dest_ports]
        deadline = now() + 20
        while "listening on" not in open(log_path).read() or (a.metrics and "serving metrics" not in open(log_path).read()):
            if now() > deadline or self.proxy.poll() is not None:
                raise RuntimeError("the proxy did not start:\n" + open(log_path).read())
            time.sleep(0.05)
        self.start = now()
        base = self.sample()
        self.stats_path = os.path.join(self.workdir, "churn.json")
        self.churn = self.spawn([sys.executable, __file__, "--role", "churn", "--port", str(listen_port),
                                 "--rate", str(a.rate), "--concurrency", str(a.concurrency), "--stats", self.stats_path],
                                stdout=subprocess.PIPE)
        print("soak: %g s, sample every %g s, %d connections/s from %d clients at once, 2 destinations; "
              "log %s" % (a.seconds, a.interval, a.rate, a.concurrency, log_path), flush=True)
        print("%8s %10s %6s %9s %6s %8s" % ("time", "conns", "fds", "RSS MiB", "procs", "zombies"))
        print("%7.0fs %10d %6d %9.2f %6d %8d" % (0, 0, base["fds"], base["rss"] / 2**20, base["procs"], base["zombies"]),
              flush=True)
        samples, peaks = [], {"fds": base["fds"], "procs": base["procs"], "lingering": 0}
        end = self.start + a.seconds
        next_print = self.start + a.interval
        previous_zombies = set()
        while now() < end:
            time.sleep(min(0.5, max(0.0, end - now())))
            self.reap()
            s = self.sample()
            # A zombie is normal for an instant (an exit not yet collected); one still there half a
            # second later is not being reaped.
            s["lingering"] = len(s["zombie_pids"] & previous_zombies)
            previous_zombies = s["zombie_pids"]
            for key in peaks:
                peaks[key] = max(peaks[key], s[key])
            if now() >= next_print - 0.01 or now() >= end:
                next_print += a.interval
                samples.append(s)
                print("%7.0fs %10d %6d %9.2f %6d %8d" % (s["t"], self.churn_stats()["connections"], s["fds"],
                                                          s["rss"] / 2**20, s["procs"], s["zombies"]), flush=True)
            if self.churn.poll() is not None:
                raise RuntimeError("the churn clients stopped early")
        self.churn.terminate()
        self.wait_exit(self.churn, 30)
        churn = self.result_line(self.churn) or self.churn_stats()
        # Let the last groups finish, then the final sample.
        deadline = now() + 15
        while now() < deadline and psutil.Process(self.proxy.pid).children(recursive=True):
            time.sleep(0.1)
        time.sleep(0.5)
        final = self.sample()
        self.final_metrics = self.scrape() if a.metrics else None
        print("%7s %10d %6d %9.2f %6d %8d   (churn stopped, groups finished)" % (
            "end", churn["connections"], final["fds"], final["rss"] / 2**20, final["procs"], final["zombies"]))
        self.proxy.terminate()
        proxy_ok = self.wait_exit(self.proxy, 5) and self.proxy.returncode == 0
        received = []
        for sink in self.sinks:
            sink.terminate()
            self.wait_exit(sink, 5)
            received.append((self.result_line(sink) or {}).get("bytes"))
        return self.verdict(base, samples, peaks, final, churn, received, proxy_ok, log_path)

    def verdict(self, base, samples, peaks, final, churn, received, proxy_ok, log_path):
        a = self.args
        margin = a.rss_margin_kib * 1024
        checks = []
        checks.append(("main's descriptors flat", peaks["fds"] <= base["fds"] + 2 and final["fds"] == base["fds"],
                       "start %d, peak %d, end %d" % (base["fds"], peaks["fds"], final["fds"])))
        if a.metrics:
            m_fds = [s["m_fds"] for s in samples]
            m_rss = [s["m_rss"] for s in samples]
            third_m = max(1, len(m_rss) // 3)
            early_m, late_m = statistics.median(m_rss[:third_m]), statistics.median(m_rss[-third_m:])
            checks.append(("metrics process flat, no file", max(m_fds + [final["m_fds"]]) <= base["m_fds"] + 4 and
                           final["m_fds"] <= base["m_fds"] + 1 and late_m - early_m <= margin and
                           max(s["files"] for s in samples + [final]) <= base["files"],
                           "fds start %d, peak %d, end %d; RSS early median %.2f MiB, late %.2f; regular files open "
                           "(main and metrics) at start %d, peak %d (the log on stdout and stderr)" % (
                               base["m_fds"], max(m_fds), final["m_fds"], early_m / 2**20, late_m / 2**20,
                               base["files"], max(s["files"] for s in samples + [final]))))
            got = self.final_metrics
            sent = [got[("socketproxy_destination_sent_bytes_total", d)] for d in self.dest_names]
            accepted = got[("socketproxy_sources_accepted_total", None)]
            checks.append(("metrics totals exact", churn["connections"] <= accepted <= churn["connections"] + churn["failed"],
                           "accepted %d, received %d, sent per destination %s (clients: %d connections, %d bytes)" % (
                               got[("socketproxy_sources_accepted_total", None)],
                               got[("socketproxy_received_bytes_total", None)], sent, churn["connections"],
                               churn["bytes"])))
            checks[-1] = (checks[-1][0], checks[-1][1] and all(x == churn["bytes"] for x in sent) and
                          got[("socketproxy_received_bytes_total", None)] == churn["bytes"], checks[-1][2])
        rss = [s["rss"] for s in samples]
        third = max(1, len(rss) // 3)
        early, late = statistics.median(rss[:third]), statistics.median(rss[-third:])
        first = rss[0] if rss else base["rss"]
        checks.append(("main's memory flat (+%d KiB)" % a.rss_margin_kib,
                       late - early <= margin and final["rss"] - first <= margin,
                       "start %.2f MiB, first sample %.2f, early median %.2f, late median %.2f, end %.2f" % (
                           base["rss"] / 2**20, first / 2**20, early / 2**20, late / 2**20, final["rss"] / 2**20)))
        procs = [s["procs"] for s in samples]
        early_p, late_p = statistics.median(procs[:third]), statistics.median(procs[-third:])
        alone = 2 if a.metrics else 1  # main, and its metrics process
        checks.append(("process count flat, no zombie", late_p <= early_p + a.concurrency and final["procs"] == alone and
                       not peaks["lingering"] and not final["zombies"],
                       "early median %g, late median %g, peak %d; zombies lingering %d; end %d (main alone)" % (
                           early_p, late_p, peaks["procs"], peaks["lingering"], final["procs"])))
        checks.append(("every byte reached both destinations", all(r == churn["bytes"] for r in received),
                       "%d connections (%d failed) sent %d bytes; destinations got %s" % (
                           churn["connections"], churn["failed"], churn["bytes"], received)))
        tracebacks = open(log_path, errors="replace").read().count("Traceback")
        checks.append(("proxy: no traceback, SIGTERM exits 0", proxy_ok and not tracebacks,
                       "exit %s, %d tracebacks in the log" % (self.proxy.returncode, tracebacks)))
        print()
        for name, ok, detail in checks:
            print("%-40s %-4s %s" % (name, "ok" if ok else "FAIL", detail))
        ok = all(c[1] for c in checks)
        print("verdict: %s" % ("flat: PASS" if ok else "FAIL (log kept: %s)" % log_path))
        return ok

    def cleanup(self):
        for popen in self.popens:
            if popen.returncode is None:
                try:
                    procs = [psutil.Process(popen.pid)] + psutil.Process(popen.pid).children(recursive=True)
                except psutil.Error:
                    procs = []
                for proc in reversed(procs):
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                self.wait_exit(popen, 5)
        kill_descendants(self.reap)
        for popen in self.popens:
            if popen.stdout:
                popen.stdout.close()
        left = psutil.Process().children(recursive=True)
        if left:
            print("soak: left running: %s" % [p.pid for p in left])
        return not left


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--interval", type=float, default=float(os.environ.get("SOAK_INTERVAL", "30")))
    parser.add_argument("--rate", type=int, default=20, help="connections per second in all")
    parser.add_argument("--concurrency", type=int, default=6, help="clients at once")
    parser.add_argument("--rss-margin-kib", type=int, default=512)
    parser.add_argument("--role", choices=["sink", "churn"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--stats")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="run the proxy without --metrics")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.role == "sink":
        return run_sink(args)
    if args.role == "churn":
        return run_churn(args)
    soak = Soak(args)
    signal.signal(signal.SIGTERM, lambda signum, _: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    ok = False
    try:
        ok = soak.run()
    finally:
        clean = soak.cleanup()
    if ok and clean:
        import shutil
        shutil.rmtree(soak.workdir, ignore_errors=True)
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
