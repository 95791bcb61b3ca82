# Pollen: `make run` starts the whole stack locally, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SCREENSHOTS_DIR ?= docs/screenshots

.PHONY: install services test lint typecheck pytest run bench soak churn screenshots clean

$(STAMP): pyproject.toml
	bash .ci/venv $(PYTHON) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# redis-server and a running RabbitMQ (Debian's packages, installed when missing)
services:
	@bash .ci/services

pytest: $(STAMP) services
	$(BIN)/pytest -q

test: lint typecheck pytest

# Benchmarks vs Flower (tens of minutes; BENCH_ARGS=--quick for a few): writes BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# Soak (about 15 minutes): 1M tasks through a private RabbitMQ node, collector, enabler and API
# with POLLEN_MAX_TASKS=200000; checks Redis memory, process RSS and logs (SOAK_ARGS=--help).
soak: $(STAMP) services
	$(BIN)/python -m tools.soak $(SOAK_ARGS)

churn: $(STAMP) services
	$(BIN)/python -m tools.churn $(CHURN_ARGS)

run: $(STAMP)
	$(BIN)/python -m demo.launcher

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Refresh the README's dashboard screenshots from a real stack.
screenshots: $(STAMP)
	SCREENSHOTS_DIR=$(CURDIR)/$(SCREENSHOTS_DIR) $(BIN)/pytest -q tests/dashboard
