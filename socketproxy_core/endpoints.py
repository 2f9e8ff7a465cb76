"""Pure parsing and validation of the command line's values.

Every function raises UsageError with a message that names the bad value as the user typed it.
"""
import dataclasses
import ipaddress
import math
import socket

LOG_LEVELS = ("debug", "info", "warning", "error")
FRAMINGS = ("none", "line", "resp")
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class UsageError(Exception):
    """A bad command-line value; the message names it as typed."""


@dataclasses.dataclass(frozen=True)
class Dest:
    """One destination: host (a name or an address, brackets removed) and port, plus the text typed."""

    host: str
    port: int
    text: str
    family: int = 0  # AF_INET or AF_INET6 for an address; 0 for a name, resolved at each connect
    options: tuple = ()  # (name, value) overrides of Config for this destination (--config's tables)
    tls: bool = False  # tls://HOST:PORT: the connection speaks TLS, the destination verified (--tls-ca)

    def __str__(self):
        return self.text


def with_options(dest, options):
    return dataclasses.replace(dest, options=options)


def retains(config):
    """Whether a forwarder with this config keeps a shadow pipe (see retaining.py). Not with --primary
    without framing: its primary is never retried, and its mirrors' sessions are never resumed on a
    new connection (what they kept would never be resent)."""
    if config.primary and config.framing == "none":
        return False
    return config.buffer > 0 or config.framing != "none" or config.session_preamble > 0


def for_destination(config, dest):
    """The Config a forwarder to dest runs with: the destination's own settings over the others."""
    return dataclasses.replace(config, **dict(dest.options)) if dest.options else config


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the proxy's processes need, validated."""

    listen_host: str
    listen_port: int
    dests: tuple
    max_connections: int = 256
    spare_groups: int = 0  # groups forked ahead of their sources and kept for the next ones (spares.py)
    idle_timeout: float = 0.0
    connect_timeout: float = 3.0
    retry_interval: float = 3.0
    send_timeout: float = 5.0
    allow: tuple = ()  # ip_network objects; empty = everyone
    log_level: str = "info"
    framing: str = "none"  # none (a byte stream), line (records end with a newline) or resp (Redis commands)
    buffer: int = 0  # bytes kept per destination of each source while it is down
    pipe_size: int = 1 << 20  # each pipe of a group, planned by main for the user's pipe budget
    pipe_share: int = 0  # under a pipe budget: bytes of pipes the tree may hold, busy groups' pipes growing (pipesizes.py)
    pipes_per_source: int = 0  # pipes a group holds: its staging pipe, a pipe per forwarder, a shadow per retaining one
    metrics: tuple = None  # (host, port) to serve Prometheus metrics on; None = off
    primary: bool = False  # the first destination is the source's session; its replies go back
    mirror_policy: str = "drop"  # with primary: a mirror that cannot keep up loses data (drop) or holds (wait)
    fin_timeout: float = 30.0  # with primary: a half-closed session idle this long is closed; 0 = never
    session_preamble: int = 0  # framing none/line: the source's first N records (bytes) sent first on every new connection
    columns: tuple = ()  # each destination's column in the shared table (main's, stable across reloads)
    accept_proxy: tuple = ()  # ip_network objects: sources from these begin with a PROXY protocol header
    send_proxy: str = ""  # "v1" or "v2": every destination connection begins with a PROXY header; "" = none
    tls_cert: str = ""  # the listener's certificate chain (PEM): sources speak TLS; "" = plain TCP
    tls_key: str = ""  # its private key, when not in tls_cert's file
    tls_client_ca: str = ""  # sources must present a certificate this CA signed (mutual TLS)
    tls_ca: str = ""  # tls:// destinations are verified against this CA file; "" = the system's CAs
    tls_dest_cert: str = ""  # a client certificate (PEM) tls:// destinations may ask for
    tls_dest_key: str = ""  # its key, when not in tls_dest_cert's file


def mention_names(dests):
    """A name per destination as the metrics label it: "HOST:PORT", and "HOST:PORT#2" for a second
    mention of the same destination (which gets a connection of its own)."""
    names = []
    for dest in dests:
        seen = sum(1 for name in names if name.split("#")[0] == str(dest))
        names.append(str(dest) if not seen else "%s#%d" % (dest, seen + 1))
    return names


