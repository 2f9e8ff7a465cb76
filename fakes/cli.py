"""What both fakes share: stopping on SIGTERM/SIGINT, printing, and one-line command-line errors."""
import signal
import sys

import docopt


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


def check_options(prog, argv, value_options, flag_options=()):
    """Reject unknown options before docopt, so the error names them as typed."""
    expect_value = False
    for arg in argv:
        if expect_value:
            expect_value = False
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]
            if name not in value_options + tuple(flag_options) + ("-h", "--help"):
                usage_error(prog, "unknown option %r" % arg)
            expect_value = name in value_options and "=" not in arg


def checked_host(prog, host):
    """host, or exit 2 when it cannot be a host name or address (IDNA refuses it)."""
    try:
        host.encode("idna")
    except UnicodeError:
        usage_error(prog, "bad --host %r: not a host name or address" % host)
    return host


def parse(prog, usage, argv, value_options, flag_options=()):
    """docopt's dictionary for argv, or exit 2 with one line naming what is wrong."""
    check_options(prog, argv, value_options, flag_options)  # unknown options first, named as typed
    try:
        return docopt.docopt(usage, argv=argv)
    except docopt.DocoptExit as exc:
        first = str(exc).splitlines()[0]
        if not any(arg.split("=", 1)[0] == "--port" for arg in argv):
            usage_error(prog, "missing --port PORT")
        usage_error(prog, first if "requires argument" in first else "unexpected or repeated arguments")
