"""--spare-groups: groups forked ahead of their sources and kept for the next, with the tree, fate
sharing, stops and reloads as for groups forked per source."""
import os
import re
import signal
import time

import psutil
import pytest

from support import (AS_NOBODY, DUAL_NAME, alive, by_role, connect_source, dual_address_prefix,
                     nobody_can_run_the_proxy, scaled, sees_close, tree, wait_for_log, wait_until)


def spares(px):
    """The waiting groups: {receiver pid: [its forwarders]}, every one of them titled spare."""
    found = {}
    for proc in by_role(px.pid, "receiver"):
        try:
            if "(spare)" in " ".join(proc.cmdline()):
                found[proc.pid] = proc.children()
        except psutil.NoSuchProcess:
            pass
    return found


def ready_spares(px, count, dests):
    """Wait for count spare groups whose forwarders are all there and titled spare; return them."""
    def ready():
        found = spares(px)
        if len(found) != count:
            return None
        for kids in found.values():
            titles = [" ".join(kid.cmdline()) for kid in kids]
            if len(kids) != dests or not all("forwarder (spare)" in title for title in titles):
                return None
        return found
    return wait_until(ready, scaled(20))


def fds_of(procs):
    return {proc.pid: proc.num_fds() for proc in procs}


def test_spares_serve_source_after_source_with_every_byte_and_no_descriptor_left(proxy, recorder):
    d1, d2 = recorder(), recorder()
    px = proxy([f"127.0.0.1:{d1.port}", f"127.0.0.1:{d2.port}"], "--spare-groups", "2")
    waiting = ready_spares(px, 2, 2)
    members = [psutil.Process(pid) for pid in waiting] + [kid for kids in waiting.values() for kid in kids]
    before = fds_of(members)
    # Only the spares' processes under main: nothing is forked for these sources.
    assert len(tree(px.pid)) == 1 + len(members)
    sent = []
    for n in range(6):
        source = connect_source(px.port)
        data = b"source %d line %d\n" % (n, n) * (200 + 1000 * n)
        sent.append(data)
        source.sendall(data)
        if n == 0:  # while it is served: its receiver and forwarders are titled with it
            peer = "127.0.0.1:%d" % source.getsockname()[1]
            wait_until(lambda: len([p for p in tree(px.pid) if peer in " ".join(p.cmdline())]) == 3)
        source.close()
        wait_until(lambda: d1.closed_count() == n + 1 and d2.closed_count() == n + 1, scaled(20))
    assert d1.streams() == sent and d2.streams() == sent
    ready_spares(px, 2, 2)
    assert sorted(p.pid for p in alive(members)) == sorted(before)  # the same processes served all six
    assert fds_of(members) == before  # and hold what they held before the first
    served_by = {int(m.group(1)) for m in wait_for_log(px.log_path, r"\[(\d+)\] src=\S+ accepted", count=6)}
    assert served_by <= set(waiting)
    assert "WARNING" not in px.log() and "ERROR" not in px.log()


def test_a_forwarder_killed_mid_source_ends_the_group_and_a_spare_killed_waiting_is_replaced(proxy, recorder):
    d1, d2 = recorder(), recorder()
    px = proxy([f"127.0.0.1:{d1.port}", f"127.0.0.1:{d2.port}"], "--spare-groups", "2")
    ready_spares(px, 2, 2)
    source = connect_source(px.port)
    source.sendall(b"first\n")
    wait_until(lambda: d1.open_count() == 1 and d2.open_count() == 1)
    peer = "127.0.0.1:%d" % source.getsockname()[1]
    [serving] = [p for p in by_role(px.pid, "receiver") if peer in " ".join(p.cmdline())]
    group = [serving] + serving.children()
    group[1].send_signal(signal.SIGKILL)  # fate sharing, as for a group forked for its source
    wait_until(lambda: not alive(group) and sees_close(source), scaled(2.0))
    wait_for_log(px.log_path, r"receiver %d for %s ended: killed by SIGKILL; its group is killed" % (serving.pid, peer))
    # A waiting group whose forwarder dies is killed whole, said once, and replaced: not a source.
    spare_pid, kids = next(iter(spares(px).items()))
    kids[0].send_signal(signal.SIGKILL)
    wait_until(lambda: spare_pid not in spares(px) and not alive(kids), scaled(2.0))
    wait_for_log(px.log_path, r"spare group %d ended: killed by SIGKILL" % spare_pid)
    ready_spares(px, 2, 2)
    assert "0 sources" in " ".join(psutil.Process(px.pid).cmdline())
    again = connect_source(px.port)
    again.sendall(b"again\n")
    again.close()
    wait_until(lambda: b"again\n" in d1.streams() and b"again\n" in d2.streams())


