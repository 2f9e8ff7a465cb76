"""Data: every byte of every source reaches every destination, in order, and nothing comes back."""
import os
import socket

import psutil

from support import by_role, connect_source, send_in_thread, tree, wait_until, wait_for_log


def test_two_sources_two_destinations_exact_bytes_and_six_sockets(proxy, recorder):
    """When 2 sources send 1 MB each to 2 destinations, each destination gets each stream exactly."""
    d1, d2 = recorder(), recorder()
    px = proxy(["127.0.0.1:%d" % d1.port, "127.0.0.1:%d" % d2.port])
    payloads = [os.urandom(1 << 20), os.urandom(1 << 20)]
    sources = [connect_source(px.port) for _ in payloads]
    # Both sources are connected and served: 2 receivers, 4 forwarders, 6 sockets.
    wait_until(lambda: d1.open_count() == 2 and d2.open_count() == 2)
    conns = [c for p in tree(px.pid)[1:] for c in p.net_connections("tcp") if c.status == "ESTABLISHED"]
    incoming = [c for c in conns if c.laddr.port == px.port]
    outgoing = [c for c in conns if c.raddr and c.raddr.port in (d1.port, d2.port)]
    assert (len(incoming), len(outgoing)) == (2, 4), conns
    assert len(by_role(px.pid, "receiver")) == 2 and len(by_role(px.pid, "forwarder")) == 4
    threads = [send_in_thread(s, p) for s, p in zip(sources, payloads)]
    for dest in (d1, d2):
        wait_until(lambda: dest.closed_count() == 2, 30, message=lambda: "got %d bytes" % dest.total())
        assert sorted(dest.streams()) == sorted(payloads)
    for t in threads:
        t.join(10)


def test_every_byte_value_survives(proxy, recorder):
    """Binary data with every byte value arrives unchanged."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port])
    payload = bytes(range(256)) * 4096
    source = connect_source(px.port)
    source.sendall(payload)
    source.close()
    wait_until(lambda: dest.closed_count() == 1)
    assert dest.streams() == [payload]


def test_source_close_delivers_everything_then_eof(proxy, recorder):
    """When a source sends N bytes and closes at once, all N reach every destination, then EOF."""
    dests = [recorder() for _ in range(3)]
    px = proxy(["127.0.0.1:%d" % d.port for d in dests])
    payload = os.urandom(3_000_001)
    source = connect_source(px.port)  # sent the moment it connects: before forwarders connect
    source.sendall(payload)
    source.close()
    for dest in dests:
        wait_until(lambda: dest.closed_count() == 1, 30)
        assert dest.streams() == [payload]
    wait_for_log(px.log_path, r"group ended: source closed; received 3000001 bytes")
    wait_until(lambda: not by_role(px.pid, "receiver") and not by_role(px.pid, "forwarder"))


def test_nothing_goes_back_to_the_source(proxy, recorder):
    """What a destination sends back is discarded: the source reads nothing."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port])
    source = connect_source(px.port)
    source.sendall(b"hello\n")
    wait_until(lambda: dest.total() == 6)
    with dest.lock:
        dest.connections[0]["sock"].sendall(b"reply" * 1000)
    source.settimeout(0.5)
    try:
        got = source.recv(100)
    except socket.timeout:
        got = None
    assert got is None
    source.sendall(b"more\n")
    wait_until(lambda: dest.streams() == [b"hello\nmore\n"])


def test_hostname_and_ipv6_destinations(proxy, recorder):
    """localhost and [::1] destinations are resolved and served."""
    v4 = recorder()
    v6 = recorder(host="::1", family=socket.AF_INET6)
    px = proxy(["localhost:%d" % v4.port, "[::1]:%d" % v6.port])
    source = connect_source(px.port)
    source.sendall(b"x" * 1000)
    source.close()
    for dest in (v4, v6):
        wait_until(lambda: dest.streams() == [b"x" * 1000] and dest.closed_count() == 1,
                   message=lambda: "%r closed %d:\n%s" % ([len(s) for s in dest.streams()], dest.closed_count(),
                                                          px.log()))


