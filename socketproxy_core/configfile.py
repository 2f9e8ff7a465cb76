"""--config FILE: everything the command line holds, in TOML, validated by the command line's own rules.

    listen_port = 8000
    framing = "line"
    buffer = "4M"
    destinations = [
        "127.0.0.1:8080",
        { address = "collector.example:9000", buffer = "64M", send_timeout = 30 },
    ]

Keys are the long options with "_" for "-"; `destinations` is a list of "HOST:PORT" strings or tables
with an `address` and per-destination overrides of buffer, send_timeout, connect_timeout and
retry_interval (and, for a tls:// destination, tls_ca, tls_dest_cert and tls_dest_key). An option given on the command line wins over the file (the file is read again at
every reload, the command line is not); destinations come from one place, the file or the command line.
"""
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from socketproxy_core import endpoints
from socketproxy_core.endpoints import UsageError


class FileError(UsageError):
    """The file cannot be read or holds a bad key or value (exit 1, not the command line's 2)."""

# The file's keys, and the command line's option each stands for.
OPTIONS = {name.replace("-", "_"): "--" + name for name in (
    "listen-host", "listen-port", "max-connections", "spare-groups", "idle-timeout", "connect-timeout", "retry-interval",
    "send-timeout", "allow", "log-level", "framing", "buffer", "metrics", "primary", "mirror-policy", "fin-timeout",
    "session-preamble", "accept-proxy", "send-proxy", "tls-cert", "tls-key", "tls-client-ca", "tls-ca",
    "tls-dest-cert", "tls-dest-key")}
# Per destination: the key, and how its value is read.
DEST_OPTIONS = {
    "buffer": lambda text: endpoints.parse_size(text, "buffer"),
    "send_timeout": lambda text: endpoints.parse_seconds(text, "send_timeout", minimum=0.001),
    "connect_timeout": lambda text: endpoints.parse_seconds(text, "connect_timeout", minimum=0.001),
    "retry_interval": lambda text: endpoints.parse_seconds(text, "retry_interval", minimum=0.1),
    "tls_ca": lambda text: text,  # tls:// destinations only: files read when main makes their contexts
    "tls_dest_cert": lambda text: text,
    "tls_dest_key": lambda text: text,
}
TLS_DEST_OPTIONS = ("tls_ca", "tls_dest_cert", "tls_dest_key")


def read(path):
    """The file as (options as docopt gives them: {"--buffer": "4M", ...}, destinations or None).
    Raises UsageError with one line naming the file and the bad key or value."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise FileError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise FileError("%s is not valid TOML: %s" % (path, exc)) from None
    options, dests = {}, None
    for key, value in document.items():
        if key == "destinations":
            dests = read_destinations(path, value)
        elif key not in OPTIONS:
            raise FileError("%s: unknown key %r (keys are the long options with _ for -, and destinations)"
                             % (path, key))
        else:
            options[OPTIONS[key]] = option_text(path, key, value)
    return options, dests


def option_text(path, key, value):
    """A value of the file as the command line would have given it."""
    if key == "primary":
        if not isinstance(value, bool):
            raise FileError("%s: primary = %r: expected true or false" % (path, value))
        return value
    if key in ("allow", "accept_proxy"):
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in values):
            raise FileError("%s: allow = %r: expected a network or a list of them, as strings" % (path, value))
        return values
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FileError("%s: %s = %r: expected a string or a number" % (path, key, value))
    return str(value)


def read_destinations(path, value):
    """`destinations`: a list of "HOST:PORT" or { address = "HOST:PORT", overrides... }; Dest objects."""
    if not isinstance(value, list) or not value:
        raise FileError("%s: destinations: expected a non-empty list of \"HOST:PORT\" or tables" % path)
    dests = []
    for item in value:
        if isinstance(item, str):
            dests.append(parse_dest(path, item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("address"), str):
            raise FileError("%s: destinations: %r: expected \"HOST:PORT\" or a table with an address" % (path, item))
        overrides = []
        for key, setting in item.items():
            if key == "address":
                continue
            if key not in DEST_OPTIONS:
                raise FileError("%s: destination %s: unknown key %r (per destination: %s)" % (
                    path, item["address"], key, ", ".join(DEST_OPTIONS)))
            try:
                overrides.append((key, DEST_OPTIONS[key](str(setting))))
            except UsageError as exc:
                raise FileError("%s: destination %s: %s" % (path, item["address"], exc)) from None
        dest = parse_dest(path, item["address"])
        keys = dict(overrides)
        if not dest.tls and any(key in keys for key in TLS_DEST_OPTIONS):
            raise FileError("%s: destination %s: tls_ca, tls_dest_cert and tls_dest_key are for tls://HOST:PORT "
                            "destinations" % (path, item["address"]))
        if "tls_dest_key" in keys and "tls_dest_cert" not in keys:
            raise FileError("%s: destination %s: tls_dest_key needs tls_dest_cert" % (path, item["address"]))
        if "tls_dest_cert" in keys and "tls_dest_key" not in keys:
            overrides.append(("tls_dest_key", ""))  # its key is in its own file, not --tls-dest-key's
        dests.append(endpoints.with_options(dest, tuple(overrides)))
    return tuple(dests)


def parse_dest(path, text):
    try:
        return endpoints.parse_dest(text)
    except UsageError as exc:
        raise FileError("%s: %s" % (path, exc)) from None


def merge(args, given, path):
    """The command line's docopt dictionary with the file's settings where the command line gave none
    (given: the options named on the command line). Returns (args, the file's destinations or None)."""
    options, dests = read(path)
    merged = dict(args)
    for option, value in options.items():
        if option not in given:
            merged[option] = value
    if dests is not None and args.get("DEST"):
        raise FileError("destinations are given both in %s and on the command line: give them in one place" % path)
    if dests is None and not args.get("DEST"):
        raise FileError("%s has no destinations, and the command line names none" % path)
    if not merged.get("--listen-port"):
        raise FileError("%s has no listen_port, and the command line gives no --listen-port" % path)
    return merged, dests
