# agentd — the two commands: `make demo` (run it) and `make test` (test it).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTO_FILES := $(wildcard protos/agentd/v1/*.proto)

.PHONY: demo serve replicas test test-throwaway proto proto-check bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.server: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.server

## Start a local server on embedded defaults, stream one multi-step run, stop the server.
demo: $(VENV)/.server
	$(VENV)/bin/agentd demo

## Serve agentd.examples.support:app on 127.0.0.1:50051 until Ctrl-C.
serve: $(VENV)/.server
	$(VENV)/bin/agentd serve

## Start N (default 3) local replicas sharing Postgres and Redis; Ctrl-C drains them.
replicas: $(VENV)/.server
	$(PY) scripts/replicas.py --count $(or $(N),3) --base-port 50051

## Install the dev dependencies and run the whole suite. Postgres and Redis: the servers
## in AGENTD_TEST_POSTGRES_URL / AGENTD_TEST_REDIS_URL, else the local defaults when they
## answer, else throwaway ones started from the local binaries (tests/servers.py).
test: $(VENV)/.dev
	$(PY) -m pytest

## The store and scale-out tests on throwaway Postgres and Redis servers, even when local
## ones answer (CI runs this so the fresh-machine path cannot rot).
STORE_TESTS := tests/test_test_servers.py tests/test_run_stores.py tests/test_session_stores.py \
	tests/test_postgres_store.py tests/test_redis_store.py tests/test_run_store_postgres.py \
	tests/test_run_store_redis.py tests/test_store_faults.py tests/test_scale_out.py
test-throwaway: $(VENV)/.dev
	AGENTD_TEST_THROWAWAY_SERVERS=1 $(PY) -m pytest $(STORE_TESTS)

## Regenerate generated/ from protos/.
proto: $(VENV)/.dev
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=generated --pyi_out=generated --grpc_python_out=generated $(PROTO_FILES)

## Fail when generated/ is stale or buf lint finds problems.
proto-check: $(VENV)/.dev
	$(VENV)/bin/buf lint
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_FILES) && \
	cp generated/agentd/v1/__init__.py $$tmp/agentd/v1/__init__.py && \
	if diff -r -x __pycache__ $$tmp/agentd generated/agentd >/dev/null; then echo "generated/ is up to date"; rm -rf $$tmp; \
	else echo "generated/ is stale: run 'make proto' and commit the result"; diff -r -q -x __pycache__ $$tmp/agentd generated/agentd; rm -rf $$tmp; exit 1; fi

## Benchmark: latency, overhead per turn, throughput, RSS, stores, replicas (see README, Performance).
bench: $(VENV)/.dev
	$(PY) bench/bench_runs.py
	$(PY) bench/bench_stores.py
	$(PY) bench/bench_replicas.py
	$(PY) bench/bench_auth.py
	$(PY) bench/bench_memory.py

clean:
	rm -rf $(VENV) .agentd .pytest_cache
