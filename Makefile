# One-command set-up: each target creates .venv and installs hetvit into it first.
PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=  # e.g. DEMO_ARGS="--images PATH" where the CIFAR-10 test archive lies elsewhere
BIN := $(VENV)/bin

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/hetvit demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
