"""Live titles and Prometheus metrics: what ps and a scrape show, and totals exact to the log."""
import re
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

from support import ROOT, by_role, connect_source, free_port, scrape, stays_true, wait_until


def title(proc):
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.NoSuchProcess:
        return ""


def metric(values, name, **labels):
    return values[(name, tuple(sorted(labels.items())))]


def test_titles_say_which_destination_is_down_since_when_and_what_moved(proxy, recorder):
    up = recorder()
    down_port = free_port()
    px = proxy(["127.0.0.1:%d" % up.port, "127.0.0.1:%d" % down_port])
    source = connect_source(px.port)
    peer = "127.0.0.1:%d" % source.getsockname()[1]
    source.sendall(b"x" * 5000)
    wait_until(lambda: up.total() == 5000)
    main = psutil.Process(px.pid)
    wait_until(lambda: title(main).endswith("| 1 sources"), message=lambda: title(main))
    fwd_up = "socketproxy: forwarder %s -> 127.0.0.1:%d | up since " % (peer, up.port)
    fwd_down = "socketproxy: forwarder %s -> 127.0.0.1:%d | down since " % (peer, down_port)
    titles = lambda: [title(p) for p in by_role(px.pid, "forwarder") + by_role(px.pid, "receiver")]
    wait_until(lambda: any(t.startswith(fwd_up) and "sent 5.0 KB" in t for t in titles()), message=titles)
    wait_until(lambda: any(t.startswith(fwd_down) and "dropped 0 B" in t for t in titles()), message=titles)
    receiver_title = re.compile(r"socketproxy: receiver %s \| received 5\.0 KB; 127\.0\.0\.1:%d up since "
                                r"\d{4}-\d\d-\d\dT[\d:]{8}, 127\.0\.0\.1:%d down since " % (peer, up.port, down_port))
    wait_until(lambda: any(receiver_title.match(t) for t in titles()), message=titles)
    source.close()
    wait_until(lambda: title(main).endswith("| 0 sources"), message=lambda: title(main))


def done_totals(log):
    """Per destination, the sums of the forwarder done lines; and the received total."""
    sent, dropped = {}, {}
    for dest, s, d in re.findall(r"dst=(\S+) forwarder done: sent (\d+) bytes, dropped (\d+) bytes", log):
        sent[dest] = sent.get(dest, 0) + int(s)
        dropped[dest] = dropped.get(dest, 0) + int(d)
    received = sum(int(n) for n in re.findall(r"received (\d+) bytes from source", log))
    return sent, dropped, received


def test_metrics_totals_equal_the_log_after_kills_and_restarts(proxy, recorder):
    """Sources come and go while one destination is killed and restarted twice: once every group has
    ended, every counter of the scrape is the sum of the log's lines, and the parser reads it all."""
    steady, flaky = recorder(), recorder()
    flaky_port = flaky.port
    metrics_port = free_port()
    px = proxy(["127.0.0.1:%d" % steady.port, "127.0.0.1:%d" % flaky_port], "--metrics",
               "127.0.0.1:%d" % metrics_port, "--buffer", "0", "--retry-interval", "0.2")
    wait_until(lambda: "serving metrics" in px.log())
    sources = []
    for round_ in range(3):
        sources += [connect_source(px.port) for _ in range(3)]
        for sock in sources:
            sock.sendall(b"%d" % round_ * 20000 + b"\n")
        wait_until(lambda: flaky.open_count() == len(sources))
        flaky.stop()  # down: what is sent now is dropped for it
        for sock in sources:
            sock.sendall(b"d" * 30000)
        flaky = recorder(port=flaky_port)  # back: every forwarder reconnects
        wait_until(lambda: flaky.open_count() == len(sources), 30)
        for sock in sources[:3]:
            sock.close()
        del sources[:3]
    for sock in sources:
        sock.close()
    main = psutil.Process(px.pid)
    wait_until(lambda: not by_role(px.pid, "receiver") and not by_role(px.pid, "forwarder"), 30)
    wait_until(lambda: metric(scrape(metrics_port), "socketproxy_sources_active") == 0)
    values = scrape(metrics_port)
    sent, dropped, received = done_totals(px.log())
    assert metric(values, "socketproxy_sources_accepted_total") == 9
    assert metric(values, "socketproxy_received_bytes_total") == received > 0
    for dest in ("127.0.0.1:%d" % steady.port, "127.0.0.1:%d" % flaky_port):
        assert metric(values, "socketproxy_destination_sent_bytes_total", destination=dest) == sent[dest]
        assert metric(values, "socketproxy_destination_dropped_bytes_total", destination=dest) == dropped[dest]
        assert sent[dest] + dropped[dest] == received
        assert metric(values, "socketproxy_destination_connections_up", destination=dest) == 0
    flaky_dest = "127.0.0.1:%d" % flaky_port
    assert dropped[flaky_dest] > 0
    reconnected = len(re.findall(r"dst=%s connected to \S+ after \d+ attempts" % re.escape(flaky_dest), px.log()))
    assert metric(values, "socketproxy_destination_reconnects_total", destination=flaky_dest) == reconnected > 0
    assert metric(values, "socketproxy_group_kills_total") == 0
    assert main.is_running()


