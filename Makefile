# The commands README.md gives. A fresh machine needs Python 3.11+ and Node 20+; make does the rest.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.package-lock.json

.PHONY: help setup run test token lint clean demo-bundle bench

help:
	@echo "make run                       start the local stack (Ctrl-C stops it)"
	@echo "make test                      install what is missing, then run the whole test suite"
	@echo "make token USER=alice [ROLES=TokenService.Admin,Other]   print a user JWT from the running stack"
	@echo "make lint                      ruff"
	@echo "make bench                     benchmarks: the service against the floor ACS and Table Storage set (a few minutes)"
	@echo "make demo-bundle               rebuild shared/demo/app.bundle.js (the demo page's script) with esbuild"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

$(PY_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 or newer"; exit 1; }
	npm ci --no-audit --no-fund
	@touch $@

setup: $(PY_STAMP) $(NODE_STAMP)

run: setup
	$(PY) -m devstack up

# The demo page's browser test drives this Chromium (Debian's package); without it the test skips.
export CHROMIUM_PATH ?= /usr/bin/chromium

test: setup
	@test -x "$(CHROMIUM_PATH)" || echo "make test: $(CHROMIUM_PATH) not found, so the browser test of the demo page is SKIPPED (apt-get install chromium)"
	$(PY) -m pytest

# Starts its own stack on free ports; prints a table, writes bench/results.json and bench/throughput.png,
# and exits 1 if a target fails.
bench: setup
	$(PY) -m bench

# USER must come from the command line: the shell's $$USER is the login name, not an app user.
token:
	@$(if $(filter command line,$(origin USER)),,$(error usage: make token USER=alice [ROLES=a,b]))
	@$(PY) -m devstack token '$(USER)' $(foreach r,$(subst $(comma), ,$(ROLES)),--role '$(r)')

comma := ,

# The bundle is committed (Azure runs no Node build); a test checks that it matches app.js.
demo-bundle: $(NODE_STAMP)
	npm run --silent build:demo

lint: $(PY_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) node_modules .devstack .pytest_cache .ruff_cache
