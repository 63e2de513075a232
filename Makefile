# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

# The Redis tests start a real redis-server: installed here when missing (Debian/Ubuntu).
install-dev: $(BIN)/python
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -z "$$missing" ] || { \
		echo "installing$$missing (the tests use them)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; }
	$(BIN)/python -m pip install --quiet -e '.[dev]'

## Install loopwise and run the demo on the built-in simulated model (no network, no keys).
demo: install
	$(BIN)/loopwise demo

## Install everything the tests need and run the whole test suite.
test: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy  # src and tests/typing_check.py, as [tool.mypy] in pyproject.toml says
	$(BIN)/python -m pytest

## Run the benchmarks (they print tables; they are not tests). instructions.py counts with
## valgrind (installed when missing); `pytest -m benchmark` checks that count is stable.
bench: install-dev
	@command -v valgrind >/dev/null 2>&1 || { \
		echo "installing valgrind (benchmarks/instructions.py counts with it)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq valgrind >/dev/null; }
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/instructions.py

clean:
	rm -rf $(VENV) .loopwise .pytest_cache
