"""--primary in front of two real PostgreSQL 15 servers: psql and pgbench through the proxy.

The proxy runs `--primary --mirror-policy wait --metrics ... 127.0.0.1:PRIMARY 127.0.0.1:SHADOW`: the
primary answers the clients, the shadow gets a copy of every session and its replies are discarded.

- 20 psql sessions (sslmode=prefer, the default: each starts with an SSLRequest, which a server with
  ssl=off answers 'N', and only then the StartupMessage) each INSERT a row: all succeed, and once
  everything has settled the shadow has had as many sessions as the primary (pg_stat_database), holds
  the same rows, and its log has no "received unencrypted data after SSL request" (the SSLRequest and the
  StartupMessage reached it in one segment: PostgreSQL refuses that since CVE-2021-23214) and no "invalid
  length of startup packet". Before turns, the mirror's forwarder wrote the SSLRequest and the
  StartupMessage together (batched, or resent from its backlog after connecting late), and the shadow
  refused 5 to 12 of 20 sessions.
- pgbench -i on both servers, then `pgbench -C -T 10 -c 4 -n` through the proxy: exit 0, no failed
  transaction, and the shadow ends with the primary's pgbench_history (count, sum of delta) and balances.
  Failed before turns for the same reason (about half of pgbench's sessions never ran on the shadow).
- The shadow killed -9 (its postmaster, then its backends) 3 s into such a run and restarted on the same
  data directory: pgbench still exits 0 (the primary is not affected), the restarted shadow never gets
  the middle of a session (no protocol complaint in its log after the restart), and the proxy counts the
  mirror sessions it abandoned (socketproxy_mirror_sessions_abandoned_total > 0). Before, a cut mirror
  session was resumed in its middle on a new connection ("invalid length of startup packet").

The servers are Debian's postgresql-15 (binaries in /usr/lib/postgresql/15/bin), which `make servers`
installs; without them the tests are skipped with the reason. As root every server runs as the postgres
user (initdb refuses root) in a directory of its own under the system's temporary directory (pytest's
tmp_path is root's, mode 0700, so the postgres user could not enter it); its log (stderr) goes to
tmp_path. Every server is stopped by its pid, its backends included, and the test checks that none is
left.
"""
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

from support import free_port, kill_tree, reap_orphans, scaled, scrape, wait_until

PG_BIN = "/usr/lib/postgresql/15/bin"
POSTGRES = os.path.join(PG_BIN, "postgres")
INITDB = os.path.join(PG_BIN, "initdb")
PG_USER = "postgres"  # the OS user the servers run as (when the tests run as root) and the database role
SERVER_OPTIONS = ("listen_addresses=127.0.0.1", "ssl=off", "fsync=off", "synchronous_commit=off",
                  "full_page_writes=off", "log_connections=on", "logging_collector=off")
PSQL_SESSIONS = 20
PGBENCH_SECONDS, PGBENCH_CLIENTS, PGBENCH_SCALE = 10, 4, 1
KILL_AFTER_S = 3.0  # the shadow is killed this long into the pgbench run (of PGBENCH_SECONDS)
# What a shadow says when it gets the SSLRequest and the StartupMessage at once (the bug of test a) ...
SSL_COMPLAINT = "received unencrypted data after SSL request"
# ... and when a connection does not start at a session's start (the middle of a session, a cut startup
# packet) or ends in the middle of one.
PROTOCOL_COMPLAINTS = ("invalid length of startup packet", "unsupported frontend protocol",
                       "incomplete startup packet", "unexpected EOF on client connection",
                       "invalid frontend message type", "expected password response")
ABANDONED = "socketproxy_mirror_sessions_abandoned_total"


def tool(name):
    """A PostgreSQL program: the version 15 binary, else the one on PATH (Debian's pg_wrapper), or None."""
    path = os.path.join(PG_BIN, name)
    return path if os.access(path, os.X_OK) else shutil.which(name)


def why_no_postgres():
    """None when the servers can run here, else why not (for the skip line)."""
    missing = [path for path in (POSTGRES, INITDB) if not os.access(path, os.X_OK)]
    missing += [name for name in ("psql", "pgbench", "pg_isready") if not tool(name)]
    if missing:
        return "%s not installed (`make servers` installs postgresql-15)" % ", ".join(missing)
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            return "runuser is not installed (initdb must run as the postgres user, not root)"
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return "there is no %s user to run the servers as (postgresql-15's package creates it)" % PG_USER
    return None