def parse_port(text, what="port"):
    """A TCP port 1..65535 written in decimal."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise UsageError("invalid %s %r: expected a number from 1 to 65535" % (what, text))
    return int(text)


def parse_dest(text):
    """HOST:PORT, [IPV6]:PORT, or either after tls://, into a Dest."""
    if text.startswith("tls://"):
        plain = parse_dest(text[len("tls://"):])
        return dataclasses.replace(plain, text=text, tls=True)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise UsageError("invalid destination %r: expected [IPV6]:PORT" % text)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError("invalid destination %r: %r is not an IPv6 address" % (text, host)) from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise UsageError("invalid destination %r: expected HOST:PORT" % text)
        if ":" in host:
            raise UsageError("invalid destination %r: write an IPv6 address as [ADDR]:PORT" % text)
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise UsageError("invalid destination %r: port %r is not a number from 1 to 65535" % (text, port))
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = 0
        try:
            host.encode("idna")  # what getaddrinfo will do with it at every connect
        except UnicodeError:
            raise UsageError("invalid destination %r: %r is not a valid host name" % (text, host)) from None
    return Dest(host, int(port), text, family)


def parse_seconds(text, option, minimum=0.0):
    """A finite number of seconds, at least minimum (0 by default)."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError("invalid %s %r: expected a number of seconds" % (option, text)) from None
    if not math.isfinite(value) or value < minimum:
        raise UsageError("invalid %s %r: expected a number of seconds, %g or more" % (option, text, minimum))
    return value


def parse_count(text, option):
    """A positive whole number."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError("invalid %s %r: expected a whole number of 1 or more" % (option, text))
    return int(text)


def parse_spare_groups(text, primary):
    """--spare-groups: a whole number, 0 or more; not with --primary (whose forwarder holds the source)."""
    if not (text.isascii() and text.isdigit()):
        raise UsageError("invalid --spare-groups %r: expected a whole number of 0 or more" % text)
    if int(text) and primary:
        raise UsageError("--spare-groups does not work with --primary yet")
    return int(text)


def parse_allow(values):
    """--allow CIDRs into ip_network objects; 'all' (the default) allows everyone."""
    networks = []
    for text in values:
        if text == "all":
            return ()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise UsageError("invalid --allow %r: expected a network like 10.0.0.0/8" % text) from None
    return tuple(networks)


def parse_size(text, option):
    """A size in bytes: digits with an optional K, M or G suffix (powers of 1024)."""
    number, suffix = text[:-1], text[-1:].upper()
    if suffix.isdigit():
        number, suffix = text, ""
    if suffix not in SIZE_SUFFIXES or not (number.isascii() and number.isdigit()):
        raise UsageError("invalid %s %r: expected a size such as 4M, 512K or 0" % (option, text))
    return int(number) * SIZE_SUFFIXES[suffix]


def parse_framing(text):
    """One of FRAMINGS."""
    if text not in FRAMINGS:
        raise UsageError("invalid --framing %r: expected one of %s" % (text, ", ".join(FRAMINGS)))
    return text


def parse_log_level(text):
    """One of LOG_LEVELS."""
    if text.lower() not in LOG_LEVELS:
        raise UsageError("invalid --log-level %r: expected one of %s" % (text, ", ".join(LOG_LEVELS)))
    return text.lower()


