"""The PROXY protocol: --accept-proxy (a trusted balancer names the real source) and --send-proxy (every
destination connection begins with a header naming it). The parser is fuzzed; bad headers, untrusted
senders and sources --allow refuses are closed with one line, and nothing of them reaches a destination."""
import ipaddress
import os
import re
import shutil
import socket
import subprocess

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socketproxy_core import proxyproto
from support import connect_source, free_port, sees_close, wait_for_log, wait_until

V2 = proxyproto.V2_SIGNATURE


def v2_header(host, port, dst=("127.0.0.1", 8000)):
    return proxyproto.header("v2", (host, port), dst)


@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8000\r\nrest", (44, ("203.0.113.7", 5555))),
    (b"PROXY TCP6 2001:db8::1 ::1 5555 8000\r\n", (38, ("2001:db8::1", 5555))),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (V2 + b"\x20\x00\x00\x00", (16, None)),  # LOCAL: the balancer's own health check
    (v2_header("203.0.113.7", 5555), (28, ("203.0.113.7", 5555))),
    (v2_header("2001:db8::1", 5555, ("::1", 80)), (52, ("2001:db8::1", 5555))),
    (b"PROXY TCP4 1.2", None), (V2[:7], None), (V2 + b"\x21\x11\x00\x0c\x01", None),
])
def test_headers_are_read_or_said_incomplete(data, expected):
    assert proxyproto.parse(data) == expected


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.0\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n", "malformed address"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "is not IPv4"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "malformed port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "malformed port"),
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "malformed version 1 header"),
    (b"PROXY " + b"x" * 120, "longer than 107"),
    (V2 + b"\x31\x11\x00\x0c" + b"\0" * 12, "version 3"),
    (V2 + b"\x21\x12\x00\x0c" + b"\0" * 12, "family and transport 0x12"),
    (V2 + b"\x21\x11\x10\x00", "oversized" if False else "a version 2 header of"),
    (V2 + b"\x21\x11\x00\x04" + b"\0" * 4, "too short for its addresses"),
])
def test_bad_headers_are_refused_with_the_reason(data, reason):
    with pytest.raises(proxyproto.HeaderError, match=reason):
        proxyproto.parse(data)


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_are_a_header_an_incomplete_one_or_refused(data):
    try:
        parsed = proxyproto.parse(data)
    except proxyproto.HeaderError:
        return
    if parsed is not None:
        length, source = parsed
        assert 15 <= length <= len(data)
        assert source is None or (isinstance(source[0], str) and 0 <= source[1] <= 65535)


@given(st.sampled_from(["v1", "v2"]), st.ip_addresses(), st.integers(0, 65535), st.ip_addresses(),
       st.integers(0, 65535))
@settings(max_examples=300, deadline=None)
def test_a_written_header_reads_back(version, src, sport, dst, dport):
    data = proxyproto.header(version, (str(src), sport), (str(dst), dport))
    length, (host, port) = proxyproto.parse(data + b"after")
    assert length == len(data) and port == sport
    read = ipaddress.ip_address(host)
    mapped = ipaddress.IPv6Address("::ffff:%s" % src) if src.version == 4 else src
    assert read in (src, mapped) or (src.version == 6 and src.ipv4_mapped == read)