def test_a_reload_ends_the_spares_and_forks_them_with_the_new_destinations(proxy, recorder, tmp_path):
    d1, d2 = recorder(), recorder()
    config = tmp_path / "proxy.toml"
    config.write_text('destinations = ["127.0.0.1:%d"]\nspare_groups = 1\n' % d1.port)
    px = proxy([], "--config", str(config))
    [old] = ready_spares(px, 1, 1)
    config.write_text('destinations = ["127.0.0.1:%d", "127.0.0.1:%d"]\nspare_groups = 1\n' % (d1.port, d2.port))
    os.kill(px.pid, signal.SIGHUP)
    [new] = ready_spares(px, 1, 2)
    assert new != old and not psutil.pid_exists(old)
    source = connect_source(px.port)
    source.sendall(b"after the reload\n")
    source.close()
    wait_until(lambda: d2.streams() == [b"after the reload\n"] and d1.streams() == [b"after the reload\n"])


def test_stops_end_every_spare_in_order(proxy, recorder):
    """SIGTERM to main, and SIGTERM to every process at once (systemd): exit 0, nothing left, no error."""
    for everyone in (False, True):
        d1 = recorder()
        px = proxy([f"127.0.0.1:{d1.port}"], "--spare-groups", "3")
        ready_spares(px, 3, 1)
        source = connect_source(px.port)
        source.sendall(b"x" * 100000)
        wait_until(lambda: d1.total() == 100000)
        procs = tree(px.pid)
        started = time.monotonic()
        for proc in procs if everyone else procs[:1]:
            proc.send_signal(signal.SIGTERM)
        assert px.proc.wait(scaled(5)) == 0
        assert time.monotonic() - started < scaled(3)
        wait_until(lambda: not alive(procs), scaled(3))
        assert sees_close(source)
        assert "ERROR" not in px.log() and "WARNING" not in px.log() and "Traceback" not in px.log(), px.log()


def test_a_group_ends_after_a_thousand_sources_and_no_source_is_lost_to_its_end(proxy, recorder):
    """Apache's MaxConnectionsPerChild: a group serves 1,000 sources, then exits; main must not hand
    it another meanwhile (a source sent to a group that exits is lost)."""
    d1 = recorder()
    px = proxy([f"127.0.0.1:{d1.port}"], "--spare-groups", "1")
    [first] = ready_spares(px, 1, 1)
    for n in range(1003):
        source = connect_source(px.port)
        source.sendall(b"%d\n" % n)
        source.close()
        wait_until(lambda: d1.closed_count() == n + 1, scaled(20), interval=0.0005)
    assert [int(s) for s in d1.streams()] == list(range(1003))
    [second] = ready_spares(px, 1, 1)
    assert second != first and not psutil.pid_exists(first)
    assert "WARNING" not in px.log() and "ERROR" not in px.log()


def test_a_reload_reaches_a_source_handed_to_a_spare_that_had_not_woken_yet(proxy, recorder, tmp_path):
    """The SIGHUP and the source come together to a waiting group (stopped here so they do): the
    destination the reload adds gets the source's stream."""
    d1, d2 = recorder(), recorder()
    config = tmp_path / "proxy.toml"
    config.write_text('destinations = ["127.0.0.1:%d"]\nspare_groups = 1\n' % d1.port)
    px = proxy([], "--config", str(config))
    [spare] = ready_spares(px, 1, 1)
    os.kill(spare, signal.SIGSTOP)
    try:
        source = connect_source(px.port)
        source.sendall(b"before\n")
        wait_until(lambda: "1 sources" in " ".join(psutil.Process(px.pid).cmdline()))
        config.write_text('destinations = ["127.0.0.1:%d", "127.0.0.1:%d"]\nspare_groups = 1\n' % (d1.port, d2.port))
        os.kill(px.pid, signal.SIGHUP)
        wait_for_log(px.log_path, "reloaded the configuration")
    finally:
        os.kill(spare, signal.SIGCONT)
    wait_for_log(px.log_path, r"destination 127.0.0.1:%d added by a reload: forwarder \d+ joins" % d2.port)
    source.sendall(b"after\n")
    source.close()
    wait_until(lambda: d1.streams() == [b"before\nafter\n"] and d2.streams() == [b"after\n"])


