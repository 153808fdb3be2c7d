# Two commands set everything up on a fresh Debian machine with Python 3.11:
#   make demo   -- installs, shows Outpost serving a model end to end, stops, exits 0
#   make test   -- the whole test suite, ruff and mypy
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The agent's request path runs compiled (setup.py: mypyc). Python imports the compiled module
# before its source, so any change under agent/ rebuilds it (the types of the modules it imports
# are compiled in too); the install builds it the first time.
COMPILED := $(VENV)/.compiled-stamp
AGENT_SRC := $(shell find agent -name '*.py')

.PHONY: all venv compiled sysdeps test lint typecheck pytest demo demo-fleet bench bench-fleet clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[hub,dev]'
	@touch $@ $(COMPILED)

venv: $(STAMP)

$(COMPILED): $(STAMP) setup.py $(AGENT_SRC)
	$(BIN)/python setup.py --quiet build_ext --inplace --parallel 2
	@touch $@

compiled: $(COMPILED)

# System packages the tests and the demo use (Mosquitto, systemd-analyze).
sysdeps:
	@bash packaging/dev/ensure-sysdeps.sh

lint: venv
	$(BIN)/ruff check agent hub tests examples setup.py

typecheck: venv
	$(BIN)/mypy

pytest: compiled sysdeps
	$(BIN)/pytest -q -p no:cacheprovider

test: lint typecheck pytest

demo: compiled sysdeps
	$(BIN)/python examples/demo.py

# The demo, then its hub, broker and two devices keep running (with traffic) until Ctrl-C.
demo-fleet: compiled sysdeps
	$(BIN)/python examples/demo.py --keep

bench: compiled
	$(BIN)/python -m tests.benchmarks.run

# A simulated fleet against one hub and a Mosquitto (docs/benchmarks.md, "Fleet scale"); ~8 min.
bench-fleet: compiled sysdeps
	$(BIN)/python -m tests.benchmarks.fleet_sim

clean:
	rm -rf $(VENV) out bench-results .mypy_cache .ruff_cache .pytest_cache build
	find agent -name '*.so' -delete
