"""Unit tests of command-line value parsing (no processes)."""
import ipaddress

import pytest

from socketproxy_core.endpoints import UsageError, is_allowed, parse_allow, parse_dest, parse_port, parse_seconds


@pytest.mark.parametrize("text, host, port", [
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    ("localhost:1", "localhost", 1),
    ("[::1]:65535", "::1", 65535),
    ("example.com:443", "example.com", 443),
])
def test_parse_dest_accepts(text, host, port):
    dest = parse_dest(text)
    assert (dest.host, dest.port, str(dest)) == (host, port, text)


@pytest.mark.parametrize("text", ["foo", "host:abc", "host:0", "host:70000", "[::1", "[::1]", "::1:80", "host:\u00b9", "a..b:80",
                                  "x" * 64 + ".example:80",
                                  ":80", "[nothost]:80", "host:", "host:-1", "host: 80"])
def test_parse_dest_rejects_naming_the_value(text):
    with pytest.raises(UsageError) as info:
        parse_dest(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0", "0x", "70000", "-1", "", "8o", "\u00b9", "8\u00b2", "\u0661\u0662"])
def test_parse_port_rejects(text):
    """Only ASCII decimal ports: superscripts pass str.isdigit() but int() refuses them (a bug the
    generated command lines found)."""
    with pytest.raises(UsageError):
        parse_port(text)


def test_parse_seconds():
    assert parse_seconds("1.5", "--idle-timeout") == 1.5
    for bad in ("-1", "nan", "inf", "abc"):
        with pytest.raises(UsageError, match="--idle-timeout"):
            parse_seconds(bad, "--idle-timeout")


def test_allow_lists():
    assert parse_allow(["all"]) == ()
    nets = parse_allow(["10.0.0.0/8", "::1/128"])
    assert nets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert is_allowed("10.1.2.3", nets)
    assert not is_allowed("127.0.0.1", nets)
    assert is_allowed("::1", nets)
    assert is_allowed("::ffff:10.0.0.1", nets)
    assert is_allowed("192.0.2.1", ())
    with pytest.raises(UsageError, match="'10.0.0.0/33'"):
        parse_allow(["10.0.0.0/33"])
