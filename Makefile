# streamguard: every target sets itself up (venv + project + npm packages), idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := node_modules/.installed-stamp

.PHONY: setup test lint demo dev bench clean

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,spark]'
	touch $(STAMP)

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
