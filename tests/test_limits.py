"""Limits and access: --max-connections, --allow, --idle-timeout, keepalive on sources."""

from support import by_role, connect_source, sees_close, stays_true, wait_for_log, wait_until


def test_max_connections_refuses_extra_sources(proxy, recorder):
    """Sources beyond --max-connections are closed at once with a warning; the others are unaffected."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--max-connections", "2")
    served = [connect_source(px.port) for _ in range(2)]
    wait_until(lambda: dest.open_count() == 2)
    extra = connect_source(px.port)
    wait_until(lambda: sees_close(extra))
    wait_for_log(px.log_path, r"WARNING .*refused 127.0.0.1:%d: already serving --max-connections 2"
                 % extra.getsockname()[1])
    for i, s in enumerate(served):
        s.sendall(b"ok %d" % i)
        s.close()
    wait_until(lambda: sorted(dest.streams()) == [b"ok 0", b"ok 1"] and dest.closed_count() == 2)
    # Once they are gone, a new source is served again.
    wait_until(lambda: not by_role(px.pid, "receiver"))
    later = connect_source(px.port)
    later.sendall(b"later")
    wait_until(lambda: b"later" in dest.streams())


def test_allow_refuses_sources_outside_the_networks(proxy, recorder):
    """A source outside --allow is closed at once and logged, and what it sends goes nowhere; one
    inside is served (by a second proxy, started after: the only connection the destination ever gets)."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--allow", "10.0.0.0/8", "--allow", "192.168.0.0/16")
    outsider = connect_source(px.port)
    try:
        outsider.sendall(b"outside")
    except OSError:
        pass  # already closed by the proxy
    wait_until(lambda: sees_close(outsider))
    outsider.close()
    wait_for_log(px.log_path, r"refused 127.0.0.1:\d+: not in --allow")
    px2 = proxy(["127.0.0.1:%d" % dest.port], "--allow", "127.0.0.0/8")
    insider = connect_source(px2.port)
    insider.sendall(b"inside")
    wait_until(lambda: b"inside" in dest.streams(), message=lambda: "the allowed source was not served: %r\n%s"
               % (dest.streams(), px2.log()))
    assert dest.streams() == [b"inside"], "the refused source reached the destination: %r" % dest.streams()


def test_idle_timeout_closes_silent_sources(proxy, recorder):
    """A source that sends nothing for --idle-timeout is closed; a chatty one is not."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--idle-timeout", "1")
    silent = connect_source(px.port)
    chatty = connect_source(px.port)
    wait_until(lambda: chatty.sendall(b".") is None and sees_close(silent), 10, interval=0.2)
    wait_for_log(px.log_path, r"idle timeout")
    assert stays_true(lambda: chatty.sendall(b".") is None and not sees_close(chatty), 1.5, interval=0.2)


def test_sources_get_tcp_keepalive(proxy, recorder):
    """Sources get TCP keepalive, from the listening socket whose options they inherit (seen in
    /proc/net/tcp's timer column)."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port])
    source = connect_source(px.port)
    port = source.getsockname()[1]

    def keepalive_timer():
        for line in open("/proc/net/tcp").read().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == px.port and int(remote.split(":")[1], 16) == port:
                return fields[5].startswith("02:")  # timer 2 = keepalive
        return False

    wait_until(keepalive_timer, 10)
    source.close()
