# streamguard: every target sets itself up (venv + project + npm packages), idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := node_modules/.installed-stamp
# checkov (tests/test_terraform.py) in its own venv: it requires boto3 and packaging older than
# the project's, so in .venv it would downgrade them. Inside .venv: git-ignored, removed with it.
# Pinned: every release adds checks, and the test asserts zero failed ones; upgrade on purpose.
TOOLS := $(VENV)/tools
CHECKOV_VERSION := 3.3.30
TOOLS_STAMP := $(TOOLS)/.checkov-$(CHECKOV_VERSION)

.PHONY: setup system test lint demo dev bench clean

setup: $(STAMP) $(NODE_STAMP) $(TOOLS_STAMP) system

# Debian packages the tests start for real: PostgreSQL 15 (Dagster on PostgreSQL) and Chromium
# (tests/test_browser.py drives it with Playwright; Playwright's own browser download is not used).
# Installed only when missing (apt needs root; otherwise say what to install).
DEB_PACKAGES := postgresql-15 chromium
system:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "install the Debian packages: $$missing (sudo apt-get install $$missing)"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,spark]'
	touch $(STAMP)

$(TOOLS_STAMP): | $(STAMP)
	test -x $(TOOLS)/bin/python || python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $(TOOLS_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $(NODE_STAMP)

lint: setup
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .
	$(VENV)/bin/mypy streamguard models assets

test: lint
	$(VENV)/bin/pytest -q -ra

demo: setup
	$(VENV)/bin/streamguard demo

dev: setup
	$(VENV)/bin/streamguard dev

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf .streamguard .pytest_cache .mypy_cache .ruff_cache
