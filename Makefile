# The commands README.md gives. A fresh machine needs Python 3.13 and Node 20+; make does the rest.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# Python 3.13, the version Azure runs for this app (and the first whose worker runtime the app pins).
# PATH first; then pyenv's 3.13, whose `python3.13` shim refuses while another version is global.
PYTHON ?= $(shell \
	if python3.13 -c '' >/dev/null 2>&1; then echo python3.13; \
	elif command -v pyenv >/dev/null && ls -d "$$(pyenv root)"/versions/3.13.*/bin/python3.13 >/dev/null 2>&1; then \
		ls -d "$$(pyenv root)"/versions/3.13.*/bin/python3.13 | sort -V | tail -n 1; \
	fi)
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.package-lock.json
# The dev host and its worker speak FunctionRpc.proto; its Python modules are generated, not committed.
PROTOS := devstack/rpc/FunctionRpc.proto devstack/rpc/NullableTypes.proto
PROTO_STAMP := devstack/rpc/FunctionRpc_pb2.py

.PHONY: help setup run test test-fast token env timer lint clean demo-bundle bench protos

help:
	@echo "make run                       start the local stack (Ctrl-C stops it)"
	@echo "make test                      install what is missing, then run the whole test suite"
	@echo "make test-fast                 the same without the tests marked slow (seconds each)"
	@echo "make token USER=alice [ROLES=TokenService.Admin,Other]   print a user JWT from the running stack"
	@echo "make env [KEY=api]             print a value of the running stack's env.json (all of it without KEY)"
	@echo "make timer                     run the cleanup timer's work once, now, against the running stack"
	@echo "make lint                      ruff (lint and format) and mypy (types of shared/, function_app.py, devstack/)"
	@echo "make bench                     benchmarks: the service against the floor ACS and Table Storage set (a few minutes)"
	@echo "make demo-bundle               rebuild shared/demo/app.bundle.js (the demo page's script) with esbuild"

$(PY):
	@test -n "$(PYTHON)" || { echo "Python 3.13 is needed and none was found: install it (python.org, your package manager, or \`pyenv install 3.13\`), or point PYTHON=/path/to/python3.13 at one."; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 13) else f"{sys.executable} is Python {sys.version.split()[0]}; Azure runs this app on 3.13: set PYTHON=/path/to/python3.13")'
	$(PYTHON) -m venv $(VENV)

$(PY_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

# The oldest Node.js every pinned package's `engines` accepts (a test keeps it equal to package-lock.json).
NODE_MAJOR := 20

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js $(NODE_MAJOR) or newer (with npm)"; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= $(NODE_MAJOR) ? 0 : 1)' || { echo "Node.js $$(node --version) is too old: the pinned Node tools need Node.js $(NODE_MAJOR) or newer"; exit 1; }
	npm ci --no-audit --no-fund
	@touch $@

# No .pyi: protoc writes one that is not Python (a field named `in`), which mypy would read first.
$(PROTO_STAMP): $(PROTOS) $(PY_STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. $(PROTOS)

protos: $(PROTO_STAMP)

setup: $(PY_STAMP) $(NODE_STAMP) $(PROTO_STAMP)

run: setup
	$(PY) -m devstack up

# The demo page's browser test drives this Chromium (Debian's package); without it the test skips.
export CHROMIUM_PATH ?= /usr/bin/chromium

test: setup
	@test -x "$(CHROMIUM_PATH)" || echo "make test: $(CHROMIUM_PATH) not found, so the browser test of the demo page is SKIPPED (apt-get install chromium)"
	$(PY) -m pytest

# Everything but the tests marked slow: for the edit-test loop. CI and `make test` run them all.
test-fast: setup
	$(PY) -m pytest -m "not slow"

# Starts its own stack on free ports; prints a table, writes bench/results.json and bench/throughput.png,
# and exits 1 if a target fails.
bench: setup
	$(PY) -m bench

# USER must come from the command line: the shell's $$USER is the login name, not an app user.
token:
	@$(if $(filter command line,$(origin USER)),,$(error usage: make token USER=alice [ROLES=a,b]))
	@$(PY) -m devstack token '$(USER)' $(foreach r,$(subst $(comma), ,$(ROLES)),--role '$(r)')

comma := ,

# KEY must come from the command line, like USER above.
env:
	@$(PY) -m devstack env $(if $(filter command line,$(origin KEY)),'$(KEY)',)

timer:
	@$(PY) -m devstack timer cleanup

# The bundle is committed (Azure runs no Node build); a test checks that it matches app.js.
demo-bundle: $(NODE_STAMP)
	npm run --silent build:demo

lint: $(PY_STAMP) $(PROTO_STAMP)  # mypy reads the generated protobuf modules
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) node_modules .devstack .pytest_cache .ruff_cache .hypothesis devstack/rpc/*_pb2.py devstack/rpc/*_pb2.pyi
