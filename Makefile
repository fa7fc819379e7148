# agentd — the two commands: `make demo` (run it) and `make test` (test it).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTO_FILES := $(wildcard protos/agentd/v1/*.proto)

.PHONY: demo serve replicas test test-throwaway proto proto-check proto-baseline bench bench-compare clean

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

## Contracts: buf (in the venv, from the `dev` extra) lints protos/, checks them against the last
## released contract and runs the code generators of buf.gen.yaml (Python via the pinned
## grpcio-tools, TypeScript via @bufbuild/protoc-gen-es pinned in scripts/codegen/).
BUF            := $(VENV)/bin/buf
CODEGEN        := scripts/codegen
CODEGEN_DEPS   := $(CODEGEN)/node_modules/.package-lock.json
# The last released contract (a buf image): `make proto-check` fails on a change that breaks it.
PROTO_BASELINE := protos/baseline/agentd-v0.1.binpb

$(CODEGEN_DEPS): $(CODEGEN)/package.json $(CODEGEN)/package-lock.json
	cd $(CODEGEN) && npm ci
	touch $@

## Regenerate generated/ from protos/: Python (generated/agentd/v1/, its __init__.py kept) and
## TypeScript (generated/ts/agentd/v1/), both with `buf generate` (buf.gen.yaml).
proto: $(VENV)/.dev $(CODEGEN_DEPS)
	rm -rf generated/ts
	find generated/agentd/v1 -maxdepth 1 -name '*_pb2*.py*' -delete
	$(BUF) generate

## Fail when buf lint finds problems (STANDARD and COMMENTS rules), when protos/ breaks the last
## released contract (buf breaking, FILE rules, against $(PROTO_BASELINE)), or when generated/
## (Python or TypeScript) differs from a fresh `buf generate`.
##
## Cutting a new baseline at a release (say v0.2), from the commit being released, with
## `make proto-check` passing:
##   1. make proto-baseline RELEASE=v0.2   (writes protos/baseline/agentd-v0.2.binpb)
##   2. point PROTO_BASELINE above at that file, delete the previous image, and commit both
##      with the release. From then on breaking changes are judged against v0.2.
## A deliberate breaking change (a new major version, e.g. agentd.v2 in protos/agentd/v2) is
## not pushed past the check: add the new package beside the old one.
proto-check: $(VENV)/.dev $(CODEGEN_DEPS)
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_BASELINE)
	@tmp=$$(mktemp -d) && \
	$(BUF) generate --output $$tmp && \
	cp generated/agentd/v1/__init__.py $$tmp/generated/agentd/v1/__init__.py && \
	if diff -r -x __pycache__ $$tmp/generated generated >/dev/null; then echo "generated/ is up to date"; rm -rf $$tmp; \
	else echo "generated/ is stale: run 'make proto' and commit the result"; diff -r -q -x __pycache__ $$tmp/generated generated; rm -rf $$tmp; exit 1; fi

## Record the contract as released: protos/ as a buf image, protos/baseline/agentd-$(RELEASE).binpb
## (see proto-check for the steps of a release).
proto-baseline: $(VENV)/.dev
	@test -n "$(RELEASE)" || { echo "usage: make proto-baseline RELEASE=v0.2"; exit 2; }
	$(BUF) lint
	$(BUF) build --exclude-source-info -o protos/baseline/agentd-$(RELEASE).binpb
	@echo "wrote protos/baseline/agentd-$(RELEASE).binpb; now point PROTO_BASELINE in the Makefile at it"

## Benchmark: latency, overhead per turn, throughput, RSS, stores, replicas (see README, Performance).
bench: $(VENV)/.dev
	$(PY) bench/bench_runs.py
	$(PY) bench/bench_stores.py
	$(PY) bench/bench_replicas.py
	$(PY) bench/bench_auth.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_long_session.py
	$(PY) bench/bench_scale.py

## The benchmarks in BENCH (default: runs) on BASE, a git revision, and on the working tree,
## alternating ROUNDS times (default 3); prints each figure's medians and their ratio.
## e.g. make bench-compare BASE=HEAD~3 BENCH="runs scale" ARGS="--runs 200"
bench-compare: $(VENV)/.dev
	@test -n "$(BASE)" || { echo 'usage: make bench-compare BASE=<git rev> [BENCH="runs scale"] [ROUNDS=3] [ARGS="..."]'; exit 2; }
	$(PY) bench/compare.py --base $(BASE) $(foreach b,$(or $(BENCH),runs),--bench $(b)) --rounds $(or $(ROUNDS),3) -- $(ARGS)

clean:
	rm -rf $(VENV) .agentd .pytest_cache