def test_destination_named_twice_gets_two_connections(proxy, recorder):
    """A destination named twice gets two connections, with a warning at start."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port] * 2)
    wait_for_log(px.log_path, r"WARNING .*named more than once")
    source = connect_source(px.port)
    source.sendall(b"twice")
    source.close()
    wait_until(lambda: dest.streams() == [b"twice", b"twice"])


def test_receivers_lead_groups_and_titles_name_the_peers(proxy, recorder):
    """ps shows which PIDs serve which connection; each receiver leads its group; no child listens."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port])
    source = connect_source(px.port)
    peer = "127.0.0.1:%d" % source.getsockname()[1]
    wait_until(lambda: dest.open_count() == 1)
    [rec] = by_role(px.pid, "receiver")
    [fwd] = by_role(px.pid, "forwarder")
    assert " ".join(rec.cmdline()).strip().startswith("socketproxy: receiver %s | received " % peer)
    assert " ".join(fwd.cmdline()).strip().startswith("socketproxy: forwarder %s -> 127.0.0.1:%d | " % (peer, dest.port))
    assert os.getpgid(rec.pid) == rec.pid == os.getpgid(fwd.pid)
    assert "socketproxy: main" in " ".join(psutil.Process(px.pid).cmdline())
    for proc in (rec, fwd):
        assert not [c for c in proc.net_connections() if c.status == "LISTEN"]
    # The forwarder holds no source socket, only its destination connection and its pipe.
    assert [c.raddr.port for c in fwd.net_connections()] == [dest.port]
    source.close()


def open_fds(proc):
    """Kinds of the descriptors proc holds above stdio, from /proc: sorted like ['pipe', 'socket']."""
    kinds = []
    for name in os.listdir("/proc/%d/fd" % proc.pid):
        if int(name) > 2:
            target = os.readlink("/proc/%d/fd/%s" % (proc.pid, name))
            kinds.append(target.split(":")[0] if ":" in target else target.split("/")[-1])
    return sorted(kinds)


def test_each_process_holds_only_its_own_descriptors(proxy, recorder):
    """After fork each process holds only what it needs: no listener, no sibling's pipe, no stray source."""
    d1, d2 = recorder(), recorder()
    px = proxy(["127.0.0.1:%d" % d1.port, "127.0.0.1:%d" % d2.port])
    source = connect_source(px.port)
    wait_until(lambda: d1.open_count() == 1 and d2.open_count() == 1)
    [rec] = by_role(px.pid, "receiver")
    # receiver: source socket, lifeline read end, signal wake-up pipe (2), staging pipe (2),
    # 2 pipe write ends, 2 pidfds, main's list of destinations (a memfd, read again at a reload)
    assert open_fds(rec) == sorted(["socket"] + ["pipe"] * 7 + ["anon_inode"] * 2 + ["/memfd"]), open_fds(rec)
    for fwd in by_role(px.pid, "forwarder"):
        # forwarder: its receiver's pidfd, its pipe's read end, /dev/null (drops), its destination socket,
        # the shadow pipe holding what the destination has not acknowledged yet (--buffer), and its
        # signal wake-up pipe (2)
        assert open_fds(fwd) == ["anon_inode", "null"] + ["pipe"] * 5 + ["socket"], open_fds(fwd)
    # main: the listener, its lifeline and wake-up pipes, the shared table (its memfd, and the copy
    # Python's mmap keeps) and the list of destinations (memfds, kept across an upgrade in place); the
    # source socket went with the fork
    assert open_fds(psutil.Process(px.pid)) == ["/memfd"] * 3 + ["pipe"] * 4 + ["socket"], open_fds(
        psutil.Process(px.pid))
    source.close()
