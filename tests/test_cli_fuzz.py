"""Generated command lines: each one parses to a config or exits 2 with one clear line, never a traceback."""
import io
import os
from contextlib import redirect_stderr, redirect_stdout

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import socketproxy

OPTIONS = ["--listen-port", "--listen-host", "--max-connections", "--idle-timeout", "--connect-timeout",
           "--retry-interval", "--send-timeout", "--allow", "--log-level"]
VALUES = st.one_of(
    st.sampled_from(["8000", "0", "70000", "0x", "-1", "1.5", "nan", "inf", "127.0.0.1:80", "[::1]:80",
                     "[::1", "host:abc", "foo", "10.0.0.0/8", "debug", "::", "", " ", "localhost:0"]),
    st.text(min_size=0, max_size=12),
)
TOKENS = st.one_of(st.sampled_from(OPTIONS + ["--bogus", "-x", "--", "-"]), VALUES,
                   st.builds(lambda o, v: o + "=" + v, st.sampled_from(OPTIONS), VALUES))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=8))
def test_generated_command_lines(argv):
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            config = socketproxy.parse_args(argv)
    except SystemExit as exit_:
        code = exit_.code
        assert "Traceback" not in err.getvalue()
        if code in (0, None):
            assert out.getvalue()  # --help or --version printed something
            return
        assert code == 2, (argv, code, err.getvalue())
        errors = [line for line in err.getvalue().splitlines() if line.startswith("socketproxy: error:")]
        assert len(errors) == 1, (argv, err.getvalue())
        return
    assert 1 <= config.listen_port <= 65535
    assert config.dests and all(1 <= d.port <= 65535 for d in config.dests)
    assert config.idle_timeout >= 0 and config.send_timeout > 0 and config.retry_interval >= 0.1
