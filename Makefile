# Stepwise: `make demo` runs the sample test case end to end; `make test` runs the test suite.
# Both install what they need first: uv (through pip), the locked Python packages, and
# Debian's chromium when it is missing and we run as root.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# uv from PATH, or the one `pip install --user uv` puts in ~/.local/bin.
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
CHROMIUM ?= $(or $(STEPWISE_CHROMIUM),/usr/bin/chromium)
PYTEST_ARGS ?= -q -ra --timeout=600
BENCH_ARGS ?=
ONCE ?=
DEMO_ARGS ?= $(if $(ONCE),--once)

export ANONYMIZED_TELEMETRY := false
export BROWSER_USE_VERSION_CHECK := false

.PHONY: help demo test bench lint format setup uv sync chromium clean

help:
	@echo "make demo        run the stack and the sample test case (ONCE=1 exits when the run ends)"
	@echo "make test        run the test suite (PYTEST_ARGS='$(PYTEST_ARGS)')"
	@echo "make lint        ruff format --check, ruff check, mypy"
	@echo "make bench       run the benchmarks in bench/ (BENCH_ARGS=--short for a quick pass)"
	@echo "make setup       install uv, the Python packages and chromium only"

demo: setup
	$(UV) run --frozen stepwise demo $(DEMO_ARGS)

test: setup
	$(UV) run --frozen pytest $(PYTEST_ARGS)

bench: setup
	@if ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
			echo "redis-server not found: installing Debian's redis-server for the baseline"; \
			apt-get update && apt-get install -y --no-install-recommends redis-server; \
		else \
			echo "note: redis-server not found and not root: the Redis baseline will be skipped"; \
		fi; \
	fi
	$(UV) run --frozen python -m bench $(BENCH_ARGS)

lint: sync
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen ruff check .
	$(UV) run --frozen mypy src libs/src services/*/src

format: sync
	$(UV) run --frozen ruff format .

setup: sync chromium

uv:
	@if ! [ -x "$(UV)" ]; then \
		echo "uv not found: installing it with pip"; \
		python3 -m pip install --user --quiet uv \
			|| python3 -m pip install --user --quiet --break-system-packages uv \
			|| { echo "error: could not install uv; install it (https://docs.astral.sh/uv/) and rerun" >&2; exit 1; }; \
	fi

sync: uv
	$(UV) sync --frozen

chromium:
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "chromium not found at $(CHROMIUM): installing Debian's chromium"; \
		apt-get update && apt-get install -y chromium; \
	else \
		echo "error: chromium not found at $(CHROMIUM). Install it (Debian/Ubuntu: sudo apt-get install -y chromium)" >&2; \
		echo "       or set STEPWISE_CHROMIUM to the path of a Chromium binary." >&2; \
		exit 1; \
	fi

clean:
	rm -rf .stepwise test-artifacts .pytest_cache .ruff_cache .mypy_cache