needs_postgres = pytest.mark.skipif(bool(why_no_postgres()), reason=str(why_no_postgres()))


def client_env():
    """The environment of psql and pgbench: none of the caller's PG* settings (the connection strings and
    options say everything), no .psqlrc, no password file lookups in root's home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update(PGCONNECT_TIMEOUT=str(int(scaled(10))), PSQLRC="/dev/null")
    return env


def conninfo(port, dbname="postgres", sslmode="disable"):
    return "host=127.0.0.1 port=%d user=%s dbname=%s sslmode=%s" % (port, PG_USER, dbname, sslmode)


def psql(port, sql, dbname="postgres", sslmode="disable", timeout=30.0):
    """psql -c SQL on a connection of its own: the CompletedProcess (text, output captured)."""
    return subprocess.run([tool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                           conninfo(port, dbname, sslmode), "-c", sql],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=client_env(),
                          timeout=scaled(timeout), start_new_session=True)


class PostgresServer:
    """A PostgreSQL 15 postmaster on 127.0.0.1:PORT with a data directory of its own (initdb at creation),
    ssl off, no fsync, connections logged; its stderr (the server log) appended to log_path. As root it
    runs as the postgres user. start() waits until pg_isready says it accepts connections; kill() is a
    kill -9 of the postmaster and of every process it had forked, after which start() restarts it on the
    same data directory (crash recovery); stop() ends it by its pid (SIGINT: fast shutdown, which ends
    the sessions, unlike SIGTERM's smart shutdown that waits for them; then SIGKILL of the whole tree)."""

    def __init__(self, name, port, log_dir):
        self.name = name
        self.port = port
        self.log_path = os.path.join(str(log_dir), "%s.log" % name)
        self.as_postgres = os.geteuid() == 0
        self.base = tempfile.mkdtemp(prefix="socketproxy-pg-%s-" % name)
        self.data = os.path.join(self.base, "data")
        self.sockets = os.path.join(self.base, "sockets")  # -k: the Unix socket directory, unused by the tests
        os.mkdir(self.sockets)
        if self.as_postgres:
            user = pwd.getpwnam(PG_USER)
            for path in (self.base, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.proc = None
        argv = [INITDB, "-D", self.data, "--auth=trust", "-U", PG_USER, "--no-sync"]
        if self.as_postgres:
            argv = ["runuser", "-u", PG_USER, "--"] + argv
        done = subprocess.run(argv, cwd=self.base, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=scaled(60))
        if done.returncode:
            shutil.rmtree(self.base, ignore_errors=True)
            raise RuntimeError("initdb for %s failed (exit %d): %s%s" % (name, done.returncode, done.stdout[-1500:],
                                                                       done.stderr[-1500:]))

    def argv(self):
        argv = [POSTGRES, "-D", self.data, "-p", str(self.port), "-k", self.sockets]
        for option in SERVER_OPTIONS:
            argv += ["-c", option]
        return argv

    def start(self, timeout=30.0):
        """Start it (again) and wait until it accepts connections (RuntimeError if it exits or never does)."""
        credentials = {}
        if self.as_postgres:
            credentials = dict(user=PG_USER, group=pwd.getpwnam(PG_USER).pw_gid, extra_groups=[])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=quit_with_parent, **credentials)
        try:
            wait_until(lambda: self.proc.poll() is not None or self.ready(), timeout, interval=0.1,
                       message=lambda: "postgres %s on 127.0.0.1:%d does not accept connections: %s" % (
                           self.name, self.port, self.log_tail()))
        except AssertionError as exc:
            raise RuntimeError(str(exc)) from None
        if self.proc.poll() is not None:
            raise RuntimeError("postgres %s on 127.0.0.1:%d exited %s: %s" % (
                self.name, self.port, self.proc.returncode, self.log_tail()))
        return self

    def ready(self):
        """pg_isready: it accepts connections (checked on template1: no session of the database 'postgres')."""
        try:
            return subprocess.run([tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
                                   "-d", "template1", "-t", "2"], stdin=subprocess.DEVNULL, capture_output=True,
                                  env=client_env(), timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def sql(self, query, dbname="postgres"):
        """The output of one query (psql -At), straight to this server; AssertionError if it fails."""
        done = psql(self.port, query, dbname)
        assert done.returncode == 0, "%s on %s: exit %d: %s" % (query, self.name, done.returncode, done.stderr)
        return done.stdout.strip()

    def sessions(self):
        """pg_stat_database.sessions of the database 'postgres', read from template1 (so not counting itself)."""
        return int(self.sql("SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'", "template1"))

    def client_backends(self):
        """Client sessions open now, other than the one asking."""
        return int(self.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND pid <> pg_backend_pid()", "template1"))

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, size=1500):
        return self.log()[-size:]

    def tree(self):
        """The postmaster and every process it forked (each backend leads its own session: a process group
        kill would miss them)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self):
        """kill -9 of the postmaster, then of every process it had forked; postmaster.pid removed, so start()
        can run it again. The postmaster is stopped first, so it forks nothing between the list and the kill."""
        try:
            os.kill(self.proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        procs = self.tree()
        self.proc.kill()
        self.proc.wait()
        survivors = kill_tree(procs[1:])  # orphans now: adopted and reaped by the test process (subreaper)
        assert not survivors, "backends of %s survived SIGKILL: %s" % (self.name, survivors)
        try:
            os.unlink(os.path.join(self.data, "postmaster.pid"))
        except FileNotFoundError:
            pass
        return time.monotonic()

    def stop(self, grace=10.0):
        """Fast shutdown (SIGINT), waited for; then SIGKILL of whatever is left of the tree. Returns the
        processes that survived even that (none expected)."""
        if self.proc is None:
            return []
        procs = self.tree()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                wait_until(lambda: self.proc.poll() is not None, grace, interval=0.05)
            except AssertionError:
                pass
        survivors = kill_tree(procs + [p for p in self.tree() if p not in procs])
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        reap_orphans()
        return survivors

    def remove(self):
        shutil.rmtree(self.base, ignore_errors=True)


def quit_with_parent():
    """Runs in the postmaster before exec (after the switch to the postgres user, which would clear it):
    SIGQUIT (immediate shutdown, its children included) if the test process dies, even by kill -9."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGQUIT, 0, 0, 0)  # PR_SET_PDEATHSIG


def postgres_processes():
    """Our descendants that are PostgreSQL processes (a postmaster, or a backend orphaned and adopted by
    the test process, which is a subreaper)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and (
                    proc.exe() == POSTGRES or proc.cmdline()[:1] == [POSTGRES]
                    or " ".join(proc.cmdline()).startswith("postgres:")):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def postgres(tmp_path):
    """Factory: postgres(name) initdb's and starts a server on a free port; at teardown every one is stopped
    by its pid (its backends included), its directory removed, and no PostgreSQL process may be left."""
    made = []

    def make(name):
        server = PostgresServer(name, free_port(), tmp_path)
        made.append(server)
        return server.start(scaled(30))

    yield make
    survivors = []
    for server in made:
        survivors += server.stop()
        server.remove()
    left = postgres_processes()
    kill_tree(left)
    reap_orphans()
    assert not survivors and not left, "PostgreSQL processes left: %s %s" % (survivors, left)


def start_mirror_proxy(proxy, primary, shadow, *options):
    """The proxy --primary --mirror-policy wait in front of primary and shadow, with --metrics; the
    (handle, metrics port) once it serves metrics."""
    metrics_port = free_port()
    px = proxy(["127.0.0.1:%d" % primary.port, "127.0.0.1:%d" % shadow.port], "--primary", "--mirror-policy", "wait",
               "--metrics", "127.0.0.1:%d" % metrics_port, *options)
    wait_until(lambda: "serving metrics" in px.log(), 20, message=lambda: px.log()[-3000:])
    return px, metrics_port


def metric(values, name):
    """The sum of a metric's samples over every label set; None when no sample has that name."""
    found = [value for (sample, _labels), value in values.items() if sample == name]
    return sum(found) if found else None


def sessions_in_progress(port):
    """Connections to a server's port not yet closed by the server (/proc/net/tcp: ESTABLISHED, SYN_RECV or
    CLOSE_WAIT with that local port): a session being accepted, run or ended. Unlike pg_stat_activity
    this also sees a connection still in the accept queue or a backend not yet started."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] in ("01", "03", "08"):
                count += 1
    return count


def quiet(metrics_port, *servers):
    """Everything has settled: the proxy serves no source (every session's forwarders are done: what the
    shadow was sent is acknowledged by its kernel), then no connection to any server is still open on the
    server's side (every backend has ended, and a backend flushes its statistics before it ends)."""
    try:
        if metric(scrape(metrics_port), "socketproxy_sources_active") != 0:
            return False
    except (OSError, ValueError):
        return False
    return not any(sessions_in_progress(server.port) for server in servers)


def complaints(text, patterns):
    """The lines of a server log that carry one of patterns."""
    return [line for line in text.splitlines() if any(pattern in line for pattern in patterns)]


def summary(lines, limit=5):
    return "%d lines%s" % (len(lines), (": " + " | ".join(lines[:limit])) if lines else "")


def pgbench_init(server):
    done = subprocess.run([tool("pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE), "-h", "127.0.0.1", "-p",
                           str(server.port), "-U", PG_USER, "postgres"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=dict(client_env(), PGSSLMODE="disable"),
                          timeout=scaled(60))
    assert done.returncode == 0, "pgbench -i on %s: exit %d: %s" % (server.name, done.returncode, done.stderr[-2000:])


class Pgbench:
    """pgbench -C -T SECONDS -c CLIENTS -n through the proxy (sslmode=prefer, libpq's default), in the
    background, output to a file; finish() waits (killed by its pid at the deadline) and parses it."""

    def __init__(self, port, log_path, seconds=PGBENCH_SECONDS, clients=PGBENCH_CLIENTS):
        self.argv = [tool("pgbench"), "-C", "-n", "-T", str(seconds), "-c", str(clients), "-h", "127.0.0.1", "-p",
                     str(port), "-U", PG_USER, "postgres"]
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(client_env(), PGSSLMODE="prefer"), start_new_session=True)
        self.returncode = None
        self.output = ""

    def running(self):
        return self.proc.poll() is None

    def finish(self, timeout):
        try:
            wait_until(lambda: not self.running(), timeout, interval=0.1)
        except AssertionError:
            self.proc.kill()
        self.returncode = self.proc.wait()
        with open(self.log_path, "rb") as f:
            self.output = f.read().decode("utf-8", "replace")
        return self

    def transactions(self):
        found = re.search(r"^number of transactions actually processed: (\d+)", self.output, re.M)
        return int(found.group(1)) if found else None

    def failed(self):
        found = re.search(r"^number of failed transactions: (\d+)", self.output, re.M)
        return int(found.group(1)) if found else 0

    def problem(self):
        """What went wrong, in one line ('' when it exited 0 with transactions and none failed)."""
        if self.returncode == 0 and self.transactions() and not self.failed():
            return ""
        return "pgbench exit %s, %s transactions, %s failed: %s" % (
            self.returncode, self.transactions(), self.failed(), self.output[-1500:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def pgbench(tmp_path):
    """Factory: pgbench(port) starts a Pgbench; any still running is killed (by its pid) at teardown."""
    made = []

    def start(port):
        run = Pgbench(port, str(tmp_path / ("pgbench%d.log" % len(made))))
        made.append(run)
        return run

    yield start
    for run in made:
        run.stop()


BANK = ("SELECT (SELECT count(*) FROM pgbench_history) || ' ' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        " || ' ' || (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers)"
        " || ' ' || (SELECT sum(bbalance) FROM pgbench_branches)")


def bank(server):
    """pgbench's tables in brief: history rows, sum of history deltas, sums of account, teller and branch
    balances."""
    return dict(zip(("history", "delta", "accounts", "tellers", "branches"), server.sql(BANK).split()))


def no_traceback(px):
    assert "Traceback" not in px.log(), px.log()[-4000:]


@needs_postgres
@pytest.mark.timeout(120)
def test_postgres_server_helper_runs_kills_restarts_and_stops_every_process(postgres):
    """The helper itself: psql straight to each of two servers answers; a kill -9 takes the postmaster and
    every backend (an idle psql session included) with it; the restarted server (same data directory, crash
    recovery) still has the table; stop() leaves no process (the fixture checks)."""
    one, two = postgres("one"), postgres("two")
    assert one.sql("SELECT 41 + 1") == "42" and two.sql("SELECT 42") == "42"
    two.sql("SET synchronous_commit = on; CREATE TABLE kept (i int); INSERT INTO kept VALUES (7)")  # in the WAL
    idle = subprocess.Popen([tool("psql"), "-X", conninfo(two.port)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=client_env(),
                            start_new_session=True)
    try:
        wait_until(lambda: two.client_backends() == 1, 20, message="the idle psql session never showed")
        before = two.tree()
        assert len(before) >= 5, before  # postmaster, checkpointer, ..., the idle session's backend
        two.kill()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in before)
        assert not os.path.exists(os.path.join(two.data, "postmaster.pid"))
        two.start(scaled(30))
        assert two.sql("SELECT i FROM kept") == "7"
    finally:
        if idle.poll() is None:
            idle.kill()
        idle.wait()
    assert "database system was interrupted" in two.log() or "not properly shut down" in two.log(), two.log_tail()


@needs_postgres
@pytest.mark.timeout(120)
def test_psql_sessions_with_sslmode_prefer_through_the_primary_all_reach_the_shadow(proxy, postgres):
    """20 psql sessions (sslmode=prefer: SSLRequest, 'N', then the StartupMessage) through the proxy, each
    inserting a row: all succeed; once settled (no source at the proxy, no session open on either server),
    the shadow's session count (pg_stat_database, read from template1) grew as much as the primary's
    (20), it holds the same rows, and its log has no SSL-request or startup-packet complaint.

    Failed before turns: some sessions were refused by the shadow ("received unencrypted data after SSL
    request"), the mirror having written the SSLRequest and the StartupMessage to it in one go."""
    primary, shadow = postgres("primary"), postgres("shadow")
    for server in (primary, shadow):
        server.sql("CREATE TABLE mirror_check (i int PRIMARY KEY)")
    px, metrics_port = start_mirror_proxy(proxy, primary, shadow)
    wait_until(lambda: quiet(metrics_port, primary, shadow), 20, interval=0.1,
               message="the CREATE TABLE sessions never ended")
    before = {server.name: server.sessions() for server in (primary, shadow)}
    failures = []
    for i in range(PSQL_SESSIONS):
        done = psql(px.port, "INSERT INTO mirror_check VALUES (%d)" % i, sslmode="prefer")
        if done.returncode:
            failures.append("session %d: exit %d: %s" % (i, done.returncode, done.stderr.strip()))
    assert not failures, "psql through the proxy failed: %s\n%s" % (failures, px.log()[-3000:])

    def growth(server):
        return server.sessions() - before[server.name]

    def rows(server):  # a session of the database 'postgres' itself: read after the session counts
        return server.sql("SELECT coalesce(string_agg(i::text, ',' ORDER BY i), '') FROM mirror_check")

    # Settled: no source left at the proxy (the shadow was sent all it will get) and no session open on
    # either server (each one's statistics flushed as it ended).
    wait_until(lambda: quiet(metrics_port, primary, shadow), 30, interval=0.2,
               message=lambda: "never settled: %s" % px.log()[-3000:])
    grew = {server.name: growth(server) for server in (primary, shadow)}
    shadow_log = shadow.log()
    problems = []
    if grew["primary"] != PSQL_SESSIONS:
        problems.append("the primary had %d sessions of the database, not %d" % (grew["primary"], PSQL_SESSIONS))
    if grew["shadow"] != grew["primary"]:
        problems.append("the shadow had %d sessions, the primary %d" % (grew["shadow"], grew["primary"]))
    if rows(shadow) != rows(primary):
        problems.append("the shadow's rows %r, the primary's %r" % (rows(shadow), rows(primary)))
    for pattern in (SSL_COMPLAINT, "invalid length of startup packet"):
        bad = complaints(shadow_log, [pattern])
        if bad:
            problems.append("the shadow's log has %r: %s" % (pattern, summary(bad, 3)))
    assert not problems, "%s\nthe shadow's log: %s\nproxy log tail:\n%s" % (
        "\n".join(problems), shadow.log_path, px.log()[-1500:])
    no_traceback(px)


@needs_postgres
@pytest.mark.timeout(120)
def test_pgbench_with_a_connection_per_transaction_through_the_primary_leaves_equal_tables(proxy, postgres, pgbench):
    """pgbench -i -s 1 on both servers, then pgbench -C -T 10 -c 4 -n through the proxy: exit 0, no failed
    transaction, every transaction in the primary's pgbench_history; once settled the shadow's
    pgbench_history (rows, sum of delta) and balances (accounts, tellers, branches) equal the primary's.

    Failed before turns: some of pgbench's sessions never ran on the shadow (see the psql test)."""
    primary, shadow = postgres("primary"), postgres("shadow")
    for server in (primary, shadow):
        pgbench_init(server)
    assert bank(primary) == bank(shadow), (bank(primary), bank(shadow))
    px, metrics_port = start_mirror_proxy(proxy, primary, shadow)
    run = pgbench(px.port).finish(scaled(PGBENCH_SECONDS + 30))
    assert not run.problem(), "%s\n%s" % (run.problem(), px.log()[-3000:])
    assert int(bank(primary)["history"]) == run.transactions(), (bank(primary), run.transactions())
    wait_until(lambda: quiet(metrics_port, primary, shadow), 30, interval=0.2,
               message=lambda: "never settled: %s" % px.log()[-3000:])
    wanted, got = bank(primary), bank(shadow)
    refused = complaints(shadow.log(), [SSL_COMPLAINT] + list(PROTOCOL_COMPLAINTS))
    assert got == wanted, (
        "the shadow's pgbench tables differ from the primary's after %d transactions (a connection each):\n"
        "  primary %s\n  shadow  %s\nthe shadow's log: %s\nproxy log tail:\n%s" % (
            run.transactions(), wanted, got, summary(refused, 3), px.log()[-1500:]))
    assert not refused, "the shadow's log: %s" % summary(refused)
    no_traceback(px)


@needs_postgres
@pytest.mark.timeout(120)
def test_a_restarted_shadow_mid_pgbench_abandons_the_cut_mirror_sessions(proxy, postgres, pgbench):
    """A mirror session cut by its shadow going away is abandoned, not resumed mid-session; the proxy counts
    them in socketproxy_mirror_sessions_abandoned_total.

    pgbench -C -T 10 -c 4 -n through the proxy; 3 s in (the shadow having run transactions) the shadow is
    killed -9, its backends too, and restarted on the same data directory. pgbench exits 0 with no failed
    transaction (the primary is not affected); the restarted shadow runs sessions again, and its log after
    the restart has no protocol complaint (a session's middle taken for a startup packet, a cut startup
    packet, an EOF inside a session); the scrape shows abandoned mirror sessions (> 0)."""
    primary, shadow = postgres("primary"), postgres("shadow")
    for server in (primary, shadow):
        pgbench_init(server)
    px, metrics_port = start_mirror_proxy(proxy, primary, shadow, "--retry-interval", "0.5")
    run = pgbench(px.port)

    def shadow_history():
        try:
            return int(bank(shadow)["history"])
        except (AssertionError, ValueError):
            return 0

    wait_until(lambda: not run.running() or (time.monotonic() - run.started >= KILL_AFTER_S and shadow_history() > 0),
               PGBENCH_SECONDS + 20, interval=0.25, message="the shadow ran no transaction")
    assert run.running(), "pgbench ended before the kill: nothing was tested: %s" % run.finish(1).output[-1500:]
    shadow.kill()
    killed_at = time.monotonic() - run.started
    restart_offset = len(shadow.log())
    shadow.start(scaled(30))
    restarted_at = time.monotonic() - run.started
    assert run.running(), "pgbench ended before the shadow was back (killed %.1f s in, back %.1f s in)" % (
        killed_at, restarted_at)
    run.finish(scaled(PGBENCH_SECONDS + 30))
    problems = []
    if run.problem():
        problems.append(run.problem())
    wait_until(lambda: quiet(metrics_port, primary, shadow), 30, interval=0.2,
               message=lambda: "never settled: %s" % px.log()[-3000:])
    after = shadow.log()[restart_offset:]
    if "connection authorized" not in after:
        problems.append("the restarted shadow got no session (killed %.1f s in, back %.1f s in): nothing tested" % (
            killed_at, restarted_at))
    bad = complaints(after, PROTOCOL_COMPLAINTS)
    if bad:
        problems.append("the restarted shadow's log has protocol complaints: %s" % summary(bad))
    abandoned = metric(scrape(metrics_port), ABANDONED)
    if not abandoned:
        problems.append("%s is %s (expected > 0)" % (ABANDONED, "missing from the scrape" if abandoned is None
                                                      else abandoned))
    if px.proc.poll() is not None:
        problems.append("the proxy exited %s" % px.proc.returncode)
    assert not problems, "shadow killed %.1f s in, back %.1f s in; %d transactions:\n%s\nproxy log tail:\n%s" % (
        killed_at, restarted_at, run.transactions() or 0, "\n".join(problems), px.log()[-1500:])
    no_traceback(px)
