"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a trusted balancer sends before the
stream, naming the real source (--accept-proxy), and the one a destination connection starts with
(--send-proxy).

A small parser of our own rather than the `proxy-protocol` package: the receiver must read exactly
the header's bytes from the socket and not one byte more (the rest is spliced, zero copy, after it),
so the parser works on a prefix and says how many bytes it needs; it is about a hundred lines, has no
dependency, and is fuzzed (tests/test_proxyproto.py).
"""
import ipaddress
import socket
import struct
import time

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 header, CRLF included (the specification's bound)
V2_MAX = 16 + 1024  # a v2 header with TLVs beyond this is refused as oversized
FIRST = 8  # bytes that tell v1 from v2 (the shortest header, "PROXY UNKNOWN\r\n", has 15)
V2_FAMILIES = {0x11: (socket.AF_INET, 12), 0x21: (socket.AF_INET6, 36)}


class HeaderError(ValueError):
    """Not a valid PROXY protocol header: the message says why."""


def parse(data):
    """(header length, (host, port) of the real source or None for LOCAL/UNKNOWN) when data starts with
    a whole header; None when more bytes are needed. Raises HeaderError."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return parse_v1(data)
    raise HeaderError("not a PROXY protocol header (it starts %r)" % bytes(data[:12]))


def parse_v1(data):
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError("a version 1 header longer than %d bytes" % V1_MAX)
        return None
    parts = bytes(data[:end]).split(b" ")
    if parts[:2] == [b"PROXY", b"UNKNOWN"]:
        return end + 2, None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise HeaderError("a malformed version 1 header: %r" % bytes(data[:end])[:60])
    family = 4 if parts[1] == b"TCP4" else 6
    source = address(parts[2], family), port(parts[4])
    address(parts[3], family)
    port(parts[5])
    return end + 2, source


def address(text, family):
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("a malformed address %r" % text[:45]) from None
    if ip.version != family:
        raise HeaderError("address %s is not IPv%d" % (ip, family))
    return str(ip)


def port(text):
    if not (text.isdigit() and len(text) <= 5 and (text == b"0" or not text.startswith(b"0"))) or int(text) > 65535:
        raise HeaderError("a malformed port %r" % text[:8])
    return int(text)


def parse_v2(data):
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2 or command not in (0, 1):
        raise HeaderError("version %d command %d (expected 2, LOCAL or PROXY)" % (version, command))
    length = 16 + struct.unpack("!H", data[14:16])[0]
    if length > V2_MAX:
        raise HeaderError("a version 2 header of %d bytes (at most %d)" % (length, V2_MAX))
    if len(data) < length:
        return None
    if command == 0 or data[13] == 0:  # LOCAL (the balancer's own check), or UNSPEC
        return length, None
    if data[13] not in V2_FAMILIES:
        raise HeaderError("family and transport 0x%02x (TCP over IPv4 or IPv6 only)" % data[13])
    family, size = V2_FAMILIES[data[13]]
    if length - 16 < size:
        raise HeaderError("a version 2 header too short for its addresses")
    half = size // 2 - 2
    host = socket.inet_ntop(family, bytes(data[16:16 + half]))
    return length, (host, struct.unpack("!H", data[16 + 2 * half:18 + 2 * half])[0])


def read_header(sock, timeout):
    """Read exactly one header from a blocking socket within timeout seconds, and not a byte more:
    (its bytes, the source or None). Raises HeaderError (bad, or cut by the source's end or the time)."""
    deadline = time.monotonic() + timeout

    def take(count):
        left = deadline - time.monotonic()
        if left <= 0:
            raise HeaderError("no whole header within %.1f s" % timeout)
        sock.settimeout(left)
        try:
            chunk = sock.recv(count, socket.MSG_WAITALL)
        except socket.timeout:
            raise HeaderError("no whole header within %.1f s" % timeout) from None
        except OSError as exc:
            raise HeaderError("the source failed (%s)" % (exc.strerror or exc)) from None
        if len(chunk) < count:
            raise HeaderError("the source closed within its header")
        return chunk

    data = take(FIRST)
    parse(data)  # not a header at all: said now
    if data.startswith(V2_SIGNATURE[:FIRST]):
        data += take(16 - FIRST)
        parse(data)
        data += take(16 + struct.unpack("!H", data[14:16])[0] - len(data)) if len(data) >= 16 else b""
    else:  # version 1: a line, read a byte at a time (at most 107) so nothing after it is taken
        while not data.endswith(b"\r\n"):
            if len(data) >= V1_MAX:
                raise HeaderError("a version 1 header longer than %d bytes" % V1_MAX)
            data += take(1)
    parsed = parse(data)
    if parsed is None:
        raise HeaderError("a truncated header")
    return bytes(data), parsed[1]


def header(version, source, local):
    """The header a destination connection starts with (--send-proxy): the source (host, port) as seen
    (or as a balancer named it) and the address it connected to."""
    src, dst = ipaddress.ip_address(source[0].split("%")[0]), ipaddress.ip_address(local[0].split("%")[0])
    if src.version == 6 and src.ipv4_mapped:
        src = src.ipv4_mapped
    if dst.version == 6 and dst.ipv4_mapped:
        dst = dst.ipv4_mapped
    if src.version != dst.version:  # one of each: say both in IPv6
        src, dst = (ipaddress.IPv6Address("::ffff:%s" % ip) if ip.version == 4 else ip for ip in (src, dst))
    if version == "v1":
        return b"PROXY TCP%d %s %s %d %d\r\n" % (src.version, str(src).encode(), str(dst).encode(), source[1],
                                                  local[1])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], local[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
