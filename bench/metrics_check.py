"""make metrics-check: a live scrape of --metrics, validated by promtool and prometheus-client.

Starts a fake destination (dst-1) and names a second that never listens (dst-2: down all along),
the proxy with --metrics, and three fake sources; after a few seconds it prints the process
titles (ps) and the scrape, checks the scrape with `promtool check metrics` (when installed) and
with prometheus-client's parser, then ends everything it started. Exit 1 on any problem.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from common import become_subreaper, free_port, kill_descendants, reap_exited

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(argv, log):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def scrape(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def main():
    become_subreaper()
    up_port, down_port, listen_port, metrics_port = (free_port() for _ in range(4))
    problems = []
    log = open(os.devnull, "wb")
    proxy_log = tempfile.TemporaryFile()  # the proxy's log: printed when it fails to start
    procs = [start(["-m", "fakes.destination", "--port", str(up_port)], log)]
    proxy = start(["socketproxy.py", "--listen-host", "127.0.0.1", "--listen-port", str(listen_port),
                   "--metrics", "127.0.0.1:%d" % metrics_port, "--framing", "line", "--retry-interval", "1",
                   "127.0.0.1:%d" % up_port, "127.0.0.1:%d" % down_port], proxy_log)
    procs.append(proxy)
    try:
        if not wait_for(lambda: scrape(metrics_port) is not None):
            proxy_log.seek(0)
            problems.append("no scrape from the proxy's --metrics; its log:\n" + proxy_log.read().decode())
            return report(problems)
        procs += [start(["-m", "fakes.source", "--port", str(listen_port), "--interval", "0.05", "--id", "src-%d" % i],
                        log) for i in range(3)]
        wait_for(lambda: "socketproxy_sources_active 3.0" in (scrape(metrics_port) or ""))
        time.sleep(3)  # let the counters move: the titles and the table refresh once a second
        listing = subprocess.run(["ps", "-ww", "-eo", "pid,pgid,args"], capture_output=True, text=True).stdout
        mine = {p.pid for p in psutil.Process(proxy.pid).children(recursive=True)} | {proxy.pid}
        print("$ ps -eo pid,pgid,args | grep socketproxy:   (this run's processes)")
        for line in listing.splitlines():
            fields = line.split(None, 2)
            if len(fields) == 3 and fields[0].isdigit() and int(fields[0]) in mine and "socketproxy:" in line:
                print(line.rstrip())
        text = scrape(metrics_port)
        print("\n$ curl -s http://127.0.0.1:%d/metrics\n%s" % (metrics_port, text))
        families = {f.name for f in text_string_to_metric_families(text)}
        for name in ("socketproxy_sources_accepted", "socketproxy_destination_sent_bytes",
                     "socketproxy_destination_connections_up", "socketproxy_destination_dropped_records"):
            if name not in families:
                problems.append("the scrape has no %s" % name)
        print("prometheus-client's parser: %d metric families read" % len(families))
        promtool = shutil.which("promtool")
        if promtool:
            result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            print("promtool check metrics: exit %d %s" % (result.returncode, (result.stdout + result.stderr).strip()))
            if result.returncode or (result.stdout + result.stderr).strip():
                problems.append("promtool check metrics found problems")
        else:
            print("metrics-check: promtool is not installed (Debian's prometheus package): its check is skipped")
    finally:
        for proc in procs[2:] + procs[:1]:
            proc.terminate()
        proxy.send_signal(signal.SIGTERM)
        if not wait_for(lambda: proxy.poll() is not None, 10):
            problems.append("the proxy did not exit on SIGTERM")
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        kill_descendants(reap_exited)
    return report(problems)


def report(problems):
    for problem in problems:
        print("metrics-check: FAILED: %s" % problem)
    if not problems:
        print("metrics-check: passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
