"""The command line: bad input exits 2 with one line naming the value; a busy port exits 1."""
import os
import socket
import subprocess
import sys

import pytest

from support import ROOT

PROXY = os.path.join(ROOT, "socketproxy.py")


def run(*argv):
    return subprocess.run([sys.executable, PROXY, *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("argv, named", [
    ([], "--listen-port"),
    (["--listen-port", "8000"], "DEST"),
    (["--listen-port", "8000", "foo"], "'foo'"),
    (["--listen-port", "8000", "host:abc"], "'host:abc'"),
    (["--listen-port", "8000", "host:0"], "'host:0'"),
    (["--listen-port", "8000", "host:70000"], "'host:70000'"),
    (["--listen-port", "8000", "[::1"], "'[::1'"),
    (["--listen-port", "8000", "--bogus", "a:1"], "'--bogus'"),
    (["--listen-port", "8000", "-x", "a:1"], "'-x'"),
    (["--listen-port", "0x", "a:1"], "'0x'"),
    (["--listen-port", "70000", "a:1"], "'70000'"),
    (["--listen-port", "8000", "--send-timeout", "-1", "a:1"], "'-1'"),
    (["--listen-port", "8000", "--idle-timeout=-5", "a:1"], "'-5'"),
    (["--listen-port", "8000", "--connect-timeout", "x", "a:1"], "'x'"),
    (["--listen-port", "8000", "--retry-interval", "0", "a:1"], "'0'"),
    (["--listen-port", "8000", "--max-connections", "0", "a:1"], "'0'"),
    (["--listen-port", "8000", "--allow", "10.0.0.0/99", "a:1"], "'10.0.0.0/99'"),
    (["--listen-port", "8000", "--log-level", "loud", "a:1"], "'loud'"),
    (["--listen-port", "8000", "--listen-host", "nowhere", "a:1"], "'nowhere'"),
])
def test_bad_command_line_exits_2_naming_the_value(argv, named):
    """When the command line is bad, the proxy exits 2 with usage and one error line naming it."""
    result = run(*argv)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("socketproxy: error:")]
    assert len(errors) == 1, result.stderr
    assert named in errors[0]
    assert "Usage:" in result.stderr


def test_help_and_version_exit_0():
    assert run("--help").returncode == 0
    assert "--retry-interval" in run("--help").stdout
    version = run("--version")
    assert version.returncode == 0 and "socketproxy" in version.stdout


def test_port_in_use_exits_1_with_one_line():
    """When the listen port is taken, the proxy exits 1 with one clear line and no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--listen-host", "127.0.0.1", "--listen-port", str(port), "127.0.0.1:9")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0], result.stderr


def test_port_not_permitted_exits_1():
    """Binding an address this machine does not have fails with exit 1 and one line."""
    result = run("--listen-host", "192.0.2.1", "--listen-port", "8000", "127.0.0.1:9")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
