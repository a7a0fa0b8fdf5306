# fraudstream: the front door. `make help` lists the targets.
PYTHON ?= python3
PROTO_SRC := $(wildcard protos/fraud/v1/*.proto)
RUN_ARGS ?=

.PHONY: help install run test test-unit lint typecheck proto proto-check bench up down infra-status clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install:  ## install fraudstream with its dev tools (pip, editable)
	$(PYTHON) -m pip install -q -e '.[dev]'

run:  ## the whole suite locally: Kafka + Redis, four services, simulator, live view (RUN_ARGS="--duration 60")
	$(PYTHON) -m shared.cli run $(RUN_ARGS)

test:  ## every test against a real Kafka broker and Redis (started here when not configured)
	$(PYTHON) -m pytest -q

test-unit:  ## only the tests that need no network
	$(PYTHON) -m pytest -q tests/unit

lint:  ## ruff and mypy
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy shared services bench tests

proto:  ## regenerate the committed protobuf and gRPC code
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

proto-check:  ## fail when the committed generated code is stale
	@tmp=$$(mktemp -d) && \
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRC) && \
	for f in $$tmp/protos/fraud/v1/*; do \
	  if ! cmp -s $$f protos/fraud/v1/$$(basename $$f); then \
	    echo "stale generated code: protos/fraud/v1/$$(basename $$f) (run 'make proto' and commit)"; rm -rf $$tmp; exit 1; fi; \
	done; rm -rf $$tmp; echo "generated protobuf code is up to date"

bench:  ## run the benchmarks under bench/ and print the figures
	$(PYTHON) -m bench.run_all

up:  ## start local Kafka and Redis (no Docker)
	$(PYTHON) -m shared.cli infra up

down:  ## stop local Kafka and Redis
	$(PYTHON) -m shared.cli infra down

infra-status:  ## are local Kafka and Redis running?
	$(PYTHON) -m shared.cli infra status