def parse_listen_host(text):
    """An IP address to bind (brackets around an IPv6 address are allowed)."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError("invalid --listen-host %r: expected an IP address" % text) from None
    return host


def build_config(args, dests=None):
    """A Config from docopt's dictionary, validating every value (dests: parsed already, from a file)."""
    return check_tls_destinations(Config(
        listen_host=parse_listen_host(args["--listen-host"]),
        listen_port=parse_port(args["--listen-port"], "--listen-port"),
        dests=dests if dests is not None else tuple(parse_dest(text) for text in args["DEST"]),
        max_connections=parse_count(args["--max-connections"], "--max-connections"),
        spare_groups=parse_spare_groups(args.get("--spare-groups") or "0", args.get("--primary")),
        idle_timeout=parse_seconds(args["--idle-timeout"], "--idle-timeout"),
        connect_timeout=parse_seconds(args["--connect-timeout"], "--connect-timeout", minimum=0.001),
        retry_interval=parse_seconds(args["--retry-interval"], "--retry-interval", minimum=0.1),
        send_timeout=parse_seconds(args["--send-timeout"], "--send-timeout", minimum=0.001),
        allow=parse_allow(args["--allow"]),
        log_level=parse_log_level(args["--log-level"]),
        framing=parse_framing(args["--framing"]),
        buffer=parse_size(args["--buffer"], "--buffer"),
        metrics=parse_metrics(args.get("--metrics")),
        primary=bool(args.get("--primary")),
        mirror_policy=parse_mirror_policy(args.get("--mirror-policy") or "drop"),
        fin_timeout=parse_seconds(args.get("--fin-timeout") or "30", "--fin-timeout"),
        session_preamble=parse_preamble(args.get("--session-preamble") or "0", args["--framing"]),
        accept_proxy=parse_networks(args.get("--accept-proxy") or [], "--accept-proxy"),
        send_proxy=parse_send_proxy(args.get("--send-proxy") or "off"),
        **parse_tls(args),
    ))


def check_tls_destinations(config):
    """tls:// destinations and --primary do not go together yet (the primary's socket is handed to the
    receiver, which writes requests into it in clear)."""
    if config.primary and any(dest.tls for dest in config.dests):
        raise UsageError("tls:// destinations do not work with --primary yet")
    return config


def parse_tls(args):
    """The TLS options (their files are read when main builds the context: tls.server_context)."""
    cert, key, client_ca = (args.get(option) or "" for option in ("--tls-cert", "--tls-key", "--tls-client-ca"))
    if (key or client_ca) and not cert:
        raise UsageError("--tls-key and --tls-client-ca need --tls-cert")
    if cert and args.get("--primary"):
        raise UsageError("--tls-cert does not work with --primary (its replies would have to be encrypted by "
                         "the primary's forwarder)")
    ca, dest_cert, dest_key = (args.get(option) or "" for option in ("--tls-ca", "--tls-dest-cert", "--tls-dest-key"))
    if dest_key and not dest_cert:
        raise UsageError("--tls-dest-key needs --tls-dest-cert")
    return {"tls_cert": cert, "tls_key": key, "tls_client_ca": client_ca, "tls_ca": ca, "tls_dest_cert": dest_cert,
            "tls_dest_key": dest_key}


def parse_networks(values, option):
    """Networks (CIDR) of a repeatable option; none when not given."""
    networks = []
    for text in values:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise UsageError("invalid %s %r: expected a network like 10.0.0.0/8" % (option, text)) from None
    return tuple(networks)


def parse_send_proxy(text):
    if text not in ("v1", "v2", "off"):
        raise UsageError("invalid --send-proxy %r: expected v1, v2 or off" % text)
    return "" if text == "off" else text


def parse_preamble(text, framing_mode):
    """--session-preamble N: records (lines), or bytes without framing; not with resp, which knows
    its session's state by itself."""
    if not (text.isascii() and text.isdigit()):
        raise UsageError("invalid --session-preamble %r: expected a whole number of records (0 or more)" % text)
    if int(text) and framing_mode == "resp":
        raise UsageError("--session-preamble does not apply to --framing resp (it restores AUTH, SELECT ... itself)")
    return int(text)


def parse_mirror_policy(text):
    """drop or wait."""
    if text not in ("drop", "wait"):
        raise UsageError("invalid --mirror-policy %r: expected drop or wait" % text)
    return text


def parse_metrics(text):
    """--metrics HOST:PORT (an IP address and a port), None when off."""
    if text in (None, "off"):
        return None
    host, _, port = text.rpartition(":")
    if not host:
        raise UsageError("invalid --metrics %r: expected HOST:PORT, such as 127.0.0.1:9108" % text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError("invalid --metrics %r: expected an IP address before the port" % text) from None
    return host, parse_port(port, "--metrics port")


def is_allowed(address, allow):
    """Whether a source address is inside one of the allowed networks (all when allow is empty)."""
    if not allow:
        return True
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allow if network.version == ip.version)
