# agentspoonsd — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= agentspoonsd.toml

.PHONY: run test lint format clean bench bench-dashboard screenshots

# The venv is (re)built when pyproject.toml changes; the stamp records what was installed.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

# `make run` serves with a development token that outlives restarts, so an open dashboard and a
# running `watch` reconnect: build/devtoken.py makes it once in $(DEV_DIR) (git-ignored: the
# plain token in token, mode 0600; its digest in tokens.toml) and prints it at every run.
# `make run DEV_DIR=` runs without it (an ephemeral token at each start, when none is configured).
DEV_DIR ?= .dev

ifeq ($(strip $(DEV_DIR)),)
run: $(VENV)/.installed
	$(BIN)/agentspoonsd run --config '$(CONFIG)'
else
run: $(VENV)/.installed
	@$(BIN)/python build/devtoken.py '$(DEV_DIR)' --config '$(CONFIG)' --program '$(BIN)/agentspoonsd'
	AGENTSPOONSD_AUTH__TOKENS_FILE='$(abspath $(DEV_DIR))/tokens.toml' \
		exec $(BIN)/agentspoonsd run --config '$(CONFIG)'
endif

# mypy reads its settings (strict, the pydantic plugin, the files: daemon/) from pyproject.toml.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

# pytest exits 5 when it collects nothing: make treats that as the failure it is. Most tests
# wait on processes and sockets, so they run on $(TEST_WORKERS) workers (pytest-xdist, a test
# module per worker at a time); those marked `serial` (they measure latency, CPU or memory:
# tests/conftest.py) run afterwards on their own.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -m serial

format: $(VENV)/.installed-test
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

# The benchmark (not part of `make test`): the daemon, Node.js `ws` and Python `websockets` under
# the same epoll load client. run.py builds bench/.build/loadclient and installs the comparison
# servers' dependencies under bench/ on first use. Smoke run: make bench ARGS=--quick
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py $(ARGS)
	$(BIN)/python bench/market.py $(MARKET_ARGS)
	$(BIN)/python bench/ship.py

# The dashboard's CPU in Chromium: 50 symbols at 1 update/s, 30 s (bench/dashboard_cpu.py; not
# part of `make bench`, which measures the daemon). DASHBOARD_ARGS=--open 4: four charts open.
bench-dashboard: $(VENV)/.installed-test
	$(BIN)/python bench/dashboard_cpu.py $(DASHBOARD_ARGS)

# docs/dashboard-1400.png and docs/dashboard-390.png: the page in Debian's chromium, against a
# real daemon (build/screenshots.py; build/ensure-chromium.sh installs chromium when missing).
screenshots: $(VENV)/.installed-test
	sh build/ensure-chromium.sh
	$(BIN)/python build/screenshots.py docs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache daemon/*.egg-info bench/.build bench/.runs

# --- Shipping: one frozen executable, its installation, the config's JSON Schema ---------------
.PHONY: binary install uninstall schema
PREFIX  ?= /usr/local
DESTDIR ?=
# The freeze is cached: rebuilt only when a source, the spec or the dependencies change (the
# package's folders are listed too, so an added or removed module counts).
BINARY_SOURCES := $(shell find daemon/agentspoonsd -name '*.py' -o -type d ! -name __pycache__ \
	-o -path '*/dashboard/static/*' -type f) \
	build/agentspoonsd.spec build/entry.py build/freeze.sh pyproject.toml

$(VENV)/.installed-pyinstaller: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'pyinstaller>=6.10,<7'
	touch $@

dist/agentspoonsd: $(BINARY_SOURCES) $(VENV)/.installed $(VENV)/.installed-pyinstaller
	sh build/freeze.sh $(BIN)/pyinstaller $@

binary: dist/agentspoonsd

# Binary to $(DESTDIR)$(PREFIX)/bin, units to $(DESTDIR)/etc/systemd/system, config to
# $(DESTDIR)/etc/agentspoonsd (an edited config is never overwritten: the new one lands beside it),
# and a manifest of it all. It installs the BINARY that exists and never builds one: a freeze run
# by `sudo make install` would leave root-owned files in the tree. Without it, it refuses and says
# to run `make binary` first, as the normal user.
BINARY ?= dist/agentspoonsd
install:
	DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' sh build/install.sh '$(BINARY)'

# Removes what the manifest lists (same DESTDIR and PREFIX as the install). Tokens, state and an
# edited config are kept unless PURGE=1.
PURGE ?=
uninstall:
	DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' PURGE='$(PURGE)' sh build/uninstall.sh

# config/agentspoonsd.schema.json from the pydantic models (tests/test_config_files.py checks it).
schema: $(VENV)/.installed
	$(BIN)/python build/schema.py config/agentspoonsd.schema.json