def test_refused_sources_are_counted_by_reason(proxy, recorder):
    dest = recorder()
    metrics_port = free_port()
    px = proxy(["127.0.0.1:%d" % dest.port], "--metrics", "127.0.0.1:%d" % metrics_port,
               "--max-connections", "1", "--allow", "127.0.0.0/8")
    wait_until(lambda: "serving metrics" in px.log())
    first = connect_source(px.port)
    wait_until(lambda: dest.open_count() == 1)
    extra = [connect_source(px.port) for _ in range(3)]
    wait_until(lambda: metric(scrape(metrics_port), "socketproxy_sources_refused_total", reason="max_connections") == 3)
    values = scrape(metrics_port)
    assert metric(values, "socketproxy_sources_accepted_total") == 1
    assert metric(values, "socketproxy_sources_active") == 1
    assert metric(values, "socketproxy_sources_refused_total", reason="not_allowed") == 0
    assert metric(values, "socketproxy_destination_info", destination="127.0.0.1:%d" % dest.port,
                  role="destination") == 1
    for sock in extra + [first]:
        sock.close()


def test_a_busy_metrics_port_is_one_line_and_exit_1():
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    result = subprocess.run([sys.executable, ROOT + "/socketproxy.py", "--listen-host", "127.0.0.1", "--listen-port",
                             str(free_port()), "--metrics", "127.0.0.1:%d" % port, "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30)
    busy.close()
    assert result.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:%d: Address already in use" % port in result.stderr
    assert "Traceback" not in result.stderr


def test_promtool_accepts_a_live_scrape():
    """make metrics-check's script: one destination up, one down, three sources; promtool and the parser."""
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (Debian's prometheus package; make metrics-check installs it)")
    result = subprocess.run([sys.executable, ROOT + "/bench/metrics_check.py"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "promtool check metrics: exit 0" in result.stdout
    assert re.search(r"forwarder \S+ -> \S+ \| down since .* kept [\d.]+ [KM]?B", result.stdout), result.stdout


def test_metrics_name_the_primary(proxy, recorder):
    primary, mirror = recorder(), recorder()
    metrics_port = free_port()
    proxy(["127.0.0.1:%d" % primary.port, "127.0.0.1:%d" % mirror.port], "--primary", "--metrics",
          "127.0.0.1:%d" % metrics_port)
    wait_until(lambda: scrape_or_none(metrics_port) is not None)
    values = scrape(metrics_port)
    assert metric(values, "socketproxy_destination_info", destination="127.0.0.1:%d" % primary.port,
                  role="primary") == 1
    assert metric(values, "socketproxy_destination_info", destination="127.0.0.1:%d" % mirror.port,
                  role="mirror") == 1


def scrape_or_none(port):
    try:
        return scrape(port)
    except OSError:
        return None


def test_an_idle_group_wakes_every_few_seconds_not_every_second(proxy, recorder):
    """Titles and counters are refreshed every second while they change; once a refresh finds nothing
    changed (a source that sends nothing) the receiver and its forwarders refresh every 5 s, so many
    idle sources do not wake every process every second. Over 12 idle seconds each process of the
    group wakes (blocks again: a voluntary context switch) at most 5 times, against 12 when they
    refreshed every second; the titles follow again once data flows."""
    dests = [recorder(), recorder()]
    px = proxy(["127.0.0.1:%d" % d.port for d in dests])
    source = connect_source(px.port)
    source.sendall(b"hello\n")

    def group_says(text):
        procs = by_role(px.pid, "receiver") + by_role(px.pid, "forwarder")
        titles = [" ".join(p.cmdline()) for p in procs]
        return procs if len(procs) == 3 and all(text in t for t in titles) else None

    procs = wait_until(lambda: group_says(" 6 B"))
    start = {p.pid: p.num_ctx_switches().voluntary for p in procs}

    def wakes():
        return {p.pid: p.num_ctx_switches().voluntary - start[p.pid] for p in procs}

    assert stays_true(lambda: max(wakes().values()) <= 5, 12), wakes()
    source.sendall(b"again\n")
    wait_until(lambda: group_says(" 12 B"))
    source.close()


def test_connection_gauges_count_each_destination_up_or_down(proxy, recorder):
    """One source, one destination up and one down: connections_up and _down are 1/0 for the first,
    0/1 for the second."""
    up, down_port = recorder(), free_port()
    metrics_port = free_port()
    up_dest, down_dest = "127.0.0.1:%d" % up.port, "127.0.0.1:%d" % down_port
    px = proxy([up_dest, down_dest], "--metrics", "127.0.0.1:%d" % metrics_port, "--retry-interval", "0.5")
    wait_until(lambda: "serving metrics" in px.log())
    source = connect_source(px.port)
    wanted = {(up_dest, "up"): 1, (up_dest, "down"): 0, (down_dest, "up"): 0, (down_dest, "down"): 1}

    def gauges():
        values = scrape(metrics_port)
        return {(dest, state): metric(values, "socketproxy_destination_connections_" + state, destination=dest)
                for dest, state in wanted}

    wait_until(lambda: gauges() == wanted, 30, message=lambda: "gauges %r, expected %r" % (gauges(), wanted))
    source.close()
