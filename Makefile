# The two commands: `make up` starts everything, `make test` runs the whole suite.
# Both build .venv from pyproject.toml when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENGINES ?= 4
ARGS ?=

.PHONY: up test unit integration e2e bench lint venv clean schema

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/infermesh up --engines $(ENGINES) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/integration tests/e2e $(ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(ARGS)

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s -m bench tests/bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

schema: $(STAMP)
	$(BIN)/infermesh schema export docs/schema

clean:
	rm -rf $(VENV) .pytest_cache
