# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv and install what they need into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/chronoplane/v1/*.proto)
# Two distributions: the client (client/pyproject.toml) and the server (pyproject.toml).
PROJECTS := pyproject.toml client/pyproject.toml
SUM := $(shell cat $(PROJECTS) | cksum | cut -d' ' -f1)
# `make test` and the rest: the server, the client and the dev toolchain.
STAMP := $(VENV)/.installed-dev-$(SUM)
# `make run`: the server and its runtime only (a venv that has the toolchain keeps it).
RUN_STAMP := $(VENV)/.installed-run-$(SUM)
TS := clients/typescript

.PHONY: run test lint typecheck proto proto-check buf pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(PROJECTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e './client[yaml]' -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@ $(RUN_STAMP)

$(RUN_STAMP): $(PROJECTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ./client -e .
	rm -f $(VENV)/.installed-run-*
	touch $@

run: $(RUN_STAMP)
	$(BIN)/chronoplane serve $(ARGS)

# Regenerates the Python stubs and the TypeScript client's code (protoc-gen-es from its
# node_modules, installed with `npm ci` when package-lock.json is newer).
proto: $(STAMP) $(TS)/node_modules/.package-lock.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=client --grpc_python_out=client \
		--mypy_out=client --mypy_grpc_out=client $(PROTOS)
	$(BIN)/buf generate --template $(TS)/buf.gen.yaml

$(TS)/node_modules/.package-lock.json: $(TS)/package-lock.json
	npm --prefix $(TS) ci --no-audit --no-fund

# Generated stubs are committed; fail when they are not what `make proto` makes now.
proto-check: $(STAMP)
	@rm -rf .tmp/proto-check && mkdir -p .tmp/proto-check
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=.tmp/proto-check \
		--grpc_python_out=.tmp/proto-check --mypy_out=.tmp/proto-check \
		--mypy_grpc_out=.tmp/proto-check $(PROTOS) | grep -v "^Writing mypy" || true
	@diff -r -x __pycache__ -x py.typed .tmp/proto-check/chronoplane/v1 client/chronoplane/v1 \
		|| (echo "generated stubs are stale: run 'make proto' and commit the result" && exit 1)
	@echo "generated stubs are fresh"

# buf breaking compares with main (on main itself: with the commit before).
buf: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	@base=$$(git merge-base HEAD main 2>/dev/null || true); \
	if [ "$$(git rev-parse HEAD 2>/dev/null)" = "$$(git rev-parse main 2>/dev/null)" ]; then \
		base=$$(git rev-parse -q --verify HEAD~1 || true); fi; \
	if [ -n "$$base" ] && git cat-file -e "$$base:proto/chronoplane/v1" 2>/dev/null; then \
		echo "buf breaking --against $$base"; $(BIN)/buf breaking --against ".git#ref=$$base"; \
	else echo "buf breaking: no earlier proto/ to compare with"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck proto-check buf pytest

bench: $(STAMP)
	$(BIN)/python bench/fire_throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .tmp .mypy_cache .ruff_cache .pytest_cache
