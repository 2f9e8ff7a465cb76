"""--config FILE (TOML) and --check-config FILE: the command line's settings in a file, validated by the
same rules; one line naming the bad key and value, never a traceback."""
import os
import subprocess
import sys

import pytest

from support import ROOT, connect_source, wait_until

PROXY = [sys.executable, os.path.join(ROOT, "socketproxy.py")]


def run(*args, cwd=None):
    return subprocess.run([*PROXY, *args], capture_output=True, text=True, timeout=30, cwd=cwd)


GOOD = '''
listen_port = 28100
framing = "line"
buffer = "1M"
allow = ["127.0.0.0/8"]
destinations = ["127.0.0.1:28101", { address = "127.0.0.1:28102", buffer = "64K", send_timeout = 2 }]
'''


def test_check_config_accepts_a_good_file(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    done = run("--check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "is valid: listen on 0.0.0.0 port 28100, 2 destinations" in done.stdout


@pytest.mark.parametrize("text, message", [
    ('listen_port = 1\nbufer = "1M"\ndestinations = ["127.0.0.1:1"]\n', "unknown key 'bufer'"),
    ('listen_port = 1\nbuffer = "1X"\ndestinations = ["127.0.0.1:1"]\n', "buffer '1X': expected a size"),
    ('listen_port = 1\nsend_timeout = -3\ndestinations = ["127.0.0.1:1"]\n', "send_timeout '-3'"),
    ('listen_port = 1\nprimary = "yes"\ndestinations = ["127.0.0.1:1"]\n', "primary = 'yes': expected true or false"),
    ('listen_port = 1\ndestinations = [{ address = "127.0.0.1:1", sendtimeout = 3 }]\n',
     "destination 127.0.0.1:1: unknown key 'sendtimeout'"),
    ('listen_port = 1\ndestinations = [{ address = "127.0.0.1:1", buffer = "big" }]\n',
     "destination 127.0.0.1:1: invalid buffer 'big'"),
    ('listen_port = 1\ndestinations = ["127.0.0.1:http"]\n', "invalid destination '127.0.0.1:http'"),
    ('listen_port = 1\ndestinations = []\n', "destinations: expected a non-empty list"),
    ('listen_port = 1\n', "has no destinations"),
    ('destinations = ["127.0.0.1:1"]\n', "has no listen_port"),
    ('listen_port = = 1\n', "is not valid TOML"),
    ('listen_port = 70000\ndestinations = ["127.0.0.1:1"]\n', "listen_port '70000'"),
])
def test_a_bad_file_is_one_line_naming_the_key_and_exit_1(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for args in (["--check-config", str(path)], ["--config", str(path)]):
        done = run(*args)
        assert done.returncode == 1, (args, done.returncode, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("socketproxy: error: "), done.stderr
        assert message in lines[0] and "Traceback" not in done.stderr, lines[0]


def test_a_missing_file_is_one_line(tmp_path):
    done = run("--check-config", str(tmp_path / "nope.toml"))
    assert done.returncode == 1 and done.stderr.strip() == (
        "socketproxy: error: cannot read %s: No such file or directory" % (tmp_path / "nope.toml"))


def test_destinations_in_the_file_and_on_the_command_line_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    done = run("--config", str(path), "127.0.0.1:9")
    assert done.returncode == 1
    assert "destinations are given both in" in done.stderr


def test_the_file_serves_and_the_command_line_wins(proxy, recorder, tmp_path):
    """The file says framing resp (a source that is not RESP would be closed) and names the
    destinations; the command line says --framing none: the proxy serves the file's destinations as
    a byte stream."""
    one, two = recorder(), recorder()
    path = tmp_path / "c.toml"
    path.write_text('framing = "resp"\nbuffer = "1M"\ndestinations = ["127.0.0.1:%d", { address = "127.0.0.1:%d", '
                    'send_timeout = 2 }]\n' % (one.port, two.port))
    px = proxy([], "--config", str(path), "--framing", "none")
    with connect_source(px.port) as sock:
        sock.sendall(b"not resp at all\r\n")
        wait_until(lambda: one.streams() == [b"not resp at all\r\n"] and two.streams() == [b"not resp at all\r\n"],
                   message=lambda: (one.streams(), two.streams(), px.log()[-2000:]))
    assert "not valid RESP" not in px.log()


def test_a_destinations_own_client_certificate_does_not_take_the_global_key(tmp_path):
    """tls_dest_cert in a destination's table, its key in the same file: the command line's
    --tls-dest-key (another certificate's key) is not paired with it."""
    from socketproxy_core import configfile, endpoints
    path = tmp_path / "proxy.toml"
    path.write_text('listen_port = 8000\ntls_dest_cert = "/etc/global.pem"\ntls_dest_key = "/etc/global.key"\n'
                    'destinations = [{ address = "tls://127.0.0.1:9000", tls_dest_cert = "/etc/own.pem" }]\n')
    options, dests = configfile.read(str(path))
    base = endpoints.Config(listen_host="127.0.0.1", listen_port=8000, dests=dests,
                            tls_dest_cert="/etc/global.pem", tls_dest_key="/etc/global.key")
    config = endpoints.for_destination(base, dests[0])
    assert (config.tls_dest_cert, config.tls_dest_key) == ("/etc/own.pem", "")
