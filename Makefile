# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ROWS ?= 10000
DSN ?=
SQL ?= SELECT (SELECT count(*) FROM recruit_metadata) AS metadata_rows, (SELECT count(*) FROM recruit_embedding) AS embedding_rows, (SELECT count(*) FROM recruit_embedding_dlq) AS dlq_rows

.PHONY: install demo test unit integration lint proto bench query clean ui-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## the main job end to end: embedded PostgreSQL+pgvector, AI server, real DAG runs
	$(PY) -m dev.demo --rows $(ROWS) $(if $(DSN),--dsn "$(DSN)")

query: install  ## make query [SQL="SELECT ..."] (default: the row counts of both tables and the DLQ)
	$(PY) -m dev.query "$(SQL)" $(if $(DSN),--dsn "$(DSN)")

test: lint  ## lint, type checks and the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The connection forms in Airflow's UI, in headless Debian chromium (apt-get install chromium
# chromium-driver); screenshots in .ui-check/.
ui-check: install
	$(PY) scripts/ui_check.py --out .ui-check

proto: install  ## regenerate airflow_embedding_provider/wire from proto/
	$(PY) scripts/generate_proto.py

# `make bench ROWS=1000000` (or ROWS_BENCH=...) sizes the bench; ROWS's own default is the demo's.
BENCH_ROWS = $(or $(ROWS_BENCH),$(if $(filter environment command,$(origin ROWS)),$(ROWS)))

bench: install
	$(PY) -m bench.run $(if $(BENCH_ROWS),--rows $(BENCH_ROWS)) $(BENCH_ARGS)

clean:
	rm -rf .demo .bench .ui-check .pytest_cache .mypy_cache .ruff_cache
