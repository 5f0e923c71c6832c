# The only entry point: the README and CI use these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/jobwire/v1/*.proto)
STAMP := $(VENV)/.installed

.PHONY: install gen check-gen lint typecheck test run images docker browser bench clean

# A virtualenv at the repo root with jobwire (editable) and its dev tools.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Regenerate gen/ (Python messages, gRPC stubs, mypy stubs, descriptor set, OpenAPI document) from proto/.
gen: $(STAMP)
	rm -rf gen/jobwire/v1 && mkdir -p gen/jobwire/v1
	$(BIN)/python -m grpc_tools.protoc -I proto -I third_party/googleapis \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -I proto -I third_party/googleapis --include_imports \
	  --descriptor_set_out=gen/jobwire/v1/jobwire.binpb $(PROTOS)
	printf '"""Generated from proto/jobwire/v1 by `make gen`; never edit by hand."""\n' > gen/jobwire/v1/__init__.py
	touch gen/jobwire/v1/py.typed
	$(BIN)/python scripts/openapi.py gen/jobwire/v1/openapi.json $(PROTOS)

# Fails when gen/ is not what `make gen` makes from proto/.
check-gen: gen
	@git diff --exit-code --stat -- gen || (echo "gen/ is stale: run 'make gen' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen)" || (git status --porcelain -- gen; echo "gen/ has untracked files: run 'make gen' and commit" && exit 1)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# mypy --strict over the jobwire namespace, laid out as it is imported.
typecheck: $(STAMP)
	rm -rf .typecheck && mkdir -p .typecheck/jobwire
	for d in server worker cli envoy; do ln -s ../../$$d .typecheck/jobwire/$$d; done
	ln -s ../../gen/jobwire/v1 .typecheck/jobwire/v1
	for f in sdk/*; do ln -s ../../$$f .typecheck/jobwire/; done
	cd .typecheck && MYPYPATH=. ../$(BIN)/mypy --config-file ../pyproject.toml -p jobwire --exclude 'jobwire/v1/'

# Start a Docker engine if none runs (installing Debian's docker.io as root).
docker:
	bash scripts/ensure-docker.sh

# Local images for the demo and the tests (no registry is reachable).
images: docker
	bash scripts/build-images.sh

# Debian tools the tests drive: Chromium (gRPC-Web from a browser) and grpc-gateway's
# protoc-gen-swagger (the proto's HTTP rules checked by grpc-gateway itself).
browser:
	bash scripts/ensure-debian-packages.sh chromium=chromium protoc-gen-swagger=golang-grpc-gateway

test: install docker images browser check-gen lint typecheck
	$(BIN)/pytest

# Benchmarks (never part of `make test`): every figure against a baseline measured in the same run.
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS="--quick --only 2,4 --size log_lines=100000"`.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) docker images
	bash scripts/ensure-debian-packages.sh redis-server=redis-server
	$(BIN)/python -m bench $(BENCH_ARGS)

# Server + Envoy + a worker on queue `local`, all in one process tree.
run: install docker images
	$(BIN)/jobwire up

clean:
	rm -rf .typecheck .pytest_cache .mypy_cache .ruff_cache build *.egg-info
