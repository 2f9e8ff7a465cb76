"""What both fakes share: stopping on SIGTERM/SIGINT, printing, and one-line command-line errors."""
import signal
import sys


class Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave whatever blocking call is running."""


def handle_stop(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def say(text):
    print(text, flush=True)


def usage_error(prog, message):
    """One line on stderr, exit 2."""
    sys.stderr.write("%s: error: %s (see --help)\n" % (prog, message))
    sys.exit(2)


def check_options(prog, argv, value_options):
    """Reject unknown options before docopt, so the error names them as typed."""
    expect_value = False
    for arg in argv:
        if expect_value:
            expect_value = False
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]
            if name not in value_options + ("-h", "--help"):
                usage_error(prog, "unknown option %r" % arg)
            expect_value = name in value_options and "=" not in arg


def checked_host(prog, host):
    """host, or exit 2 when it cannot be a host name or address (IDNA refuses it)."""
    try:
        host.encode("idna")
    except UnicodeError:
        usage_error(prog, "bad --host %r: not a host name or address" % host)
    return host
