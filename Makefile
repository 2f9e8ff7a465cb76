# Every target builds its own virtual environment from nothing, from a Python every user can run
# (the tests also run the proxy as the unprivileged user nobody): the system's, where it is 3.10+.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip; assert sys.version_info >= (3, 10)' \
            >/dev/null 2>&1 && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-live bench chaos soak service-check servers metrics-check clean cluster-demo mirror-demo \
	reload-demo

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP) service-check servers
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m fakes.demo

demo-live: $(STAMP)
	$(PY) -m fakes.demo --live

# A source streaming through 3 reloads (add, remove, a bad file) and an upgrade in place, narrated.
reload-demo: $(STAMP)
	$(PY) -m fakes.reload_demo

# Three instances behind HAProxy (contrib/haproxy.cfg), 30 sources, one instance killed; haproxy comes from Debian.
cluster-demo: $(STAMP)
	@if ! { command -v haproxy || test -x /usr/sbin/haproxy; } >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) >/dev/null 2>&1; then \
	    echo "cluster-demo: installed haproxy"; \
	  else echo "cluster-demo: haproxy is not installed and could not be installed: the demo is skipped"; exit 0; fi; fi; \
	$(PY) -m fakes.cluster_demo

bench: $(STAMP)
	@command -v socat >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq socat) >/dev/null 2>&1 && echo "bench: installed socat for the comparison"; } || \
	  echo "bench: socat is not installed and could not be installed: its rows are skipped"
	@{ command -v stunnel4 || command -v stunnel; } >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq stunnel4) >/dev/null 2>&1 && echo "bench: installed stunnel4 for the TLS comparison"; } || \
	  echo "bench: stunnel is not installed and could not be installed: its TLS rows are skipped"
	$(PY) bench/bench.py
	$(PY) bench/memory.py

chaos: $(STAMP)
	$(PY) bench/chaos.py

soak: $(STAMP)
	$(PY) bench/soak.py

# systemd-analyze verify of contrib/socketproxy.service. verify fails when ExecStart's binary does
# not exist, so a copy with ExecStart pointed at the venv's command is checked. It may print a warning
# and still exit 0: any line of its output naming the unit fails the check.
UNIT := contrib/socketproxy.service
service-check: $(STAMP)
	@command -v systemd-analyze >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq systemd) >/dev/null 2>&1 && echo "service-check: installed systemd for systemd-analyze"; } || true
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
	  echo "service-check: systemd-analyze is not installed and could not be installed: check skipped"; exit 0; fi; \
	dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && \
	sed 's|^ExecStart=[^ ]*|ExecStart=$(CURDIR)/$(VENV)/bin/socketproxy|' $(UNIT) > "$$dir/socketproxy.service" && \
	out=$$(systemd-analyze verify "$$dir/socketproxy.service" 2>&1); rc=$$?; \
	test -z "$$out" || printf '%s\n' "$$out"; \
	if [ $$rc -ne 0 ] || printf '%s\n' "$$out" | grep -q 'socketproxy\.service'; then \
	  echo "service-check: FAILED: systemd-analyze verify $(UNIT) (exit $$rc)"; exit 1; fi; \
	echo "service-check: $(UNIT) verified (ExecStart=$(CURDIR)/$(VENV)/bin/socketproxy ...)"

# Servers some tests run against (tests/test_resp_redis.py needs redis-server; tests/test_mirror_servers.py and
# make mirror-demo need redis-server and redis-benchmark, nginx, ab (apache2-utils) and curl;
# tests/test_postgres_mirror.py needs postgresql-15: postgres and initdb in /usr/lib/postgresql/15/bin, psql,
# pg_isready and pgbench; tests/test_proxyproto.py and tests/test_cluster_demo.py need haproxy); without them
# those tests are skipped. nginx lives in /usr/sbin, which a user's PATH
# may lack.
servers:
	@{ command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && command -v redis-benchmark >/dev/null 2>&1; } || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools) >/dev/null 2>&1 && \
	  echo "servers: installed redis-server and redis-tools"; } || \
	  echo "servers: could not install redis-server: the tests that need it are skipped"
	@{ { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } && command -v ab >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; } || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx apache2-utils curl) >/dev/null 2>&1 && \
	  echo "servers: installed nginx, apache2-utils (ab) and curl"; } || \
	  echo "servers: could not install nginx, apache2-utils (ab) and curl: the tests that need them are skipped"
	@{ command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy; } || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) >/dev/null 2>&1 && \
	  echo "servers: installed haproxy"; } || \
	  echo "servers: could not install haproxy: the tests that put it in front of the proxy are skipped"
	@{ test -x /usr/lib/postgresql/15/bin/postgres && test -x /usr/lib/postgresql/15/bin/initdb && command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; } || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15) >/dev/null 2>&1 && \
	  echo "servers: installed postgresql-15 and postgresql-client-15"; } || \
	  echo "servers: could not install postgresql-15: the tests that need it are skipped"

# --primary with real servers: redis-benchmark through the proxy to a primary and a shadow redis (direct vs
# proxied, the shadow killed -9 and SIGSTOPped, the primary killed -9), then nginx and ab; exits 1 if a check fails.
mirror-demo: $(STAMP) servers
	$(PY) -m fakes.mirror_demo

# A live scrape of --metrics checked by promtool (Debian's prometheus package) and prometheus-client.
metrics-check: $(STAMP)
	@command -v promtool >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null 2>&1 && \
	  echo "metrics-check: installed prometheus for promtool"; } || \
	  echo "metrics-check: promtool is not installed and could not be installed: its check is skipped"
	$(PY) bench/metrics_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