def test_a_balancers_source_is_named_and_passed_on(proxy, recorder):
    """--accept-proxy 127.0.0.0/8 --send-proxy v2: a v2 header naming 203.0.113.7:5555, then data; the
    destination's connection begins with a v2 header naming 203.0.113.7:5555, then exactly the data;
    the log names the real source."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--accept-proxy", "127.0.0.0/8", "--send-proxy", "v2")
    with connect_source(px.port) as sock:
        sock.sendall(v2_header("203.0.113.7", 5555) + b"hello\n")
        wait_until(lambda: dest.streams() and dest.streams()[0].endswith(b"hello\n"), 20,
                   message=lambda: (dest.streams(), px.log()[-2000:]))
    stream = dest.streams()[0]
    length, source = proxyproto.parse(stream)
    assert source == ("203.0.113.7", 5555) and stream[length:] == b"hello\n"
    wait_for_log(px.log_path, r"src=203\.0\.113\.7:5555 \(via 127\.0\.0\.1:\d+\) accepted")


def test_send_proxy_v1_names_a_direct_source(proxy, recorder):
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--send-proxy", "v1")
    with connect_source(px.port) as sock:
        sock.sendall(b"data")
        local_port = sock.getsockname()[1]
        wait_until(lambda: dest.streams() and dest.streams()[0].endswith(b"data"), 20)
    assert dest.streams()[0] == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\ndata" % (local_port, px.port)


@pytest.mark.parametrize("options, send, why", [
    (("--accept-proxy", "127.0.0.0/8"), b"GET / HTTP/1.0\r\n\r\n", "not a PROXY protocol header"),
    (("--accept-proxy", "127.0.0.0/8"), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\nmore", "malformed version 1 header"),
    (("--accept-proxy", "127.0.0.0/8"), V2 + b"\x21\x11\xff\xff", "a version 2 header of"),
    (("--accept-proxy", "10.0.0.0/8"), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nsecret", "from an address not in "
                                                                                   "--accept-proxy"),
    (("--accept-proxy", "127.0.0.0/8", "--allow", "10.0.0.0/8"), None, "not in --allow"),
])
def test_a_bad_or_untrusted_header_closes_the_source_and_forwards_nothing(proxy, recorder, options, send, why):
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], *options)
    with connect_source(px.port) as sock:
        sock.sendall(send if send is not None else v2_header("192.0.2.1", 7) + b"secret")
        wait_until(lambda: sees_close(sock), 20)
    wait_for_log(px.log_path, r"INFO .*closing the source: .*%s.*; nothing of it was forwarded" % re.escape(why))
    wait_for_log(px.log_path, r"WARNING .*refused 127\.0\.0\.1:\d+: (no valid PROXY protocol header|the source its "
                 r"balancer names is not in --allow)")
    assert dest.streams() == []
    with connect_source(px.port) as sock:  # the proxy goes on
        sock.sendall(v2_header("10.1.2.3", 9) + b"ok" if "--allow" in options else
                     (v2_header("198.51.100.1", 9) + b"ok" if "127.0.0.0/8" in options else b"ok"))
        wait_until(lambda: dest.streams() and dest.streams()[-1].endswith(b"ok"), 20,
                   message=lambda: (dest.streams(), px.log()[-2000:]))


def test_a_header_that_never_ends_closes_the_source_within_its_bound(proxy, recorder):
    """slowloris: a trusted sender that sends half a header and waits is closed after 5 s."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--accept-proxy", "127.0.0.0/8")
    with connect_source(px.port) as sock:
        sock.sendall(b"PROXY TCP4 1.2")
        sock.settimeout(15)
        assert sock.recv(1) == b""
    wait_for_log(px.log_path, r"closing the source: no whole header within 5\.0 s; nothing of it was forwarded")
    wait_for_log(px.log_path, r"WARNING .*refused 127\.0\.0\.1:\d+: no valid PROXY protocol header")
    assert dest.streams() == []


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make servers installs it)")
def test_haproxy_in_front_with_send_proxy_v2_names_the_real_source(proxy, recorder, tmp_path):
    """HAProxy (mode tcp, send-proxy-v2) in front of the proxy (--accept-proxy 127.0.0.1/32, --send-proxy
    v1): the destination's connection begins with a header naming the client's own port, not HAProxy's
    (and the proxy's address it was served on), and so does the proxy's log."""
    dest = recorder()
    px = proxy(["127.0.0.1:%d" % dest.port], "--accept-proxy", "127.0.0.1/32", "--send-proxy", "v1")
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 30s\n    timeout server 30s\n"
                      "frontend in\n    bind 127.0.0.1:%d\n    default_backend out\n"
                      "backend out\n    server sp 127.0.0.1:%d send-proxy-v2\n" % (front, px.port))
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(front), 20)
        with socket.create_connection(("127.0.0.1", front)) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"through haproxy\n")
            wait_until(lambda: dest.streams() and dest.streams()[0].endswith(b"through haproxy\n"), 20,
                       message=lambda: (dest.streams(), px.log()[-2000:]))
        header = dest.streams()[0].split(b"\r\n")[0]
        assert header == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d" % (client_port, px.port), header
        wait_for_log(px.log_path, r"src=127\.0\.0\.1:%d \(via 127\.0\.0\.1:\d+\) accepted" % client_port)
    finally:
        haproxy.terminate()
        haproxy.wait(10)


def listening(port):
    """Whether something listens on 127.0.0.1:port (without connecting to it, which would be a source)."""
    return any(conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
               for conn in psutil.net_connections(kind="tcp4"))
