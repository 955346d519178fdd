# One gate: `make lint` and `make test` are exactly what CI (.ci/run) runs.
# Every target sets up .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo lint test test-shared test-crash bench fmt clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/backfill demo

lint: $(STAMP)
	$(BIN)/ruff check backfill tests benchmarks
	$(BIN)/ruff format --check backfill tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Two workers (pytest-xdist; one on a one-core machine): every test binds port 0, works under its
# own tmp_path and passes its environment to subprocesses explicitly, so none shares state.
# worksteal: a few tests take 20-60 s, and an idle worker takes queued tests from a busy one.
test: $(STAMP)
	$(BIN)/pytest -n auto --maxprocesses=2 --dist worksteal

# The engine's behaviour suites again, every ledger on PostgreSQL and every root on S3 (the
# tests start both themselves); slower per test, hence the longer timeout.
SHARED_SUITES := tests/test_engine.py tests/test_life.py tests/test_scenarios.py \
	tests/test_restart.py tests/test_stops.py
test-shared: $(STAMP)
	BACKFILL_TEST_LEDGER=postgres BACKFILL_TEST_STORE=s3 $(BIN)/pytest -n auto --maxprocesses=2 \
		--dist worksteal --timeout 400 $(SHARED_SUITES)

# Both crash sweeps on SQLite, then again with the ledger on PostgreSQL.
test-crash: $(STAMP)
	$(BIN)/pytest -m crash tests/test_crash_sweep.py
	BACKFILL_TEST_LEDGER=postgres $(BIN)/pytest -m crash tests/test_crash_sweep.py

# Polars, the baseline the conversion is measured against, is installed for benchmarks only.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

fmt: $(STAMP)
	$(BIN)/ruff format backfill tests benchmarks
	$(BIN)/ruff check --fix backfill tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis data/demo data/bench
