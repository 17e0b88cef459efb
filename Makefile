# keyyo-stream: `make run` (the local pipeline with simulated calls) and `make test` (lint + tests).
# Each does its own idempotent set-up: .venv with the project and its dev tools, the Kafka jars.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup kafka-jars run test lint unit compile uncompile bench-ingest bench-call-records bench-acd-stats bench-actions bench-scaling clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is needed"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# The broker's jars, resolved by Maven into ~/.cache/keyyo-stream (skipped when Kafka comes from
# KAFKA_BOOTSTRAP_SERVERS; needs Java 17+ and Maven otherwise, unless Docker is used by the tests).
kafka-jars: setup
	@if [ -z "$$KAFKA_BOOTSTRAP_SERVERS" ] && command -v java >/dev/null && command -v mvn >/dev/null; then \
		$(BIN)/python -c 'from deploy.kafka_local import resolve_artifacts; print(resolve_artifacts())'; fi

run: kafka-jars
	$(BIN)/keyyo-stream --log-format text run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit -q

# Optional: the per-record modules compiled by mypyc, in place (needs a C compiler), and the native
# fold of call records (Rust, processors/native; skipped without cargo); Python then imports them
# instead of the .py files. A source edited afterwards makes every command refuse to start until
# `make compile` runs again (or `make uncompile`). See the README's "Compiled build".
compile: setup
	$(BIN)/python -m deploy.compiled build

uncompile:
	$(or $(wildcard $(BIN)/python),$(PYTHON)) -m deploy.compiled clean

# PYTHONNODEBUGRANGES: tracebacks without column carets. Python 3.11 finds those carets by parsing
# source with `ast` as it formats a traceback, and its AST builder can lose count of its depth
# (CPython gh-106905): a run then fails with "SystemError: AST constructor recursion depth
# mismatch", seen twice here in partial runs, after tests that passed. Formatting tracebacks while
# other AST work is under way is the likely trigger; without carets it never parses. Nothing else
# changes.
test: lint kafka-jars
	PYTHONNODEBUGRANGES=1 $(BIN)/pytest -q -ra --durations=10

bench-ingest: kafka-jars
	$(BIN)/python -m devtools.bench_ingest

bench-call-records: kafka-jars
	$(BIN)/python -m devtools.bench_call_records

bench-acd-stats: kafka-jars
	$(BIN)/python -m devtools.bench_acd_stats

bench-actions: kafka-jars
	$(BIN)/python -m devtools.bench_actions

bench-scaling: kafka-jars
	$(BIN)/python -m devtools.bench_scaling

clean: uncompile
	rm -rf $(VENV) .keyyo bench-results .pytest_cache .mypy_cache .ruff_cache
