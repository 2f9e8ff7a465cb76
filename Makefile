# Every target builds its own virtual environment from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-live bench chaos soak clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m fakes.demo

demo-live: $(STAMP)
	$(PY) -m fakes.demo --live

bench: $(STAMP)
	@command -v socat >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq socat) >/dev/null 2>&1 && echo "bench: installed socat for the comparison"; } || \
	  echo "bench: socat is not installed and could not be installed: its rows are skipped"
	$(PY) bench/bench.py

chaos: $(STAMP)
	$(PY) bench/chaos.py

soak: $(STAMP)
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
