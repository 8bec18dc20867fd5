# Two commands on a fresh machine:   make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests run on this many workers (pytest-xdist): most of them wait on Ray or a subprocess.
# loadgroup: a module marked xdist_group (costly module-scoped fixtures) stays on one worker.
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.tessera-installed

.PHONY: setup demo test bench clean help

help:
	@echo "make demo   set up .venv, write a sample corpus, run the demo moderation job"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks (prints numbers; asserts nothing about time)"

# torch first, from constraints.txt (the CPU build where pip can find it), then the project.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tessera sample data/sample
	$(BIN)/tessera run jobs/examples/demo-moderation.yaml

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=20 tests

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) data/sample out