def test_as_nobody_spares_stream_as_groups_forked_for_their_source(proxy, recorder):
    """The unprivileged user the unit runs as: spares hold no pipe of the budget while they wait, and
    a source they serve gets pipes that grow as any group's do."""
    why = nobody_can_run_the_proxy()
    if why:
        pytest.skip(why)
    d1, d2 = recorder(), recorder()
    px = proxy([f"127.0.0.1:{d1.port}", f"127.0.0.1:{d2.port}"], "--spare-groups", "3", prefix=AS_NOBODY)
    ready_spares(px, 3, 2)
    assert all(proc.uids().effective == 65534 for proc in tree(px.pid))
    data = os.urandom(1 << 20) * 24
    for _ in range(2):
        source = connect_source(px.port)
        source.sendall(data)
        source.close()
    wait_until(lambda: d1.streams() == d2.streams() == [data, data], scaled(60), interval=0.01)
    assert "refused" not in px.log() and "WARNING" not in px.log()


def test_a_storm_of_sources_that_stay_gets_groups_at_once_and_the_spares_settle_back(proxy, recorder):
    """Twenty sources at once that stay: two take the spares, the rest get groups forked for them
    without waiting on each other; once they leave, two groups wait again and the rest end."""
    d1, d2 = recorder(), recorder()
    px = proxy([f"127.0.0.1:{d1.port}", f"127.0.0.1:{d2.port}"], "--spare-groups", "2")
    ready_spares(px, 2, 2)
    sources = [connect_source(px.port) for _ in range(20)]
    for n, source in enumerate(sources):
        source.sendall(b"source %d\n" % n)
    wait_until(lambda: d1.open_count() == d2.open_count() == 20, scaled(15))
    assert len(by_role(px.pid, "receiver")) == 20
    for source in sources:
        source.close()
    wait_until(lambda: d1.closed_count() == d2.closed_count() == 20, scaled(15))
    ready_spares(px, 2, 2)
    wait_until(lambda: len(tree(px.pid)) == 1 + 2 * 3, scaled(10))
    assert sorted(d1.streams()) == sorted(d2.streams()) == sorted(b"source %d\n" % n for n in range(20))
    assert "WARNING" not in px.log() and "ERROR" not in px.log()


def test_a_spare_serves_a_name_of_two_addresses_and_a_10_kB_s_reader_source_after_source(proxy, recorder, tmp_path):
    """Deployed conditions through one spare group: a destination named by a name that resolves to
    ::1 (refused) then 127.0.0.1 (a forwarder resolves it in a thread, which must be over before the
    group waits again), a reader at 10 kB/s beside a fast one, and systemd's stop (SIGTERM to every
    process at once) while a source is served."""
    prefix = dual_address_prefix(tmp_path)
    slow, fast = recorder(read_rate=10000), recorder()
    px = proxy([f"{DUAL_NAME}:{slow.port}", f"127.0.0.1:{fast.port}"], "--spare-groups", "1", prefix=prefix)
    [group] = ready_spares(px, 1, 2)
    sent = [os.urandom(4000 * (1 + n)) for n in range(3)]
    for n, data in enumerate(sent):
        source = connect_source(px.port)
        source.sendall(data)
        source.close()
        wait_until(lambda: slow.closed_count() == fast.closed_count() == n + 1, scaled(20))
    assert slow.streams() == fast.streams() == sent
    served_by = {int(m.group(1)) for m in wait_for_log(px.log_path, r"\[(\d+)\] src=\S+ accepted", count=3)}
    assert served_by == {group}
    wait_for_log(px.log_path, r"connected to %s:%d \(127\.0\.0\.1\)$" % (re.escape(DUAL_NAME), slow.port), count=3)
    source = connect_source(px.port)
    source.sendall(b"x" * 20000)
    wait_until(lambda: fast.total() == sum(map(len, sent)) + 20000)
    procs = tree(px.pid)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert px.proc.wait(scaled(5)) == 0
    wait_until(lambda: not alive(procs), scaled(3))
    assert "ERROR" not in px.log() and "Traceback" not in px.log(), px.log()
