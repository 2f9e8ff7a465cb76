"""Generated command lines: each one parses to a config or exits 2 with one clear line, never a traceback."""
import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import socketproxy

OPTIONS = ["--listen-port", "--listen-host", "--max-connections", "--idle-timeout", "--connect-timeout",
           "--retry-interval", "--send-timeout", "--allow", "--log-level", "--framing", "--buffer", "--metrics",
           "--primary", "--mirror-policy", "--fin-timeout", "--session-preamble",
           "--accept-proxy", "--send-proxy"]
VALUES = st.one_of(
    st.sampled_from(["8000", "0", "70000", "0x", "-1", "1.5", "nan", "inf", "127.0.0.1:80", "[::1]:80",
                     "[::1", "host:abc", "foo", "10.0.0.0/8", "debug", "::", "", " ", "localhost:0",
                     "line", "resp", "none", "LINE", "4M", "1K", "2g", "-4M", "1.5M", "127.0.0.1:9100", "off",
                     "drop", "wait"]),
    st.text(min_size=0, max_size=12),
)
TOKENS = st.one_of(st.sampled_from(OPTIONS + ["--bogus", "-x", "--", "-"]), VALUES,
                   st.builds(lambda o, v: o + "=" + v, st.sampled_from(OPTIONS), VALUES))
# Values meant for an option, valid ones and near misses: given a port and a destination, many such
# command lines parse, and the config they give is checked too.
OPTION_VALUES = {
    "--framing": ["line", "resp", "none", "LINE", "lines", ""],
    "--buffer": ["4M", "0", "1K", "2g", "512", "-4M", "-1", "1.5M", "4MB", ""],
    "--metrics": ["127.0.0.1:9100", "[::1]:9100", "off", "127.0.0.1:0", "localhost:9100", "9100", "127.0.0.1:-1"],
    "--mirror-policy": ["drop", "wait", "Drop", "block", ""],
    "--fin-timeout": ["0", "1.5", "30", "-1", "-0.5", "nan", "inf", "-inf"],
    "--send-timeout": ["1", "0.5", "0", "-1"],
    "--session-preamble": ["0", "1", "3", "-1", "1.5", "x", ""],
    "--accept-proxy": ["127.0.0.0/8", "::1/128", "10.0.0.300/8", "all", ""],
    "--send-proxy": ["v1", "v2", "off", "v3", ""],
    "--allow": ["10.0.0.0/8", "all", "::1/128", "10.0.0.300/8"],
}
SETTING = st.sampled_from(sorted(OPTION_VALUES)).flatmap(
    lambda o: st.sampled_from(OPTION_VALUES[o]).flatmap(lambda v: st.sampled_from([[o, v], [o + "=" + v]])))
SETTINGS = st.lists(st.one_of(SETTING, st.just(["--primary"])), max_size=4)
BASE = ["--listen-port", "8000", "127.0.0.1:80"]
COMMAND_LINES = st.one_of(st.lists(TOKENS, max_size=8),
                          SETTINGS.map(lambda pairs: BASE[:2] + sum(pairs, []) + BASE[2:]))


def check(argv):
    """argv parses to a config within bounds, or exits 2 with one error line (0 with output for --help)."""
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
    assert config.framing in ("none", "line", "resp"), argv
    assert isinstance(config.buffer, int) and config.buffer >= 0, argv
    assert config.metrics is None or 1 <= config.metrics[1] <= 65535, argv
    assert not config.primary or "--primary" in argv, argv
    assert config.mirror_policy in ("drop", "wait"), argv
    assert config.fin_timeout >= 0, argv
    assert config.send_proxy in ("", "v1", "v2"), argv
    assert isinstance(config.accept_proxy, tuple), argv
    assert config.session_preamble >= 0 and not (config.session_preamble and config.framing == "resp"), argv


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(COMMAND_LINES)
def test_generated_command_lines(argv):
    check(argv)


@pytest.mark.parametrize("option, value", [(o, v) for o, values in OPTION_VALUES.items() for v in values])
def test_every_option_value_alone_parses_within_bounds_or_exits_2(option, value):
    """Each value meant for an option, both spellings, with --primary or not: the same checks, always run."""
    for setting in ([option, value], [option + "=" + value]):
        check(BASE[:2] + setting + BASE[2:])
        check(BASE[:2] + ["--primary"] + setting + BASE[2:])
